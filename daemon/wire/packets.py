"""One helper message: a msgpack map in one packet on a SOCK_SEQPACKET socket, file
descriptors attached in SCM_RIGHTS.

Shared by the daemon and its helpers (the locker, the spawner): the framing and the
envelope (the request id every message carries) are written once here, the fields of each
protocol in its own module (`daemon.wire.locker`, `daemon.wire.spawner`).  Imports nothing
heavy, as the helpers import it too.
"""

import array
import socket
from typing import Any

import msgpack

# The receive buffer for one packet.  A SOCK_SEQPACKET message must fit in the sender's
# send buffer (net.core.wmem_default, 208 KiB on Debian 12: 212,960 bytes of message at
# most, measured), so no packet a helper or the daemon sends is cut off; one that is (a
# peer that raised its SO_SNDBUF) is refused whole, see `recv_packet`.
MAX_PACKET = 1 << 20
# Ancillary room for one descriptor: no message carries more (a lock file, a log pipe),
# and a packet that comes with more arrives truncated, and is refused.
_ONE_FD = socket.CMSG_SPACE(array.array("i").itemsize)

# A message's fields, as msgpack decodes them: each protocol module checks their types.
Fields = dict[str, Any]


class BadMessage(ValueError):
    """A packet that is not one helper message: no msgpack map, or an id that is no int."""


def pack(rid: int | None, fields: Fields) -> bytes:
    """One message: the request id (None where it could not be read) and the fields."""
    return msgpack.packb({"id": rid, **fields})


def unpack(data: bytes) -> tuple[int | None, Fields]:
    """The request id (None if the message has none) and the other fields of a message."""
    try:
        fields = msgpack.unpackb(data)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise BadMessage(f"{type(e).__name__}: {e}") from e
    if not isinstance(fields, dict):
        raise BadMessage("a message is a msgpack map")
    rid = fields.pop("id", None)
    if rid is not None and type(rid) is not int:
        raise BadMessage("a request id is an int")
    return rid, fields


def rights(fd: int) -> list[tuple[int, int, bytes]]:
    """Ancillary data passing one descriptor."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]


def recv_packet(sock: socket.socket) -> tuple[bytes, list[int], bool]:
    """The next packet, the descriptors that came with it (close-on-exec), and whether
    anything was cut off (then the caller must refuse the packet: the kernel has closed
    the descriptors that did not fit).  Empty data and no descriptors means EOF."""
    data, ancdata, flags, _ = sock.recvmsg(MAX_PACKET, _ONE_FD, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    return data, fds, bool(flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC))

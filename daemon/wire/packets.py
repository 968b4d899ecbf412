"""One helper message: a msgpack map in one packet on a SOCK_SEQPACKET socket, file
descriptors attached in SCM_RIGHTS.

Shared by the daemon and its helpers (the locker, the spawner): the framing and the
envelope (the request id every message carries) are written once here, the fields of each
protocol in its own module (`daemon.wire.locker`, `daemon.wire.spawner`).  Imports nothing
heavy, as the helpers import it too.

A SOCK_SEQPACKET message must fit in the sender's send buffer, and a build's request can
be larger (a build script of a megabyte in its environment, a closure of thousands of
inputs).  A message longer than `MAX_INLINE` travels in a memfd instead (`outgoing`): the
packet is then `SPILL` and the message's length, with the memfd as its last descriptor,
and `recv_packet` reads the message back from it and closes it, so that callers only ever
see whole messages.
"""

import array
import contextlib
import os
import socket
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack

# The largest message sent in the packet itself.  A SOCK_SEQPACKET message must fit in the
# sender's send buffer (net.core.wmem_default, 208 KiB on Debian 12: 212,960 bytes of
# message at most, measured); a build's request is a few KiB, so nearly every message goes
# inline and a larger one costs a memfd.
MAX_INLINE = 128 << 10
# The receive buffer for one packet: an inline message, or a spilled one's header.  A
# packet cut off (a peer that raised its SO_SNDBUF) is refused whole, see `recv_packet`.
MAX_PACKET = MAX_INLINE
# The largest message a memfd may bring.  A spawn request holds the builder's arguments
# and environment (at most the kernel's limit for execve: 6 MiB, `daemon.wire.spawner`)
# and its input closure (50,000 store paths are under 5 MiB); what is past 64 MiB is no
# build's request, and the receiver holds the whole message in memory.
MAX_SPILLED = 64 << 20
# The first byte of a spilled message's packet: 0xc1 is the one byte msgpack never uses,
# so no inline message starts with it.
SPILL = b"\xc1"
_LENGTH = 8  # bytes of the spilled message's length, little-endian, after `SPILL`
# Ancillary room for three descriptors: a message's own (a lock file; a build's log pipe,
# and the report pipe of its runner when it has environments) and a spilled message's
# memfd.  A packet that comes with more arrives truncated, and is refused.
_FDS = socket.CMSG_SPACE(3 * array.array("i").itemsize)

# A message's fields, as msgpack decodes them: each protocol module checks their types.
Fields = dict[str, Any]
Ancillary = list[tuple[int, int, bytes]]


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


def rights(*fds: int) -> Ancillary:
    """Ancillary data passing these descriptors (none: no ancillary data)."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def spill(data: bytes) -> int:
    """A new memfd holding `data`, read from its start: the caller's to close."""
    memfd = os.memfd_create("weft-message", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(memfd, view) :]
        os.lseek(memfd, 0, os.SEEK_SET)
    except BaseException:
        os.close(memfd)
        raise
    return memfd


@contextlib.contextmanager
def outgoing(
    data: bytes, fd: int | Sequence[int] | None = None
) -> Iterator[tuple[list[bytes], Ancillary]]:
    """The buffers and ancillary data to send for message `data` with descriptor `fd`
    (or descriptors, in order): the message itself, or past `MAX_INLINE` its length with
    the message in a memfd, closed when the block ends (once sent, the receiver has its
    own)."""
    fds = [] if fd is None else [fd] if isinstance(fd, int) else list(fd)
    if len(data) <= MAX_INLINE:
        yield [data], rights(*fds)
        return
    memfd = spill(data)
    try:
        yield [SPILL + len(data).to_bytes(_LENGTH, "little")], rights(*fds, memfd)
    finally:
        os.close(memfd)


def _read_spilled(memfd: int, length: int) -> bytes | None:
    """The message a memfd brought, or None if it is not as long as its packet said."""
    chunks = []
    offset = 0
    try:
        if not 0 < length <= MAX_SPILLED or os.fstat(memfd).st_size != length:
            return None
        while offset < length:
            chunk = os.pread(memfd, length - offset, offset)
            if not chunk:
                return None
            chunks.append(chunk)
            offset += len(chunk)
    except OSError:
        return None  # no file to read (a pipe, a socket): no message
    return b"".join(chunks)


def recv_packet(sock: socket.socket) -> tuple[bytes, list[int], bool]:
    """The next message, the descriptors that came with it (close-on-exec), and whether
    anything was cut off or does not read back (then the caller must refuse the packet:
    the kernel has closed the descriptors that did not fit).  Empty data and no
    descriptors means EOF.  A spilled message is read from its memfd, which is closed."""
    data, ancdata, flags, _ = sock.recvmsg(MAX_PACKET, _FDS, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    truncated = bool(flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC))
    if truncated or not data.startswith(SPILL):
        return data, fds, truncated
    if len(data) != len(SPILL) + _LENGTH or not fds:
        return data, fds, True
    memfd = fds.pop()
    try:
        message = _read_spilled(memfd, int.from_bytes(data[len(SPILL) :], "little"))
    finally:
        os.close(memfd)
    return (data, fds, True) if message is None else (message, fds, False)

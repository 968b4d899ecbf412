"""One msgpack packet with file descriptors attached, on a SOCK_SEQPACKET socket.

Shared by the daemon and its helpers (the locker, the spawner); imports nothing heavy, as
the helpers import it too.
"""

import array
import socket

MAX_PACKET = 1 << 20


def rights(fd: int) -> list[tuple[int, int, bytes]]:
    """Ancillary data passing one descriptor."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]


def recv_packet(sock: socket.socket) -> tuple[bytes, list[int], bool]:
    """The next packet, the descriptors that came with it (close-on-exec), and whether
    anything was cut off (then the caller must refuse the packet: the kernel has closed
    the descriptors that did not fit).  Empty data and no descriptors means EOF."""
    data, ancdata, flags, _ = sock.recvmsg(
        MAX_PACKET, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC
    )
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    return data, fds, bool(flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC))

"""A client's request as it arrives: bytes and descriptors gathered without blocking the
server, until the request is whole, malformed, or too slow.

One client that stalls halfway must not hold up another's command, and one that floods
must not take the server's memory: the server reads whatever each connection has when it
is readable, and gives up on a request that is not whole within `REQUEST_DEADLINE` or
larger than `wire.MAX_REQUEST`.
"""

import array
import os
import socket
import time

from cmdserver import wire

# The client writes its whole request at once, right after connecting; a second is
# ages for that, and a client that takes longer is stuck or hostile.
REQUEST_DEADLINE = 5.0
_READ = 1 << 16
_FDS_SPACE = socket.CMSG_SPACE(wire.STREAMS * array.array("i").itemsize)


class Incoming:
    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.deadline = time.monotonic() + REQUEST_DEADLINE
        self.data = bytearray()
        self.fds: list[int] = []
        self._length: int | None = None

    def read(self) -> wire.Request | None:
        """Read what is there; the request once whole.  Raises `wire.BadRequest` (or
        `ConnectionError`) when it cannot become one."""
        try:
            data, ancillary, _flags, _addr = self.conn.recvmsg(_READ, _FDS_SPACE)
        except BlockingIOError:
            return None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self.fds.extend(fds)
        if not data:
            raise ConnectionError("the client left before its request was whole")
        self.data += data
        if self._length is None and len(self.data) >= wire.HEAD.size:
            self._length = wire.body_length(bytes(self.data[: wire.HEAD.size]))
        if self._length is None or len(self.data) < wire.HEAD.size + self._length:
            return None
        if len(self.data) > wire.HEAD.size + self._length:
            raise wire.BadRequest("bytes after the request")
        if len(self.fds) != wire.STREAMS:
            raise wire.BadRequest(f"{len(self.fds)} descriptors, not {wire.STREAMS}")
        return wire.parse(bytes(self.data[wire.HEAD.size :]))

    def close_fds(self) -> None:
        """The descriptors received, which this object owns until a command takes them."""
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)

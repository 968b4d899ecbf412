"""The server's socket: claimed by one server at a time, given up only by its owner.

Two clients that find no server at the same moment each start one; the path must end
up with one of them, and neither may unlink the other's socket.  So the claim (is a
server answering? if not, replace the path with our socket) runs under an exclusive lock
on a file beside the socket, and a server leaving unlinks the path only while it still
names its own socket (same inode).
"""

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator

# Commands waiting for the server to accept them; above it, clients wait in connect().
BACKLOG = 128


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _answering(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


class Listener:
    """The listening socket at `path`, or None from `claim` when another server has it."""

    def __init__(self, path: str, sock: socket.socket) -> None:
        self.path = path
        self.sock = sock
        self._inode = os.stat(path).st_ino

    @classmethod
    def claim(cls, path: str) -> "Listener | None":
        with _locked(path):
            if _answering(path):
                return None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.bind(path)
                sock.listen(BACKLOG)
                sock.setblocking(False)
                return cls(path, sock)
            except BaseException:
                sock.close()
                raise

    def give_up(self) -> None:
        """Stop taking commands: the path is unlinked if it is still ours, so that the
        next client finds no server and starts a new one."""
        with _locked(self.path), contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        self.sock.close()

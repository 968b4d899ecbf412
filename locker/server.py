"""The locker process: one loop serving the daemon's lock requests on a SEQPACKET socket.

Each packet is one request of the locker's protocol (`daemon/wire/locker.py`, the only
thing it imports of the daemon); a `lock` request carries the lock file's descriptor in
SCM_RIGHTS.  The locker keeps one descriptor per locked inode and holds an OFD lock on
it (see docs/locking.md for why OFD and not classic POSIX locks); descriptors for an
inode it already holds are closed at once, which OFD locks survive.  A `lock-byte`
request locks one byte of the byte-lock file it was started with, on the one
descriptor it keeps of it: builds lock their outputs so, with no file made or deleted.
When the daemon's end closes, the locker exits, and the kernel drops every lock with its
descriptors.
"""

import contextlib
import ctypes
import errno
import fcntl
import os
import select
import selectors
import signal
import socket
import struct
import sys

from daemon.wire.locker import (
    MALFORMED,
    Cancel,
    Key,
    Lock,
    LockByte,
    Malformed,
    ReleaseOwner,
    Reply,
    Status,
    Unlock,
    decode_request,
    encode_reply,
)
from daemon.wire.packets import BadMessage, pack, recv_packet, unpack
from locker.table import LockTable, Outcome

# How long the head of a queue waits before asking the kernel again, when another process
# holds a conflicting lock (the kernel cannot tell us when it lets go: F_OFD_SETLKW would
# block the whole loop); doubled up to the maximum while it stays held.  1 ms is about the
# daemon's own round trip to the locker, so a lock let go is seen about as soon as one of
# ours; 50 ms keeps a lock held for long (another daemon's build) at 20 wake-ups a second,
# and below what a build, seconds long, would notice.
RETRY_MIN, RETRY_MAX = 0.001, 0.05
_FLOCK = struct.Struct("hhqqi4x")  # struct flock: type, whence, start, len, pid
# Where the OFD lock ends and the display-only POSIX lock begins (`OfdKernel`): past the
# end of any lock file (they stay empty), within off_t.
_SPLIT = 1 << 62
_PR_SET_PDEATHSIG = 1


class OfdKernel:
    """One open file description per inode, locked with F_OFD_SETLK.

    The OFD lock covers the file up to `_SPLIT` and is the real lock: it belongs to the
    open file description we keep, so closing other descriptors of the inode cannot drop
    it.  A classic POSIX lock of the same kind covers the rest of the file, only so that
    `lslocks` from util-linux before 2.39 (which prints OFD locks with pid -1) shows the
    locker as the holder; closing a duplicate descriptor drops that one, so it is set
    again at once.  Outside processes locking the whole file conflict with the OFD part.
    """

    def __init__(self, byte_fd: int | None = None) -> None:
        self.fds: dict[Key, int] = {}
        self._kinds: dict[Key, int] = {}
        # The byte-lock file: its bytes' keys are (dev, ino, offset), all on this one
        # descriptor, never closed.  Its OFD locks need no display part: no byte lock
        # is a classic one, and `lslocks` shows them as the locker's (pid -1 before
        # util-linux 2.39).
        self.byte_fd = byte_fd
        st = os.fstat(byte_fd) if byte_fd is not None else None
        self.byte_file = (st.st_dev, st.st_ino) if st is not None else None

    def adopt(self, key: Key, fd: int) -> None:
        """Keep `fd` for `key`, or close it if one is already kept (the lock survives)."""
        if key not in self.fds:
            self.fds[key] = fd
            return
        os.close(fd)
        if key in self._kinds:
            self._show(key)

    def acquire(self, key: Key, exclusive: bool) -> bool:
        kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
        byte = len(key) == 3
        fd, start, length = (self.byte_fd, key[2], 1) if byte else (self.fds[key], 0, _SPLIT)
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, start, length, 0))
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        if not byte:
            self._kinds[key] = kind
            self._show(key)
        return True

    def _show(self, key: Key) -> None:
        with contextlib.suppress(OSError):
            lock = _FLOCK.pack(self._kinds[key], os.SEEK_SET, _SPLIT, 0, 0)
            fcntl.fcntl(self.fds[key], fcntl.F_SETLK, lock)

    def release(self, key: Key) -> None:
        if len(key) == 3:
            unlock = _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, key[2], 1, 0)
            fcntl.fcntl(self.byte_fd, fcntl.F_OFD_SETLK, unlock)
            return
        self._kinds.pop(key, None)
        fd = self.fds.pop(key, None)
        if fd is not None:
            os.close(fd)

    def mark_deleted(self, key: Key) -> None:
        """Nix's deletion token: waiters on this inode see a non-empty file and retry.

        On a full disk (or quota) the byte cannot be written; the file is unlinked
        already, which the daemon's waiters see by itself, and a failed write must not
        take the locker, and every lock with it, down."""
        fd = self.fds.get(key)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.pwrite(fd, b"d", 0)


class LockerServer:
    def __init__(self, sock: socket.socket, byte_fd: int | None = None) -> None:
        self.sock = sock
        self.kernel = OfdKernel(byte_fd)
        self.table = LockTable(self.kernel)
        self.keys: dict[int, Key] = {}  # request id -> inode, until answered
        self._retry = RETRY_MIN

    def serve(self) -> None:
        self.sock.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        while True:
            timeout = self._retry if self.table.waiting_on_kernel() else None
            if sel.select(timeout):
                if not self._drain():
                    return
                self._retry = RETRY_MIN
            else:
                self._retry = min(self._retry * 2, RETRY_MAX)
            self._reply(self.table.retry())

    def _drain(self) -> bool:
        """Handle every packet waiting; False once the daemon has gone."""
        while True:
            try:
                data, fds, truncated = recv_packet(self.sock)
            except BlockingIOError:
                return True
            except ConnectionResetError:
                return False
            if not data and not fds:
                return False
            if truncated:
                for fd in fds:
                    os.close(fd)
                self._send(None, Reply(Status.FAILED, error="truncated packet"))
                continue
            self._reply(self._handle(data, fds))

    def _handle(self, data: bytes, fds: list[int]) -> list[Outcome]:
        rid = -1  # the answer's id while the request's own is unread
        try:
            read, fields = unpack(data)
            if read is None:
                raise Malformed(MALFORMED)
            rid = read
            request = decode_request(fields, len(fds))
        except (BadMessage, Malformed) as e:
            for fd in fds:
                os.close(fd)
            return [Outcome(rid, Status.FAILED, str(e) if isinstance(e, Malformed) else MALFORMED)]
        if isinstance(request, Lock):
            st = os.fstat(fds[0])
            key = (st.st_dev, st.st_ino)
            self.kernel.adopt(key, fds[0])
            self.keys[rid] = key
            return self.table.lock(key, rid, request.owner, request.mode, request.wait)
        for fd in fds:
            os.close(fd)
        match request:
            case LockByte(owner, mode, offset, wait):
                if self.kernel.byte_file is None:
                    return [Outcome(rid, Status.FAILED, "the locker has no byte-lock file")]
                key = (*self.kernel.byte_file, offset)
                self.keys[rid] = key
                return self.table.lock(key, rid, owner, mode, wait)
            case Unlock(owner, key, delete):
                if delete:
                    self.kernel.mark_deleted(key)
                # Unlocks and cancels are not answered: nobody waits for them, and the
                # replies would cost both processes a system call and a decode per lock.
                return self.table.unlock(key, owner)
            case ReleaseOwner(owner):
                return [Outcome(rid, Status.RELEASED), *self.table.release_owner(owner)]
            case Cancel(waiting):
                return self.table.cancel(waiting)

    def _reply(self, outcomes: list[Outcome]) -> None:
        for o in outcomes:
            self._send(o.request, Reply(o.status, self.keys.pop(o.request, None), o.error))

    def _send(self, rid: int | None, reply: Reply) -> None:
        data = pack(rid, encode_reply(reply))
        while True:
            try:
                self.sock.send(data)
                return
            except BlockingIOError:
                # The daemon is slow to read: wait for room rather than drop a reply.
                select.select([], [self.sock], [])
            except (BrokenPipeError, ConnectionResetError):
                sys.exit(0)


def main(fd: int, byte_fd: int | None = None) -> None:
    # If the daemon is killed, the socket's EOF tells us; the death signal is a backstop.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    LockerServer(sock, byte_fd).serve()

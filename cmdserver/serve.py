"""The server's loop: accept commands, fork each into a child, report its end, and leave
when idle, when its code changed, or when told to.

One thread, one `selectors` loop: the listening socket, the connections whose requests
are arriving (`incoming.Incoming`), the connections of running commands (read only to
see a client leave: its command is then killed, as it would have died with a client it
was part of), and the signal wake-up pipe (SIGCHLD: a command ended; SIGTERM, SIGHUP:
stop).  The server is the one parent, and the one reaper, of its commands.
"""

import contextlib
import enum
import os
import selectors
import signal
import socket
import struct
import time

from cmdserver import child, wire
from cmdserver.fresh import Fingerprint
from cmdserver.incoming import Incoming
from cmdserver.listen import Listener
from daemon.cli.main import COMMANDS

# Commands running at once.  Each is a fork of the server (its pages shared until
# written) that grows by what its recipe makes; past this the client runs the command
# itself, which costs the usual start-up and nothing else.
MAX_COMMANDS = 32
# Connections whose requests are still arriving: a client writes its request at once, so
# more than this at a time are stalled or flooding, and a new one is closed on at once
# (its client runs the command itself) rather than take the server's descriptors.
MAX_INCOMING = 64
# A server nobody used for this long leaves, with its memory (about 40 MB): the next
# command starts a new one and runs directly meanwhile.
IDLE_EXIT = 15 * 60.0
_PEERCRED = struct.Struct("=iII")


class Kind(enum.Enum):
    LISTENER = enum.auto()
    WAKEUP = enum.auto()
    INCOMING = enum.auto()
    RUNNING = enum.auto()


class Server:
    def __init__(self, listener: Listener, idle_exit: float = IDLE_EXIT) -> None:
        self.listener: Listener | None = listener
        self.idle_exit = idle_exit
        self.fingerprint = Fingerprint.now()
        self.selector = selectors.DefaultSelector()
        self.running: dict[int, socket.socket | None] = {}
        self.idle_since = time.monotonic()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def serve(self) -> None:
        """Until told to stop or idle, and then until every command has ended."""
        signal.set_wakeup_fd(self._wake_w)
        for sig in child.SERVER_SIGNALS:
            signal.signal(sig, lambda *_: None)
        self.selector.register(self.listener.sock, selectors.EVENT_READ, (Kind.LISTENER, None))
        self.selector.register(self._wake_r, selectors.EVENT_READ, (Kind.WAKEUP, None))
        while self.listener is not None or self.running:
            for key, _ in self.selector.select(self._timeout()):
                if self.selector.get_map().get(key.fd) is not key:
                    continue  # dropped by an earlier event of this batch
                kind, data = key.data
                if kind is Kind.LISTENER:
                    self._accept()
                elif kind is Kind.WAKEUP:
                    self._woken()
                elif kind is Kind.INCOMING:
                    self._read(data)
                else:
                    self._client_left(data, key.fileobj)
            self._expire()

    def _timeout(self) -> float | None:
        deadlines = [i.deadline for i in self._incoming()]
        if self.listener is not None and not self.running and not deadlines:
            deadlines.append(self.idle_since + self.idle_exit)
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _incoming(self) -> list[Incoming]:
        keys = self.selector.get_map().values()
        return [k.data[1] for k in keys if k.data[0] is Kind.INCOMING]

    def _expire(self) -> None:
        now = time.monotonic()
        for incoming in self._incoming():
            if now > incoming.deadline:
                self._drop(incoming)
        idle = self.listener and not self.running and not self._incoming()
        if idle and now > self.idle_since + self.idle_exit:
            self._stop()

    def _accept(self) -> None:
        while self.listener is not None:
            try:
                conn, _ = self.listener.sock.accept()
            except OSError:  # none waiting; or no descriptor left, until one is closed
                return
            if len(self._incoming()) >= MAX_INCOMING:
                conn.close()
                continue
            conn.setblocking(False)
            incoming = Incoming(conn)
            self.selector.register(conn, selectors.EVENT_READ, (Kind.INCOMING, incoming))

    def _drop(self, incoming: Incoming) -> None:
        self.selector.unregister(incoming.conn)
        incoming.close_fds()
        incoming.conn.close()

    def _read(self, incoming: Incoming) -> None:
        try:
            request = incoming.read()
        except (wire.BadRequest, OSError):
            self._drop(incoming)
            return
        if request is not None:
            self.selector.unregister(incoming.conn)
            self._start(incoming, request)

    def _declined(self, conn: socket.socket, request: wire.Request) -> wire.Declined | None:
        if not _same_user(conn):
            return wire.Declined.CREDENTIALS
        if request.name not in COMMANDS or request.name in wire.DIRECT_COMMANDS:
            return wire.Declined.COMMAND
        if self.fingerprint.changed() is not None:
            return wire.Declined.STALE
        if not self.fingerprint.same_startup(request.env):
            return wire.Declined.ENVIRONMENT
        if not os.path.isdir(request.cwd):
            return wire.Declined.CWD
        if len(self.running) >= MAX_COMMANDS:
            return wire.Declined.BUSY
        return None

    def _start(self, incoming: Incoming, request: wire.Request) -> None:
        conn = incoming.conn
        why = self._declined(conn, request)
        if why is not None:
            _send(conn, wire.reply(wire.Reply.DECLINED, why))
            incoming.close_fds()
            conn.close()
            if why is wire.Declined.STALE:
                self._stop()
            return
        server = os.getpid()
        try:
            pid = os.fork()
        except OSError:  # out of processes or memory: the client may have better luck
            _send(conn, wire.reply(wire.Reply.DECLINED, wire.Declined.BUSY))
            incoming.close_fds()
            conn.close()
            return
        if pid == 0:
            child.become(request, incoming.fds, server)
        incoming.close_fds()
        self.running[pid] = conn
        if _send(conn, wire.reply(wire.Reply.PID, pid)):
            self.selector.register(conn, selectors.EVENT_READ, (Kind.RUNNING, pid))
        else:
            self._client_left(pid, conn)

    def _client_left(self, pid: int, conn: socket.socket) -> None:
        """The client of a running command closed its end (or wrote, which it never
        does): the command is killed and reaped, with nobody left to tell."""
        if self.running.get(pid) is conn:
            with contextlib.suppress(KeyError):  # not registered when the PID never went
                self.selector.unregister(conn)
            conn.close()
            self.running[pid] = None
            os.kill(pid, signal.SIGKILL)

    def _woken(self) -> None:
        try:
            signals = os.read(self._wake_r, 4096)
        except BlockingIOError:
            signals = b""
        self._reap()
        if {signal.SIGTERM, signal.SIGHUP} & set(signals):
            self._stop()
            for pid in self.running:
                os.kill(pid, signal.SIGTERM)

    def _reap(self) -> None:
        while self.running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            conn = self.running.pop(pid, None)
            if conn is not None:
                self.selector.unregister(conn)
                if os.WIFSIGNALED(status):
                    _send(conn, wire.reply(wire.Reply.SIGNALED, os.WTERMSIG(status)))
                else:
                    _send(conn, wire.reply(wire.Reply.EXIT, os.waitstatus_to_exitcode(status)))
                conn.close()
            self.idle_since = time.monotonic()

    def _stop(self) -> None:
        """Take no more commands; the loop ends when the running ones have."""
        if self.listener is not None:
            self.selector.unregister(self.listener.sock)
            self.listener.give_up()
            self.listener = None
            for incoming in self._incoming():
                self._drop(incoming)


def _send(conn: socket.socket, data: bytes) -> bool:
    """A reply, whole (a few bytes into an empty socket buffer), or False: the client
    is gone."""
    try:
        return conn.send(data) == len(data)
    except OSError:
        return False


def _same_user(conn: socket.socket) -> bool:
    """The client runs as the server's user, with its groups: a command runs with the
    server's credentials, so it must be what the client could have run itself."""
    pid, uid, gid = _PEERCRED.unpack(
        conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    if (uid, gid) != (os.getuid(), os.getgid()):
        return False
    try:
        with open(f"/proc/{pid}/status") as f:
            groups = next(line for line in f if line.startswith("Groups:"))
    except (OSError, StopIteration):
        return False
    return sorted(map(int, groups.split()[1:])) == sorted(os.getgroups())

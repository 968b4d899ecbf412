"""The daemon's end of a helper process (the locker, the spawner).

A helper is a child of the daemon, reaped by the process monitor, talking over a
SOCK_SEQPACKET socketpair: one message per packet (`daemon.wire.packets`), a file
descriptor attached where a request needs one.  Requests carry ids and replies are matched
to the task awaiting them; each subclass encodes its requests and decodes its replies with
its helper's wire module.

A helper may die at any moment (kill -9, a crash, the OOM killer), and its death must
never take the daemon down.  Each helper process and our end of its socket make one
`_Generation`, the socket's one owner: it closes it once, when the process has exited
(or, from `aclose`, to make it exit), and nothing sends on it after that.  Every request
of a generation that ends fails (its waiter gets no reply: None), including a send that
finds the helper gone; the subclass turns that into its own clear error, undoes what
depended on the helper, and a new helper is started, after a pause if helpers keep dying
at once.  A request made in between waits for the new one.  A helper whose socket fails,
that answers garbage or hangs up without exiting is killed: its exit ends its generation
the same way.  Nothing a helper does raises out of `run`.
"""

import errno
import fcntl
import itertools
import logging
import os
import socket
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from daemon.proc.cpus import place
from daemon.proc.processes import Process, ProcessMonitor
from daemon.wire.packets import Fields, outgoing, pack, unpack

log = logging.getLogger("weft.helpers")
# The helper's end of the socketpair, as `python -m <helper> 3` is told.
_CHILD_FD = 3
# The receive buffer for one reply.  Replies are small maps: a status with a lock's key or
# an error, a builder's pid and cgroup path, or a setup error with its path (PATH_MAX,
# 4,096 bytes) and message; 64 KiB holds any of them with room to spare.
MAX_REPLY = 1 << 16
# A helper that dies within this long of its start, twice in a row, is failing, not
# unlucky (a helper serves for the daemon's whole life; starting one takes about 50 ms):
# each next start waits, from the first pause doubling up to the last, so that a helper
# that cannot start (a broken installation, no memory) costs a start every 10 s, not a CPU.
QUICK_DEATH = 1.0
FIRST_PAUSE, LAST_PAUSE = 0.1, 10.0
# How long a request made while no helper serves (between a death and the next start,
# which may wait a pause) waits for the next one before it fails as if it had died: the
# longest pause, and a start.
RESTART_WAIT = LAST_PAUSE + 5.0
# How long a helper that closed its end of the socket may take to exit before it is
# taken for hung and killed: its exit takes milliseconds, and its own exit code, not
# SIGKILL's, should be what the log shows.
HANGUP_GRACE = 1.0
# How long `aclose` waits for a helper to see EOF and exit before it is killed: both
# helpers exit within milliseconds of EOF; only one stopped (SIGSTOP) or swapped out waits.
CLOSE_GRACE = 5.0
# Send errors that mean the helper's end is gone (it died, or is dying): not the request's
# fault, the request fails as if the helper had died before answering.
_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ECONNREFUSED, errno.ENOTCONN})

Request = TypeVar("Request")
Reply = TypeVar("Reply")


def start_helper(
    monitor: ProcessMonitor,
    module: str,
    cpus: Collection[int] | None = None,
    inherited: Sequence[int] = (),
) -> tuple[Process, socket.socket]:
    """`python -m <module> 3 [4 ...]`, with fd 3 its end of a new socketpair and 4 on the
    `inherited` descriptors, on `cpus` if given (`daemon.proc.cpus`); ours is returned."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    copies: list[int] = []
    try:
        # Copies above every number they go to: none is overwritten before it is put there.
        above = _CHILD_FD + 1 + len(inherited)
        copies += (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, above) for fd in inherited)
        fds = {_CHILD_FD: theirs.fileno()}
        fds.update((_CHILD_FD + 1 + i, fd) for i, fd in enumerate(copies))
        proc = monitor.spawn([sys.executable, "-m", module, *map(str, fds)], fds)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
        for fd in copies:
            os.close(fd)
    place(proc.pid, cpus)
    return proc, ours


@dataclass(eq=False)
class _Waiter(Generic[Reply]):
    done: trio.Event = field(default_factory=trio.Event)
    reply: Reply | None = None


@dataclass(eq=False)
class _Generation(Generic[Reply]):
    """One helper process and our end of its socket, which this alone closes."""

    proc: Process
    sock: trio.socket.SocketType
    started: float
    pending: dict[int, _Waiter[Reply]] = field(default_factory=dict)
    ended: bool = False

    def end(self, fd_lost: bool = False) -> None:
        """Fail what waits on this helper and close our end, once.  With `fd_lost` (the
        number was closed under us, a bug elsewhere) the number is let go, not closed:
        it may be another owner's by now."""
        if self.ended:
            return
        self.ended = True
        for waiter in self.pending.values():
            waiter.done.set()
        self.pending.clear()
        if fd_lost:
            self.sock.detach()
        else:
            self.sock.close()


class HelperConnection(ABC, Generic[Request, Reply]):
    name = "helper"

    def __init__(
        self,
        monitor: ProcessMonitor,
        start: Callable[[ProcessMonitor], tuple[Process, socket.socket]],
        proc: Process,
        sock: socket.socket,
    ) -> None:
        self._monitor = monitor
        self._start = start
        self._gen: _Generation[Reply] = self._generation(proc, sock)
        self._ids = itertools.count(1)
        self._closing = False
        # Set (and replaced) when a new helper serves, or the connection closes.
        self._changed = trio.Event()
        self.restarts = 0

    @staticmethod
    def _generation(proc: Process, sock: socket.socket) -> _Generation[Reply]:
        return _Generation(proc, trio.socket.from_stdlib_socket(sock), time.monotonic())

    @property
    def pid(self) -> int:
        return self._gen.proc.pid

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve replies; when the helper dies, fail what depended on it, start another."""
        task_status.started()
        pause, quick_deaths = FIRST_PAUSE, 0
        while True:
            gen = self._gen
            code = await self._serve(gen)
            if self._closing:
                return
            log.error(
                "the %s (pid %d) exited with %d; starting another", self.name, gen.proc.pid, code
            )
            if time.monotonic() - gen.started >= QUICK_DEATH:
                pause, quick_deaths = FIRST_PAUSE, 0
            else:
                quick_deaths += 1
            if quick_deaths > 1:
                await trio.sleep(pause)
                pause = min(pause * 2, LAST_PAUSE)
            while not self._closing and not self._start_next():
                log.error("could not start the %s; again in %.1f s", self.name, pause)
                await trio.sleep(pause)
                pause = min(pause * 2, LAST_PAUSE)
            if self._closing:
                return

    def _start_next(self) -> bool:
        try:
            self._gen = self._generation(*self._start(self._monitor))
        except OSError as e:
            log.error("starting the %s: %s", self.name, e)
            return False
        self.restarts += 1
        self._changed.set()
        self._changed = trio.Event()
        return True

    async def _serve(self, gen: _Generation[Reply]) -> int:
        """One generation, until its helper exits: its exit code."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_replies, gen, nursery)
            if self.restarts:
                nursery.start_soon(self._after_restart)
            code = await gen.proc.wait()
            # Before the tasks are cancelled: a request in flight fails as "died", not as
            # "cancelled", nothing sends on the socket once it is closed, and what held
            # on the helper learns at once that it does no more.
            gen.end()
            if not self._closing:
                self._died()
            nursery.cancel_scope.cancel()
        return code

    async def _after_restart(self) -> None:
        try:
            await self._restarted()
        except Exception:
            # A subclass's bug must not take the daemon down with the helper it restarted.
            log.exception("after restarting the %s", self.name)

    async def aclose(self) -> None:
        """Close our end: the helper sees EOF and exits; reap it (killed if it lingers)."""
        self._closing = True
        self._changed.set()
        gen = self._gen
        gen.end()
        with trio.move_on_after(CLOSE_GRACE):
            await gen.proc.wait()
            return
        gen.proc.kill()
        await gen.proc.wait()

    async def _read_replies(self, gen: _Generation[Reply], nursery: trio.Nursery) -> None:
        """Hand replies to their waiters.  A helper whose socket fails or that answers
        garbage is of no more use, nor one that hung up and does not exit: it is killed,
        and its exit ends the generation."""
        while True:
            try:
                data = await gen.sock.recv(MAX_REPLY)
                if not data:
                    break
                rid, fields = unpack(data)
                reply = self._decode(fields)
            except trio.ClosedResourceError:
                return  # ended: closed by `end`
            except OSError as e:
                if gen.ended:
                    return  # closed by `end` while this task was about to read
                if e.errno in _GONE:
                    break
                log.error("the %s's socket failed: %s", self.name, e)
                if e.errno == errno.EBADF:
                    gen.end(fd_lost=True)
                gen.proc.kill()
                return
            except Exception as e:
                log.error("the %s sent a reply that does not decode: %s", self.name, e)
                gen.proc.kill()
                return
            waiter = gen.pending.pop(rid, None) if rid is not None else None
            if waiter is not None:
                waiter.reply = reply
                waiter.done.set()
            else:
                # In a task of its own: a hook that sends must not stall the replies behind
                # it, nor raise out of this reader (and take the daemon down with it).
                nursery.start_soon(self._unclaimed_reply, rid, reply)
        # It hung up: it is exiting (and its exit code will say why), or it is hung.
        with trio.move_on_after(HANGUP_GRACE):
            await gen.proc.wait()
            return
        log.error("the %s hung up but did not exit; killing it", self.name)
        gen.proc.kill()

    async def _unclaimed_reply(self, rid: int | None, reply: Reply) -> None:
        try:
            await self._unclaimed(rid, reply)
        except Exception:
            # A subclass's bug must not take the daemon down: the reply is lost, not more.
            log.exception("handling a reply of the %s that nobody waited for", self.name)

    async def _send(
        self, request: Request, fd: int | Sequence[int] | None = None, rid: int | None = None
    ) -> bool:
        """Send a request to the helper serving now; False if it is gone (the request is
        then void, as everything the helper held).  Other send errors are the request's
        (too large, say) and raise."""
        gen = self._gen
        data = pack(next(self._ids) if rid is None else rid, self._encode(request))
        return await self._send_on(gen, data, fd)

    async def _send_on(
        self, gen: _Generation[Reply], data: bytes, fd: int | Sequence[int] | None
    ) -> bool:
        if gen.ended:
            return False
        try:
            # A message too large for one packet goes in a memfd (`daemon.wire.packets`).
            with outgoing(data, fd) as (buffers, ancillary):
                await gen.sock.sendmsg(buffers, ancillary)
        except trio.ClosedResourceError:
            return False  # ended while we waited for room
        except OSError as e:
            if e.errno == errno.EBADF:
                # Not by `end` (it was checked above, and nothing ran since): by a close
                # of its number elsewhere, a bug that must not end in a closed stranger.
                log.error("the %s's socket was closed under it", self.name)
                gen.end(fd_lost=True)
                gen.proc.kill()
                return False
            if e.errno in _GONE:
                return False
            raise
        return True

    async def _call(self, request: Request, fd: int | Sequence[int] | None = None) -> Reply | None:
        """Send a request and wait for its reply; None if the helper died first.  Made
        while no helper serves, it waits for the next one (a while)."""
        gen = await self._serving()
        rid = next(self._ids)
        waiter: _Waiter[Reply] = _Waiter()
        # Registered before sending: the reply may come back before `_send_on` returns.
        gen.pending[rid] = waiter
        sent = False
        try:
            sent = await self._send_on(gen, pack(rid, self._encode(request)), fd)
            if sent:
                await waiter.done.wait()
        except trio.Cancelled:
            if gen.pending.pop(rid, None) is not None and sent:
                with trio.CancelScope(shield=True):
                    await self._abandoned(rid, request)
            raise
        finally:
            gen.pending.pop(rid, None)
        return waiter.reply

    async def _serving(self) -> _Generation[Reply]:
        """The helper serving now, for `_still_serving`; between a death and the next
        start, the next one (waited for a while: then the dead one)."""
        if not self._gen.ended:
            # Serving: no deadline to set up, twice on every lock's way.
            return self._gen
        with trio.move_on_after(RESTART_WAIT):
            while self._gen.ended and not self._closing:
                await self._changed.wait()
        return self._gen

    def _still_serving(self, token: object) -> bool:
        """Whether the helper that `token` named serves still (has not died since)."""
        return token is self._gen and not self._gen.ended

    # The helper's wire format.

    @abstractmethod
    def _encode(self, request: Request) -> Fields:
        """A request's fields, as the helper reads them."""

    @abstractmethod
    def _decode(self, fields: Fields) -> Reply:
        """A reply, from the fields the helper sent."""

    # Hooks for subclasses.

    def _died(self) -> None:
        """The helper died: undo what depended on it."""

    async def _restarted(self) -> None:
        """Runs once a new helper serves (for example, to take back what must be held)."""

    async def _unclaimed(self, rid: int | None, reply: Reply) -> None:
        """A reply no task waits for any more.  Runs in a task of its own, cancelled when
        the helper exits; what it raises is logged."""

    async def _abandoned(self, rid: int, request: Request) -> None:
        """The task waiting for request `rid` was cancelled before its reply came."""

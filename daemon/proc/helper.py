"""The daemon's end of a helper process (the locker, the spawner).

A helper is a child of the daemon, reaped by the process monitor, talking over a
SOCK_SEQPACKET socketpair: one message per packet (`daemon.wire.packets`), a file
descriptor attached where a request needs one.  Requests carry ids and replies are matched
to the task awaiting them; each subclass encodes its requests and decodes its replies with
its helper's wire module.  When the helper dies, every request in flight fails (its waiter
gets no reply: None), subclasses undo what depended on it, and a new helper is started.
"""

import itertools
import logging
import socket
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from typing import Generic, TypeVar

import trio

from daemon.proc.cpus import place
from daemon.proc.processes import Process, ProcessMonitor
from daemon.wire.packets import Fields, pack, rights, unpack

log = logging.getLogger("weft.helpers")
# The helper's end of the socketpair, as `python -m <helper> 3` is told.
_CHILD_FD = 3
# The receive buffer for one reply.  Replies are small maps: a status with a lock's key or
# an error, a builder's pid and cgroup path, or a setup error with its path (PATH_MAX,
# 4,096 bytes) and message; 64 KiB holds any of them with room to spare.
MAX_REPLY = 1 << 16

Request = TypeVar("Request")
Reply = TypeVar("Reply")


def start_helper(
    monitor: ProcessMonitor, module: str, cpus: Collection[int] | None = None
) -> tuple[Process, socket.socket]:
    """`python -m <module> 3`, with fd 3 its end of a new socketpair, on `cpus` if given
    (`daemon.proc.cpus`); ours is returned."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        proc = monitor.spawn(
            [sys.executable, "-m", module, str(_CHILD_FD)], {_CHILD_FD: theirs.fileno()}
        )
    finally:
        theirs.close()
    place(proc.pid, cpus)
    return proc, ours


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
        self._proc = proc
        self._sock = trio.socket.from_stdlib_socket(sock)
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[trio.Event, list[Reply | None]]] = {}
        self._closing = False
        self.restarts = 0

    @property
    def pid(self) -> int:
        return self._proc.pid

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve replies; when the helper dies, fail what depended on it, start another."""
        task_status.started()
        while True:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_replies)
                if self.restarts:
                    nursery.start_soon(self._restarted)
                code = await self._proc.wait()
                nursery.cancel_scope.cancel()
            if self._closing:
                return
            log.error(
                "the %s (pid %d) exited with %d; starting another", self.name, self._proc.pid, code
            )
            for event, slot in self._pending.values():
                slot.append(None)
                event.set()
            self._pending.clear()
            self._died()
            self._sock.close()
            self._proc, sock = self._start(self._monitor)
            self._sock = trio.socket.from_stdlib_socket(sock)
            self.restarts += 1

    async def aclose(self) -> None:
        """Close our end: the helper sees EOF and exits; reap it."""
        self._closing = True
        self._sock.close()
        with trio.move_on_after(5):
            await self._proc.wait()

    async def _read_replies(self) -> None:
        while True:
            try:
                data = await self._sock.recv(MAX_REPLY)
            except (OSError, trio.ClosedResourceError):
                return
            if not data:
                return
            rid, fields = unpack(data)
            reply = self._decode(fields)
            waiter = self._pending.pop(rid, None) if rid is not None else None
            if waiter is not None:
                waiter[1].append(reply)
                waiter[0].set()
            else:
                await self._unclaimed(rid, reply)

    async def _send(self, request: Request, fd: int | None = None, rid: int | None = None) -> None:
        data = pack(next(self._ids) if rid is None else rid, self._encode(request))
        await self._sock.sendmsg([data], rights(fd) if fd is not None else [])

    async def _call(self, request: Request, fd: int | None = None) -> Reply | None:
        """Send a request and wait for its reply; None if the helper died first."""
        event = trio.Event()
        slot: list[Reply | None] = []
        rid = next(self._ids)
        # Registered before sending: the reply may come back before `_send` returns.
        self._pending[rid] = (event, slot)
        try:
            await self._send(request, fd, rid)
            await event.wait()
        except trio.Cancelled:
            if self._pending.pop(rid, None) is not None:
                with trio.CancelScope(shield=True):
                    await self._abandoned(rid, request)
            raise
        return slot[0]

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
        """A reply no task waits for any more."""

    async def _abandoned(self, rid: int, request: Request) -> None:
        """The task waiting for request `rid` was cancelled before its reply came."""

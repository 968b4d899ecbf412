"""The daemon's end of a helper process (the locker, the spawner).

A helper is a child of the daemon, reaped by the process monitor, talking over a
SOCK_SEQPACKET socketpair: one msgpack map per packet, a file descriptor attached where a
request needs one.  Requests carry ids and replies are matched to the task awaiting them.
When the helper dies, every request in flight fails (the reply `{"status": "died"}` reaches
its waiter), subclasses undo what depended on it, and a new helper is started.
"""

import itertools
import logging
import socket
import sys
from collections.abc import Callable, Collection

import msgpack
import trio

from daemon.proc.cpus import place
from daemon.proc.processes import Process, ProcessMonitor
from daemon.wire.packets import rights

log = logging.getLogger("weft.helpers")
_CHILD_FD = 3
Reply = dict[str, object]


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


class HelperConnection:
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
        self._pending: dict[int, tuple[trio.Event, list[Reply]]] = {}
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
                slot.append({"status": "died"})
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
                data = await self._sock.recv(65536)
            except (OSError, trio.ClosedResourceError):
                return
            if not data:
                return
            reply = msgpack.unpackb(data)
            waiter = self._pending.pop(reply.get("id"), None)
            if waiter is not None:
                waiter[1].append(reply)
                waiter[0].set()
            else:
                await self._unclaimed(reply)

    async def _send(self, msg: Reply, fd: int | None = None, rid: int | None = None) -> None:
        data = msgpack.packb({"id": next(self._ids) if rid is None else rid, **msg})
        await self._sock.sendmsg([data], rights(fd) if fd is not None else [])

    async def _call(self, msg: Reply, fd: int | None = None) -> Reply:
        """Send a request and wait for its reply; `{"status": "died"}` if the helper died."""
        event = trio.Event()
        slot: list[Reply] = []
        rid = next(self._ids)
        # Registered before sending: the reply may come back before `_send` returns.
        self._pending[rid] = (event, slot)
        try:
            await self._send(msg, fd, rid)
            await event.wait()
        except trio.Cancelled:
            if self._pending.pop(rid, None) is not None:
                with trio.CancelScope(shield=True):
                    await self._abandoned(rid, msg)
            raise
        return slot[0]

    # Hooks for subclasses.

    def _died(self) -> None:
        """The helper died: undo what depended on it."""

    async def _restarted(self) -> None:
        """Runs once a new helper serves (for example, to take back what must be held)."""

    async def _unclaimed(self, reply: Reply) -> None:
        """A reply no task waits for any more."""

    async def _abandoned(self, rid: int, msg: Reply) -> None:
        """The task waiting for request `rid` was cancelled before its reply came."""

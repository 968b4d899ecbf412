"""The daemon's side of the spawner: start builders in sandboxes, get `Process`es back.

The spawner is started before trio (and restarted from within it, by posix_spawn, if it
dies).  A request carries the sandbox description and the write end of the build's log
pipe; the reply names the builder's pid, which the process monitor then owns: the
builder was orphaned to the daemon, a child subreaper, by design.  If the spawner dies,
requests in flight fail with `SpawnerDied` and a new spawner serves the next ones.
"""

import array
import itertools
import logging
import os
import signal
import socket
import sys
from dataclasses import asdict

import msgpack
import trio

from daemon.processes import Process, ProcessMonitor
from spawner.sandbox import SpawnRequest

log = logging.getLogger("weft.spawn")
_CHILD_FD = 3


class SpawnError(Exception):
    """The sandbox could not be set up: the step, errno and path say where."""

    def __init__(self, step: str, err: int, path: str, message: str) -> None:
        super().__init__(
            f"sandbox setup failed at {step}: {message}" + (f" ({path})" if path else "")
        )
        self.step, self.errno, self.path, self.message = step, err, path, message


class SpawnerDied(SpawnError):
    pass


def start_spawner_process(monitor: ProcessMonitor) -> tuple[Process, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        proc = monitor.spawn(
            [sys.executable, "-m", "spawner", str(_CHILD_FD)], {_CHILD_FD: theirs.fileno()}
        )
    finally:
        theirs.close()
    return proc, ours


class SpawnerService:
    def __init__(self, monitor: ProcessMonitor, proc: Process, sock: socket.socket) -> None:
        self._monitor = monitor
        self._proc = proc
        self._sock = trio.socket.from_stdlib_socket(sock)
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[trio.Event, list[dict[str, object]]]] = {}
        self._closing = False
        self.restarts = 0

    @property
    def spawner_pid(self) -> int:
        return self._proc.pid

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_replies)
                code = await self._proc.wait()
                nursery.cancel_scope.cancel()
            if self._closing:
                return
            log.error("the spawner (pid %d) exited with %d; starting another", self._proc.pid, code)
            for event, slot in self._pending.values():
                slot.append({"status": "died"})
                event.set()
            self._pending.clear()
            self._sock.close()
            self._proc, sock = start_spawner_process(self._monitor)
            self._sock = trio.socket.from_stdlib_socket(sock)
            self.restarts += 1

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

    async def spawn(self, request: SpawnRequest, log_fd: int) -> Process:
        """Start a builder; its stdout and stderr go to `log_fd` (which stays ours)."""
        rid = next(self._ids)
        event = trio.Event()
        slot: list[dict[str, object]] = []
        self._pending[rid] = (event, slot)
        data = msgpack.packb({"id": rid, **asdict(request)})
        rights = array.array("i", [log_fd]).tobytes()
        try:
            await self._sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
            await event.wait()
        finally:
            self._pending.pop(rid, None)
        reply = slot[0]
        if reply["status"] == "died":
            raise SpawnerDied("spawner", 0, "", "the spawner died while setting up the sandbox")
        if reply["status"] != "ok":
            raise SpawnError(
                str(reply.get("step")),
                int(reply.get("errno") or 0),  # type: ignore[arg-type]
                str(reply.get("path") or ""),
                str(reply.get("message")),
            )
        return self._monitor.register(int(reply["pid"]), [request.builder, *request.args])  # type: ignore[arg-type]

    async def aclose(self) -> None:
        self._closing = True
        self._sock.close()
        with trio.move_on_after(5):
            await self._proc.wait()


async def wait_or_kill(proc: Process, timeout: float, grace: float = 5.0) -> int:
    """The builder's exit code; past `timeout` it gets SIGTERM, `grace` later SIGKILL.

    The builder is pid 1 of its pid namespace: when it dies the kernel kills everything
    else in the namespace, so this takes the whole process tree, daemonised grandchildren
    included.  A cancelled wait kills it too.
    """
    try:
        with trio.move_on_after(timeout):
            return await proc.wait()
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            return await proc.wait()
        proc.kill()
        return await proc.wait()
    except trio.Cancelled:
        proc.kill()
        raise


def build_ids(slot: int, uid_base: int, slots: int) -> tuple[int, int]:
    """The host uid and gid a build slot's user maps to.

    A root daemon gives each slot its own id from the configured range, never its own; a
    daemon running as an ordinary user can map only its own ids (as Guix's rootless
    daemon does)."""
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    if not 0 <= slot < slots:
        raise ValueError(f"build slot {slot} outside 0..{slots - 1}")
    uid = uid_base + slot
    if uid_base <= 0 or uid_base <= os.geteuid() < uid_base + slots:
        raise ValueError(f"build-uid-base {uid_base} would map builders to the daemon's uid")
    return uid, uid

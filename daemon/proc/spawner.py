"""The daemon's side of the spawner: start builders in sandboxes, get `Process`es back.

The spawner is started before trio (and restarted from within it, by posix_spawn, if it
dies).  A request (`daemon/wire/spawner.py`) carries the sandbox description and the
write end of the build's log pipe; the reply names the builder's pid, which the process
monitor then owns: the spawner's spares are orphaned as soon as they are made, and the
daemon, a subreaper, adopts them, by design.  If the spawner dies, requests in flight
fail with `SpawnerDied` and a new spawner serves the next ones.

A derivation with build environments is started the same way, with a plan of its session
and a second pipe, for the report of its runner (`daemon/build/session.py`).

A request the builder's exec would refuse (arguments and environment past the kernel's
limits) fails here, before the spawner makes anything of its sandbox; a request of any
other size goes through (`daemon.wire.packets` sends a large one in a memfd).
"""

import functools
import os
import resource
import socket
from collections.abc import Collection

from daemon.proc.helper import HelperConnection, start_helper
from daemon.proc.processes import Process, ProcessMonitor
from daemon.wire.packets import Fields
from daemon.wire.spawner import (
    SetupFailure,
    Spawned,
    SpawnReply,
    SpawnRequest,
    decode_reply,
    encode_request,
    exec_refusal,
)


class SpawnError(Exception):
    """The sandbox could not be set up: the step, errno and path say where."""

    def __init__(self, failure: SetupFailure) -> None:
        super().__init__(f"sandbox setup failed at {failure}")
        self.failure = failure


class SpawnerDied(SpawnError):
    """The spawner died before it answered; a new one serves the next requests."""


def start_spawner_process(
    monitor: ProcessMonitor, cpus: Collection[int] | None = None
) -> tuple[Process, socket.socket]:
    return start_helper(monitor, "spawner", cpus)


class SpawnerService(HelperConnection[SpawnRequest, SpawnReply]):
    name = "spawner"

    def __init__(
        self,
        monitor: ProcessMonitor,
        proc: Process,
        sock: socket.socket,
        cpus: Collection[int] | None = None,
    ) -> None:
        super().__init__(monitor, functools.partial(start_spawner_process, cpus=cpus), proc, sock)

    @property
    def spawner_pid(self) -> int:
        return self.pid

    async def spawn(
        self, request: SpawnRequest, log_fd: int, report_fd: int | None = None
    ) -> Process:
        """Start a builder; its stdout and stderr go to `log_fd`.  A request with a plan
        starts the session runner instead, which reports on `report_fd` (both stay ours)."""
        if (request.plan is None) != (report_fd is None):
            raise ValueError("a plan goes with a report pipe, and only a plan")
        # The builder inherits the daemon's stack limit, which sets execve's.
        refusal = exec_refusal(request, resource.getrlimit(resource.RLIMIT_STACK)[0])
        if refusal is not None:
            raise SpawnError(refusal)
        fds = log_fd if report_fd is None else (log_fd, report_fd)
        reply = await self._call(request, fds)
        if reply is None:
            raise SpawnerDied(
                SetupFailure("spawner", 0, "", "the spawner died while setting up the sandbox")
            )
        if isinstance(reply, SetupFailure):
            raise SpawnError(reply)
        proc = self._monitor.register(reply.pid, [request.builder, *request.args])
        proc.cgroup = reply.cgroup
        return proc

    def _encode(self, request: SpawnRequest) -> Fields:
        return encode_request(request)

    def _decode(self, fields: Fields) -> SpawnReply:
        return decode_reply(fields)

    async def _unclaimed(self, rid: int | None, reply: SpawnReply) -> None:
        """A builder whose requester was cancelled before the reply came: nobody would
        wait for it or kill it, and it may never exit on its own."""
        if isinstance(reply, Spawned):
            self._monitor.register(reply.pid, ["abandoned builder"]).kill()


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

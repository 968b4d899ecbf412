"""`Runtimes`: what the runtime-* operations call (docs/protocol.md).

A start: pin the profiles to the client's connection, check they are valid, read them,
pin and check their members (pinned first, so a collection running meanwhile either
finished deleting or keeps them: `store/pins.py`); compute the environment
(`envplan.compute`) from the records of the caller's parent; then open a pidfd of the
caller, write the roots and the record in one trip, and hand the pidfd to the watcher.
The caller then execs its command in place, so the registered process is the command.

Everything that touches a file runs in worker threads; each user sees only their own
runtimes, and another user's id is answered exactly as an unknown one.
"""

import logging
import os
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import trio

from daemon.proc.workers import Workers
from daemon.runtime.envplan import (
    MAX_ENV_BYTES,
    Dangling,
    Env,
    EnvPlan,
    EnvRequest,
    PlanError,
    compute,
    redact,
)
from daemon.runtime.records import ParentStatus, Record, Records, Summary
from daemon.runtime.roots import RuntimeRoots, new_runtime_id
from daemon.runtime.watcher import Watcher, boot_id, open_process, real_uid, ticks_now
from daemon.settings import Settings
from store.environment.profile import Profile, read_profile
from store.errors import NotValid
from store.layout import StateDir
from store.store import Store

log = logging.getLogger("weft.runtimes")

# Profiles one runtime may name: more members go in a profile of their own.  It bounds
# the paths each summary lists, so that a user's summaries fit one reply.
MAX_PROFILES = 32
# A runtime's name, as `store-runtime` shows it: a label, not a description.
MAX_NAME = 100


@dataclass(frozen=True, slots=True)
class RunRequest:
    profiles: tuple[str, ...]
    env: EnvRequest
    parent: str | None  # the caller's WEFT_RUNTIME
    argv: tuple[bytes, ...] = ()
    cwd: bytes = b""
    durable: bool = False
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Planned:
    id: str | None  # None: only planned
    plan: EnvPlan
    parent: str | None
    parent_status: ParentStatus


class Runtimes:
    def __init__(self, state: StateDir, store: Store, settings: Settings, workers: Workers) -> None:
        self.store = store
        self.settings = settings
        self.workers = workers
        self.records = Records(state.runtimes_dir)
        self.roots = RuntimeRoots(state.runtime_roots_dir)
        self.watcher = Watcher(self._ended)
        self.boot_id = boot_id()

    def close(self) -> None:
        self.records.close()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Set right what the last daemon left (its runtimes' processes may have exited
        meanwhile), then watch the live ones until cancelled."""
        live = await self.workers.long(self._recover)
        await self.watcher.run(live, task_status=task_status)

    async def plan(self, uid: int, req: RunRequest, owner: Hashable) -> Planned:
        """The environment `req` would get; nothing is registered."""
        planned, _ = await self.workers.client(self._plan, uid, req, owner, None)
        return planned

    async def start(self, uid: int, pid: int, req: RunRequest, owner: Hashable) -> Planned:
        """Register process `pid` (the client) as a runtime, and its environment."""
        asked = ticks_now()
        _check_start(req, pid)
        runtime_id = new_runtime_id()
        planned, paths = await self.workers.client(self._plan, uid, req, owner, runtime_id)
        pidfd = await self.workers.client(
            self._register, uid, pid, asked, req, planned.plan.env, paths, runtime_id
        )
        self.watcher.watch(runtime_id, pidfd)
        return planned

    async def summaries(self, uid: int) -> list[Summary]:
        return await self.workers.client(self.records.summaries, uid)

    async def show(self, uid: int, runtime_id: str) -> tuple[Summary, list[str]]:
        return await self.workers.client(self.records.summary, uid, runtime_id)

    async def lineage(self, uid: int, runtime_id: str) -> list[Summary]:
        return await self.workers.client(self.records.lineage, uid, runtime_id)

    async def env(self, uid: int, runtime_id: str, pristine: bool) -> Env:
        return await self.workers.client(self.records.captured, uid, runtime_id, pristine)

    async def owners(self) -> dict[str, int]:
        """The uid of each runtime that has roots, by id (for `--print-roots`)."""
        return await self.workers.client(self.records.rooted)

    async def forget(self, uid: int, runtime_id: str) -> None:
        """Drop a runtime's record; a durable one's roots go now, unless its process still
        lives: a live one's go when it exits."""
        await self.workers.client(self._forget, uid, runtime_id)

    # -- in worker threads --

    def _plan(
        self, uid: int, req: RunRequest, owner: Hashable, runtime_id: str | None
    ) -> tuple[Planned, list[str]]:
        if len(req.profiles) > MAX_PROFILES:
            raise PlanError(f"{len(req.profiles)} profiles: at most {MAX_PROFILES} (make one)")
        profiles, paths = self._pin_profiles(req.profiles, owner)
        parent = self.records.parent(uid, req.parent)
        # A scalar in one profile says what the variable is for the whole run: no other
        # profile's members add search paths to it (an explicit list would conflict).
        scalars = {name for p in profiles for name in p.env.scalars}
        deltas = [p.delta(self.settings.search_paths, scalars) for p in profiles]
        plan = compute(req.env, parent, deltas, runtime_id)
        if parent is None:
            status = ParentStatus.NONE
        else:
            status = ParentStatus.DANGLING if isinstance(parent, Dangling) else ParentStatus.LINKED
        return Planned(runtime_id, plan, req.parent, status), paths

    def _pin_profiles(
        self, paths: Sequence[str], owner: Hashable
    ) -> tuple[list[Profile], list[str]]:
        """The profiles read, and every path they need (profiles, then members), each
        pinned to `owner` before it is checked."""
        self._pin_valid(paths, owner)
        profiles = [read_profile(p) for p in paths]
        members = list(dict.fromkeys(m for p in profiles for m in p.members))
        self._pin_valid(members, owner)
        return profiles, list(dict.fromkeys([*paths, *members]))

    def _pin_valid(self, paths: Sequence[str], owner: Hashable) -> None:
        for path in paths:
            self.store.parse(path)
        self.store.pins.pin(owner, paths)
        valid = self.store.valid_paths(paths)
        for path in paths:
            if path not in valid:
                raise NotValid(f"path {path!r} is not valid")

    def _register(
        self,
        uid: int,
        pid: int,
        asked: float,
        req: RunRequest,
        applied: Env,
        paths: list[str],
        runtime_id: str,
    ) -> int:
        """Open the caller's pidfd, write the runtime's roots and record: the pidfd, for
        the watcher."""
        opened = open_process(pid, before=asked)
        if opened is None:
            raise PlanError(f"the calling process (pid {pid}) has exited")
        pidfd, started_at = opened
        if real_uid(pid) != uid:
            # The client handed its socket on and exited, and its pid went to someone
            # else's process: that one must not hold the runtime's roots.
            os.close(pidfd)
            raise PlanError(f"the calling process (pid {pid}) has exited")
        rec = Record(
            id=runtime_id,
            uid=uid,
            name=req.name,
            parent=req.parent,
            started=time.time(),
            ended=None,
            durable=req.durable,
            pid=pid,
            start_time=started_at,
            boot_id=self.boot_id,
            profiles=req.profiles,
            argv=req.argv,
            cwd=req.cwd,
        )
        globs = self.settings.runtime_redact
        try:
            self.records.register(
                rec,
                redact(req.env.caller, globs),
                redact(applied, globs),
                lambda: self.roots.write(runtime_id, paths),
            )
        except BaseException:
            os.close(pidfd)
            self.roots.remove(runtime_id)
            raise
        return pidfd

    def _forget(self, uid: int, runtime_id: str) -> None:
        if not self.records.forget(uid, runtime_id):
            self.roots.remove(runtime_id)

    def _end(self, runtime_id: str) -> None:
        if not self.records.end(runtime_id, time.time()):
            self.roots.remove(runtime_id)

    def _recover(self) -> list[tuple[str, int]]:
        """The live runtimes' ids and pidfds; the dead ones ended, stray roots removed."""
        live: list[tuple[str, int]] = []
        try:
            for rec in self.records.live():
                opened = None
                if rec.boot_id == self.boot_id:
                    opened = open_process(rec.pid, start=rec.start_time)
                if opened is None:
                    self._end(rec.id)
                else:
                    live.append((rec.id, opened[0]))
            stray = self.roots.remove_all_but(set(self.records.rooted()))
        except BaseException:
            for _, pidfd in live:
                os.close(pidfd)
            raise
        if live or stray:
            log.info("runtimes: %d still running, %d stray roots removed", len(live), len(stray))
        return live

    async def _ended(self, runtime_id: str) -> None:
        await self.workers.background(self._end, runtime_id)


def _check_start(req: RunRequest, pid: int) -> None:
    if pid <= 0:
        raise PlanError(
            "the daemon cannot see the calling process (is it in another pid namespace?)"
        )
    if req.name is not None and (len(req.name) > MAX_NAME or not req.name.isprintable()):
        raise PlanError(f"a runtime's name is at most {MAX_NAME} printable characters")
    size = sum(len(a) + 1 for a in req.argv)
    if size > MAX_ENV_BYTES:
        raise PlanError(f"the command takes {size} bytes, more than {MAX_ENV_BYTES}")

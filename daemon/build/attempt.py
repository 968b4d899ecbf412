"""One attempt at one derivation, in a build slot: the slot laid out, the builder spawned
in its sandbox with the input closure, watched to its end (`watch.py`), and what it left
handed to the attempt's `Finish` (register, compare or replace: `outputs.py`).  With
build environments the first process is a session runner instead, which enters them,
runs the builder and exits them, and reports how that went (`session.py`).

Worker-thread trips are latency on a chain of builds, so an attempt makes as few as it
can: one before the builder (the outputs looked at again under their locks, the input
closure, the slot laid out; none for a check or a repair whose closure is known and whose
slot was left ready), one after (the `Finish`, and the slot readied for the next
build).  A snapshot the attempt resumes from is restored in the trip before; a stopped
one's snapshot is captured, and a failed one's build dir handed to the user if asked
(`stops.py`); its log is stored and its slot readied in one more trip.

A slot goes back to the slots only once its builder is gone: an attempt abandoned
mid-build (its client went away, the daemon stops) kills its builder and waits for it,
and the spawner's answer is always waited for (within `SPAWN_WAIT`), since a builder it
starts for a request nobody waits for any more would run on in a slot already handed to
the next build.  Where that cannot be known, the slot is withheld (`slots.py`).

Errors name the derivation by its `.drv` store path, as Nix's do ("builder for '...'
failed with exit code 1; last 25 log lines:"), setup errors included.
"""

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import trio

from daemon.build import leftovers
from daemon.build.closures import Closures
from daemon.build.errors import BuildError
from daemon.build.events import LogLine, Note
from daemon.build.job import Job
from daemon.build.logs import LogPipe, LogTail, ReportPipe
from daemon.build.outputs import Finish
from daemon.build.request import BuildOptions
from daemon.build.room import Room
from daemon.build.session import plan_of, session_ending
from daemon.build.slots import Slot, mount_points
from daemon.build.stops import Resume, Stops
from daemon.build.variables import build_environment, defaults
from daemon.build.watch import KILL_GRACE, Ending, Watch
from daemon.proc.processes import Process
from daemon.proc.spawner import SpawnerDied, SpawnError
from daemon.sched.retry import Cause
from daemon.wire.spawner import SpawnRequest
from store.derivation import Derivation, drv_name

logger = logging.getLogger("weft.builds")

# How long the spawner gets to answer: it answers within milliseconds (it makes one
# sandbox at a time, a few ms each, so even a queue of 64 requests is well under a
# second), and one that dies fails the request at once; one alive but stuck this long is
# given up on, and the slot with it.
SPAWN_WAIT = 60.0
# How long an abandoned build's builder gets to exit after SIGKILL before its slot is
# withheld: pid 1 of its pid namespace, it takes the whole sandbox with it within
# milliseconds, unless blocked in the kernel.
BURY_WAIT = 10.0
# How long after its spawner died a spare may still start a builder: a whole spawn, the
# request to the builder's first instruction, takes a p99 of 5 to 20 ms
# (bench/RESULTS.md); 25 times the slowest.
SPARE_SETTLE = 0.5


def _nothing() -> None:
    pass


@dataclass
class Inputs:
    """What a build's sandbox shows: the outputs of its input derivations that it uses and
    its sources, with what its request knows of their closures."""

    paths: list[str]
    closures: Closures


class Attempt:
    def __init__(
        self,
        room: Room,
        job: Job,
        drv: Derivation,
        inputs: Inputs,
        opts: BuildOptions,
        finish: Finish,
        resume: Resume | None = None,
    ) -> None:
        self.room = room
        self.job = job
        self.drv = drv
        self.inputs = inputs
        self.opts = opts
        self.finish = finish
        self.name = drv_name(job.drv_path)
        self.builder = f"builder for '{job.drv_path}'"
        self.log = LogTail()
        self.proc: Process | None = None
        self.ran = False  # the builder ran to its end: its log is worth storing
        self.cleared = False  # finished, and the slot readied, in one trip
        self.done = False  # `finished` was called: the outputs are there
        self.slot_safe = True  # nothing of this attempt can run in the slot any more
        self.spawner_died = False  # while it made this attempt's sandbox
        self.stops = Stops(room, job, drv, opts, resume)

    async def run(
        self, needed: Callable[[], bool] | None = None, finished: Callable[[], None] = _nothing
    ) -> None:
        """Build in a slot, unless `needed` (if given, called first, in a worker thread)
        says otherwise; `finished()` once the outputs are there (registered, compared,
        replaced), before the log is stored.  BuildError if the build failed."""
        slot = await self.room.slots.take()
        try:
            try:
                log = await self._in_slot(slot, needed, finished)
            finally:
                if self.slot_safe:
                    self.room.slots.give_back(slot)
                else:
                    self.room.slots.withhold(slot)
            if log is not None:
                # A successful build's log is stored once its dependents went on and its
                # slot is free: making a file is sometimes slow on a busy disk.  With
                # other builds' logs and history records, in one trip, which waits for
                # theirs while others run.
                logs, others = self.room.logs, self.room.scheduler.others_running(self.job.run)
                entry = (self.job.drv_path, log)
                error = await self.room.workers.batched(logs.store_many, entry, others)
                if error is not None:
                    logger.warning("%s: storing the log: %s", self.job.drv_path, error)
        finally:
            # Until here `store-log` reads it live; from here, stored.
            self.room.live.remove(self.job.drv_path, self.log)

    async def _in_slot(
        self, slot: Slot, needed: Callable[[], bool] | None, finished: Callable[[], None]
    ) -> bytes | None:
        """The attempt in `slot`; the log to store, if the build succeeded."""
        closure = await self._lay_out(slot, needed)
        if closure is None:
            self.done = True
            finished()
            return None
        keep = mount_points(closure)
        try:
            built = self._outputs(slot, await self._build(slot, closure))
            await self.stops.settled()
            await self.room.workers.long(self._finish_and_ready, slot, built, closure, keep)
            if self.job.run is not None:
                self.job.run.succeeded = True
            self.done = True
            finished()
            return self.log.data
        except BuildError as e:
            raise await self.stops.failed(e, slot, closure, self.ran) from None
        finally:
            if not self.cleared:
                with trio.CancelScope(shield=True):
                    safe = await self._buried(slot)
                    await self.stops.settled()
                    await trio.to_thread.run_sync(self._wrap_up, slot, keep, safe)

    async def _lay_out(self, slot: Slot, needed: Callable[[], bool] | None) -> list[str] | None:
        """The input closure, the slot laid out for it; None if the build is not needed."""
        ready = self.room.slots.take_ready(slot)
        closure = self.inputs.closures.known(self.inputs.paths)
        if needed is None and ready and closure is not None and self.stops.resume is None:
            return closure
        closure = await trio.to_thread.run_sync(self._prepare, slot, ready, needed)
        if closure is None and ready:
            self.room.slots.mark_ready(slot)
        if self.stops.restored:
            await self.job.tell(Note(self.stops.restored, self.job.drv_path))
        return closure

    def _prepare(
        self, slot: Slot, ready: bool, needed: Callable[[], bool] | None
    ) -> list[str] | None:
        # One worker-thread trip for all of it.
        if needed is not None and not needed():
            return None
        closure = self.inputs.closures.compute(self.inputs.paths)
        if not ready:
            self.room.slots.lay_out(slot, mount_points(closure))
        if self.stops.resume is not None:
            self.stops.restore(slot)
        return closure

    async def _build(self, slot: Slot, closure: list[str]) -> Ending:
        """Spawn the builder (or, with environments, its session runner) and watch it to
        its end."""
        request = self._request(slot, closure)
        plan = request.plan
        with LogPipe() as pipe, ReportPipe(plan is not None) as report:
            self.room.live.add(self.job.drv_path, self.log)
            try:
                proc = await self._spawn(request, pipe, report)
                grace = KILL_GRACE if plan is None else self.room.settings.environment_grace
                watch = Watch(
                    proc,
                    pipe.reader,
                    self.log,
                    self.opts,
                    self._line,
                    self.job.run,
                    grace,
                    bool(plan),
                )
                with self.stops.running(slot, closure, proc):
                    ending = await watch.until_exit()
            finally:
                self.log.end()
            if plan is not None:
                ending = session_ending(ending, plan, report.read())
        self.ran = True
        return ending

    async def _spawn(self, request: SpawnRequest, pipe: LogPipe, report: ReportPipe) -> Process:
        """The builder, started, its output going to `pipe` (a session runner's report to
        `report`); BuildError if its sandbox could not be made."""
        # Shielded: the answer is waited for even when the attempt is abandoned (see the
        # module's docstring); a cancellation comes after it.
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + SPAWN_WAIT
            try:
                spawner = self.room.spawner
                self.proc = await spawner.spawn(request, pipe.write_end, report.write_end)
            except SpawnError as e:
                self.spawner_died = isinstance(e, SpawnerDied)
                raise BuildError(f"{self.builder} could not be started: {e}", Cause.SETUP) from None
            finally:
                pipe.close_write_end()
                report.close_write_end()
        if self.proc is None:
            self.slot_safe = False
            message = f"the spawner did not answer in {SPAWN_WAIT:g} s"
            raise BuildError(f"{self.builder} could not be started: {message}", Cause.SETUP)
        await trio.lowlevel.checkpoint_if_cancelled()
        return self.proc

    async def _buried(self, slot: Slot) -> bool:
        """Whether nothing of this attempt runs in the slot any more: a builder still
        running (its build abandoned) is killed and waited for, within `BURY_WAIT`."""
        if self.spawner_died:
            # A spare that had the request when its spawner died starts the builder all
            # the same, unknown to us: whatever runs in the slot once it would have is
            # killed.
            await trio.sleep(SPARE_SETTLE)
            held = await trio.to_thread.run_sync(leftovers.sweep_slot, slot.work)
            self.slot_safe = not held
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.kill()
            with trio.move_on_after(BURY_WAIT):
                await proc.wait()
            if proc.returncode is None:
                self.slot_safe = False
        return self.slot_safe

    async def _line(self, line: str) -> None:
        await self.job.tell(LogLine(self.job.drv_path, line))

    def _request(self, slot: Slot, closure: list[str]) -> SpawnRequest:
        env = self._environment()
        grace = self.room.settings.environment_grace
        return SpawnRequest(
            builder=self.drv.builder,
            args=list(self.drv.args),
            env=env,
            root=str(slot.work / "root"),
            build_dir=str(slot.work / "build"),
            tmp_dir=str(slot.work / "tmp"),
            restored=self.stops.outputs,
            store_dir=self.room.store.store_dir,
            host_uid=slot.uid,
            host_gid=slot.gid,
            inputs=closure,
            sandbox_paths=list(self.room.settings.sandbox_paths),
            network=self.drv.is_fixed_output,
            reuse_network=self.room.settings.reuse_network_namespaces,
            freezer=self.room.pauser.cgroups,
            plan=plan_of(self.drv, env, self._defaults(), grace),
        )

    def _defaults(self) -> dict[str, str]:
        return defaults(self.room.store.store_dir, self.room.cores)

    def _environment(self) -> dict[str, str]:
        return build_environment(self.drv, self.room.store.store_dir, self.room.cores)

    def _outputs(self, slot: Slot, ending: Ending) -> dict[str, tuple[str, str]]:
        """What the builder left, {output: (where, store path)}; BuildError if it failed."""
        builder = self.builder
        if ending.why:
            raise BuildError(f"{builder} {ending.why}{self.log.tail()}", ending.cause, ending.code)
        if ending.failed:
            message = f"{builder} failed{ending.failed}{self.log.tail()}"
            raise BuildError(message, ending.cause, ending.code)
        if ending.code != 0:
            message = f"{builder} failed with exit code {ending.code}{self.log.tail()}"
            raise BuildError(message, Cause.EXIT, ending.code)
        built: dict[str, tuple[str, str]] = {}
        for out_name, out in self.drv.outputs.items():
            left = slot.work / "root" / out.path.lstrip("/")
            if not os.path.lexists(left):
                raise BuildError(
                    f"{builder} did not produce output '{out_name}' ({out.path}){self.log.tail()}",
                    Cause.MISSING_OUTPUT,
                )
            built[out_name] = (str(left), out.path)
        return built

    def _finish_and_ready(
        self, slot: Slot, built: dict[str, tuple[str, str]], closure: list[str], keep: set[str]
    ) -> None:
        # One trip, nothing else running beside it: the build's dependents wait for it.
        self.finish(built, closure)
        self.cleared = True
        try:
            self._ready_slot(slot, keep)
        except OSError as e:
            logger.warning("%s: after the build: %s", self.job.drv_path, e)
        self.stops.end()

    def _wrap_up(self, slot: Slot, keep: set[str], safe: bool) -> None:
        """After a failure: the log stored, the slot readied if nothing of this attempt
        can run there any more (in a worker thread)."""
        try:
            if self.ran:
                self.room.logs.store(self.job.drv_path, self.log.data)
        finally:
            try:
                if safe:
                    self._ready_slot(slot, keep)
            finally:
                self.stops.end()

    def _ready_slot(self, slot: Slot, keep: set[str]) -> None:
        if self.proc is not None and self.proc.returncode is not None:
            self.room.pauser.reaped(self.proc)
        # Emptied but for the mount points of this build's inputs, which the next build
        # may share.
        self.room.slots.ready(slot, keep)

"""What an attempt keeps when its build stops, and what it starts from (docs/snapshots.md).

Before the builder starts, the snapshot the attempt resumes from (`Resume`: the one its
request names, its previous attempt's, or the derivation's paused one) is restored into
its slot, in the worker trip that lays the slot out.  When it stops:

- failed, with an `on-commit` scope in effect or durable directories declared: a
  committed snapshot of what it wrote, before `--keep-failed` moves its build dir away
  (`keepfailed.py`); one that cannot be made costs the build a line in its error, no more;
- evicted by the scheduler (on-pause = data: its builder killed under memory pressure):
  a paused snapshot of its durable directories, its next attempt's to resume from;
- committed on request while it runs (`store-build --commit`): frozen through the
  scheduler's pauser while its files are copied, then let go on.

A paused snapshot an attempt resumed from is spent once the attempt's builder has run to
its end, whatever the end (built, failed, stopped, evicted again): its record is dropped in
the trip that readies the slot.  An attempt whose builder never started (its sandbox could
not be made) or was abandoned (its clients went away, the daemon stops) leaves it to the
next build of the derivation.  Captures and restores run in worker threads; the slot is
readied only once no capture reads it.
"""

import contextlib
import logging
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

from daemon.build.errors import BuildError
from daemon.build.job import Job
from daemon.build.keepfailed import keep_failed
from daemon.build.request import BuildOptions
from daemon.build.room import Room
from daemon.build.slots import Slot
from daemon.build.snapshots import not_running
from daemon.proc.processes import Process
from daemon.sched.retry import Cause
from daemon.settings import Settings
from store.derivation import Derivation, drv_name
from store.durabledirs import Scope
from store.errors import StoreError
from store.pins import PinOwner
from store.snapshotfs import Capture, Restore, RestoreTarget, capture, restore
from store.snapshots import SnapshotRecord, SnapshotState

logger = logging.getLogger("weft.builds")


@dataclass(frozen=True)
class Resume:
    """What an attempt starts from: `record`, restored `how`; with no record, the
    derivation's paused snapshot if it has one (looked up in the slot's trip)."""

    record: SnapshotRecord | None
    how: Restore
    said: str  # the log's words for it: "resuming from the paused snapshot", ...


def scopes(opts: BuildOptions, settings: Settings) -> tuple[Scope | None, Scope | None]:
    """The (on-pause, on-commit) scopes in effect for a build: its request's over weft.toml's."""
    return opts.on_pause or settings.on_pause, opts.on_commit or settings.on_commit


class Stops:
    """One attempt's snapshots: what it restores, what it captures when it stops."""

    def __init__(
        self, room: Room, job: Job, drv: Derivation, opts: BuildOptions, resume: Resume | None
    ) -> None:
        self.room = room
        self.job = job
        self.drv = drv
        self.opts = opts
        self.resume = resume
        self.name = drv_name(job.drv_path)
        self.made: SnapshotRecord | None = None  # the snapshot this attempt left
        self.spent: SnapshotRecord | None = None  # the paused one it resumed from, dropped
        self._paused: SnapshotRecord | None = None  # the paused one it restored
        self._ran = False  # its builder ran to its end: the paused one is spent
        self.restored = ""  # what the restore did, for the log
        # The outputs' store paths a full restore put back: the spawner leaves them be.
        self.outputs: list[str] = []
        self._capturing = trio.Lock()
        # While the builder runs: what a commit copies.
        self._live: tuple[Slot, Collection[str], Process] | None = None

    # Before the builder: the restore.

    def restore(self, slot: Slot) -> None:
        """Restore the snapshot the attempt resumes from into `slot`, laid out and empty
        (in the slot's worker thread)."""
        assert self.resume is not None
        record = self.resume.record
        if record is None:
            record = self.room.store.snapshots.paused(self.job.drv_path)
            if record is None:
                return
        if record.state is SnapshotState.PAUSED:
            # Spent even if it cannot be restored: a broken one must not stop every build.
            self._paused = record
        target = RestoreTarget(
            build_dir=slot.work / "build",
            tmp_dir=slot.work / "tmp",
            outputs=self._outputs(slot),
            durable_dirs=self.drv.durable_dirs,
            uid=slot.uid,
            gid=slot.gid,
        )
        said = f"{self.name}: {self.resume.said} {record.path}"
        # Pinned while copied: a concurrent forget and collection would take it mid-way.
        owner = PinOwner(f"restore of {self.name}")
        store = self.room.store
        try:
            store.pins.pin(owner, [record.path])
            done = restore(store.store_dir, record, target, self.resume.how)
        except (OSError, StoreError) as e:
            self.restored = f"{said}: it could not be restored ({e}); starting without it"
            return
        finally:
            store.pins.release(owner)
        self.restored = f"{said}: restored {', '.join(done) or 'nothing'}"
        outputs = self.drv.outputs
        self.outputs = [
            outputs[a.removeprefix("outputs/")].path for a in done if a.startswith("outputs/")
        ]
        if self.resume.how is Restore.DATA:
            skipped = sorted(set(record.durable_dirs) - set(self.drv.durable_dirs))
            if skipped:
                self.restored += f"; skipped {', '.join(skipped)}, not declared by this derivation"

    def _outputs(self, slot: Slot) -> dict[str, Path]:
        root = slot.work / "root"
        return {name: root / out.path.lstrip("/") for name, out in self.drv.outputs.items()}

    # While the builder runs: commits on request.

    @contextlib.contextmanager
    def running(self, slot: Slot, closure: Collection[str], proc: Process) -> Iterator[None]:
        """The builder runs: a commit may reach it (`SnapshotService.commit_running`)."""
        self._live = (slot, closure, proc)
        self.room.snapshots.running[self.job.drv_path] = self
        try:
            yield
            self._ran = True
        finally:
            self._live = None
            if self.room.snapshots.running.get(self.job.drv_path) is self:
                del self.room.snapshots.running[self.job.drv_path]

    async def commit(self, scope: Scope | None, owner: int) -> SnapshotRecord:
        """A committed snapshot of the running build, frozen while it is copied (left
        frozen if the scheduler had paused it)."""
        async with self._capturing:
            run, live = self.job.run, self._live
            if run is None or live is None or live[2].returncode is not None:
                raise not_running(self.job.drv_path)
            slot, closure, proc = live
            scope = scope or scopes(self.opts, self.room.settings)[1] or Scope.FULL
            freeze = run.paused_at is None
            run.held = True
            try:
                if freeze:
                    run.pause()
                # A client's request: its pool, as any client's store work.
                return await self.room.workers.client(
                    self._capture, slot, closure, scope, SnapshotState.COMMITTED, "commit", owner
                )
            finally:
                run.held = False
                if freeze and run.proc is proc and run.paused_at is not None:
                    run.resume()

    # When it stops.

    async def failed(
        self, e: BuildError, slot: Slot, closure: Collection[str], ran: bool
    ) -> BuildError:
        """`e`, once what the stopped build is to leave is kept: its snapshot, its build dir
        (--keep-failed)."""
        if e.cause is Cause.EVICTED:
            return await self._evicted(slot, closure)
        commit_scope = scopes(self.opts, self.room.settings)[1]
        if ran and (commit_scope is not None or self.drv.durable_dirs):
            e = await self._committed(e, slot, closure, commit_scope or Scope.DATA)
        if self.opts.keep_failed_for is not None and ran:
            e = await self._kept(e, slot)
        return e

    async def _committed(
        self, e: BuildError, slot: Slot, closure: Collection[str], scope: Scope
    ) -> BuildError:
        state, owner = SnapshotState.COMMITTED, self.opts.owner
        try:
            async with self._capturing:
                self.made = await self.room.workers.long(
                    self._capture, slot, closure, scope, state, "failed", owner
                )
        except (OSError, StoreError) as err:
            return BuildError(f"{e}\nno snapshot was made: {err}", e.cause, e.exit_code)
        self._ran_into(self.made)
        note = f"its {scope} snapshot is {self.made.path}"
        return BuildError(f"{e}\n{note}", e.cause, e.exit_code)

    async def _evicted(self, slot: Slot, closure: Collection[str]) -> BuildError:
        """Why the attempt ended, once its durable directories are kept as its paused
        snapshot (told as a note; the build goes on)."""
        said = f"{self.name}: evicted under memory pressure"
        if not self.drv.durable_dirs:
            message = f"{said}; it declares no durable directories, so it starts over"
            return BuildError(message, Cause.EVICTED)
        state, owner = SnapshotState.PAUSED, self.opts.owner
        try:
            async with self._capturing:
                self.made = await self.room.workers.long(
                    self._capture, slot, closure, Scope.DATA, state, "evicted", owner
                )
        except (OSError, StoreError) as err:
            message = f"{said}; its durable directories could not be kept ({err}): it starts over"
            return BuildError(message, Cause.EVICTED)
        self._ran_into(self.made)
        message = f"{said}; its durable directories are kept in {self.made.path}"
        return BuildError(message, Cause.EVICTED)

    def _ran_into(self, record: SnapshotRecord) -> None:
        if self.job.run is not None:
            self.job.run.snapshot = record.path

    def _capture(
        self,
        slot: Slot,
        closure: Collection[str],
        scope: Scope,
        state: SnapshotState,
        reason: str,
        owner: int,
    ) -> SnapshotRecord:
        run = self.job.run
        c = Capture(
            drv=self.job.drv_path,
            attempt=run.attempt if run is not None else 1,
            scope=scope,
            reason=reason,
            state=state,
            owner=owner,
            durable_dirs=dict(self.drv.durable_dirs),
            build_dir=slot.work / "build",
            tmp_dir=slot.work / "tmp",
            outputs=self._outputs(slot),
            builder_uid=slot.uid,
            candidates=closure,
        )
        return capture(self.room.store, c)

    async def _kept(self, e: BuildError, slot: Slot) -> BuildError:
        """`e`, once the failed build's dir is handed to the user who asked for it."""
        assert self.opts.keep_failed_for is not None
        try:
            kept = await trio.to_thread.run_sync(
                keep_failed, slot.work / "build", slot.uid, self.name, *self.opts.keep_failed_for
            )
        except OSError as err:
            return BuildError(f"{e}\nthe build dir could not be kept: {err}", e.cause, e.exit_code)
        return BuildError(f"{e}\nthe build dir is kept at {kept}", e.cause, e.exit_code, kept)

    async def settled(self) -> None:
        """Once no capture reads the slot (a commit of the build just ended)."""
        if self._capturing.locked():
            async with self._capturing:
                pass

    def end(self) -> None:
        """The attempt is over: the paused snapshot it resumed from is spent if its
        builder ran to its end (in the worker thread that readies its slot); else the next
        attempt resumes from it, as this one would have."""
        paused = self._paused
        if paused is None or not self._ran:
            return
        try:
            self.room.store.snapshots.forget(paused.path)
        except (OSError, StoreError) as e:
            logger.warning("%s: forgetting %s: %s", self.job.drv_path, paused.path, e)
            return
        self.spent = paused

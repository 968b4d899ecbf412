"""Builds shared between requests: a derivation several requests need is built once, by
the first; the others wait for it and hear its progress.

The first request's build runs attempt after attempt through the retry runner
(`daemon/sched/retrying.py`: a scheduler slot each, the history, the retry policy), each
attempt under the derivation's output locks (`outputs.py`), in a slot (`attempt.py`),
its outputs registered (`outputs.Register`).  An attempt is "started", in the request's
nursery, once its outputs are registered: what follows (the locks released, the log
stored) goes on there, off the path of the build's dependents.

Each attempt starts from a snapshot when there is one to start from (docs/snapshots.md):
with durable directories declared, from the last snapshot an earlier attempt left (a
failed one's, an evicted one's); else from the one the request names (`--resume-from`,
on every attempt until another is made); else, on the first, from the derivation's paused
snapshot, which an eviction before a daemon restart left.
"""

import dataclasses
import logging

import trio

from daemon.build.attempt import Attempt, Inputs
from daemon.build.errors import BuildError
from daemon.build.events import Listener, Note, Started
from daemon.build.job import Hooks, Job
from daemon.build.outputs import Register, build_owner, lock_files
from daemon.build.request import BuildOptions
from daemon.build.room import Room
from daemon.build.stops import Resume, scopes
from daemon.proc.locks import LockError
from daemon.sched.retry import Cause
from daemon.sched.retrying import Failure, RetryRunner
from daemon.sched.scheduler import Running
from store.derivation import Derivation, drv_name
from store.durabledirs import Scope
from store.errors import StoreError
from store.snapshotfs import Restore
from store.snapshots import SnapshotRecord, SnapshotState

logger = logging.getLogger("weft.builds")


class Jobs:
    """The builds running in the daemon, by derivation."""

    def __init__(self, room: Room, retrier: RetryRunner) -> None:
        self.room = room
        self.retrier = retrier
        self._running: dict[str, Job] = {}

    async def build(
        self,
        path: str,
        drv: Derivation,
        inputs: Inputs,
        opts: BuildOptions,
        listener: Listener,
        tails: trio.Nursery,
        hooks: Hooks,
    ) -> Job:
        """Build `path`, or wait for the build another request already started; the job,
        done.  `hooks` hear of a build this request runs.  What follows an attempt goes on
        in `tails`."""
        job = self._running.get(path)
        if job is not None:
            job.listeners.append(listener)
            await listener(
                Note(f"waiting for {drv_name(path)}, which another client is building", path)
            )
            if opts.resume_from is not None and opts.resume_into == path:
                ignored = f"--resume-from {opts.resume_from.path} is ignored: the build is running"
                await listener(Note(f"{drv_name(path)}: {ignored}", path))
            await job.done.wait()
            return job
        job = self._running[path] = Job(path, hooks, [listener])
        attempts = _Attempts(self.room, job, drv, inputs, opts, tails)
        try:
            outcome = await self.retrier.run(
                path,
                dict(drv.env),
                opts.retries,
                (opts.timeout, opts.max_silent_time),
                attempts.attempt,
                job.tell,
            )
            job.attempts, job.flaky = outcome.attempts, outcome.flaky
            if outcome.failure is not None:
                job.error = outcome.failure.message
        except trio.Cancelled:
            # Whoever else waits for this build must not take it for a success.
            job.error = f"the build of {drv_name(path)} was cancelled"
            raise
        except BaseException as e:
            # Nor for one that crashed (a log that could not be stored, a bug): this
            # request hears the exception itself, the others only that it failed.
            job.error = f"the build of {path} failed unexpectedly: {type(e).__name__}: {e}"
            raise
        finally:
            del self._running[path]
            job.done.set()
        return job


class _Attempts:
    """The attempts at one job's build, as the retry runner makes them."""

    def __init__(
        self,
        room: Room,
        job: Job,
        drv: Derivation,
        inputs: Inputs,
        opts: BuildOptions,
        tails: trio.Nursery,
    ) -> None:
        self.room = room
        self.job = job
        self.drv = drv
        self.inputs = inputs
        self.opts = opts
        self.tails = tails
        self.on_pause = scopes(opts, room.settings)[0]
        self.last: SnapshotRecord | None = None  # the newest snapshot an attempt left
        self.first = True

    def _resume(self) -> Resume | None:
        """What the next attempt starts from."""
        durable = bool(self.drv.durable_dirs)
        last = self.last
        if durable and last is not None:
            paused = last.state is SnapshotState.PAUSED
            said = "resuming from the paused snapshot" if paused else "resuming from the snapshot"
            return Resume(last, Restore.DATA, f"{said} of attempt {last.attempt},")
        seed = self.opts.resume_from
        if seed is not None and self.opts.resume_into == self.job.drv_path:
            # `check_resume` let a full one through only into its own derivation.
            full = seed.scope is Scope.FULL and seed.drv == self.job.drv_path
            return Resume(seed, Restore.FULL if full else Restore.DATA, "resuming from")
        if durable and self.first:
            return Resume(None, Restore.DATA, "resuming from the paused snapshot")
        return None

    async def attempt(self, run: Running, timeout: float, silence: float) -> Failure | None:
        """One attempt in the scheduler's slot `run`, within these limits; None once the
        outputs are registered."""
        self.job.run = run
        run.evict_on_pause = self.on_pause is Scope.DATA
        # Told from the scheduler's slot, to every request waiting: a build counts as
        # running only once it may run, and again after each retry's wait.
        await self.job.tell(Started(self.job.drv_path))
        limits = dataclasses.replace(self.opts, timeout=timeout, max_silent_time=silence)
        try:
            await self.tails.start(self._run, limits)
        except BuildError as e:
            return Failure(e.cause, str(e), e.exit_code, (e.exit_code or 0) < 0)
        except (LockError, StoreError) as e:
            # The sandbox could not be made, the locker died under the build, or the
            # store refused (an input gone, say): this build fails, the daemon goes on.
            return Failure(Cause.SETUP, str(e))
        self.job.hooks.registered()
        return None

    async def _run(
        self, limits: BuildOptions, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The attempt, under the output locks; `task_status.started()` once the outputs
        are registered, before the locks are released."""
        job, path = self.job, self.job.drv_path
        register = Register(self.room.store, path, self.drv, self.inputs.closures)
        resume = self._resume()
        self.first = False
        attempt = Attempt(self.room, job, self.drv, self.inputs, limits, register, resume)
        locked = self.room.locks.exclusive(lock_files(self.drv), build_owner(path), delete=True)
        try:
            async with locked:
                try:
                    await attempt.run(register.needed, task_status.started)
                finally:
                    self._left(attempt.stops.spent, attempt.stops.made)
            if register.present is not None:
                note = f"{drv_name(path)}: content already in the store as {register.present}"
                await job.tell(Note(note, path))
        except (LockError, OSError) as e:
            if not attempt.done:
                raise
            # The outputs are registered: a locker lost, or a lock file that would not go,
            # costs the build nothing now.
            logger.warning("%s: after the build: %s", build_owner(path), e)

    def _left(self, spent: SnapshotRecord | None, made: SnapshotRecord | None) -> None:
        """After an attempt: the snapshot the next one starts from."""
        if spent is not None and self.last is not None and spent.path == self.last.path:
            self.last = None  # forgotten: garbage from now on
        if made is not None:
            self.last = made

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
import importlib
import logging
import sys
from typing import TYPE_CHECKING

import trio

from daemon.build.attempt import Attempt, Inputs
from daemon.build.errors import BuildError
from daemon.build.events import Failed, Listener, Note, Started
from daemon.build.job import Hooks, Job
from daemon.build.outputs import Register, build_owner, output_paths
from daemon.build.request import BuildOptions
from daemon.build.room import Room
from daemon.build.stops import Resume, scopes
from daemon.proc.locks import LockError
from daemon.remote.policy import Fallback, StayLocal, Where, choose, on_unavailable
from daemon.sched.retry import Cause
from daemon.sched.retrying import Failure, Outcome, RetryRunner
from daemon.sched.scheduler import Running
from store.derivation import Derivation, drv_name
from store.durabledirs import Scope
from store.errors import StoreError
from store.snapshotfs import Restore
from store.snapshots import SnapshotRecord, SnapshotState

if TYPE_CHECKING:
    from daemon.remote.attempt import RemoteAttempt

logger = logging.getLogger("weft.builds")

# The remote attempt's module, loaded on a daemon's first remote build.
REMOTE_ATTEMPT = "daemon.remote.attempt"


class Jobs:
    """The builds running in the daemon, by derivation."""

    def __init__(
        self, room: Room, retrier: RetryRunner, remote_retrier: RetryRunner | None = None
    ) -> None:
        self.room = room
        self.retrier = retrier
        # Remote builds' attempts, in their own scheduler (None: no remote engine).
        self.remote_retrier = remote_retrier
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
            outcome = await self._attempts(attempts)
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

    async def _attempts(self, attempts: "_Attempts") -> Outcome:
        """The build, attempt after attempt: on the remote engine if the remote policy
        sends it there (`daemon/remote/policy.py`), locally otherwise, or after all when
        it cannot go (a name REAPI cannot carry, the engine unreachable)."""
        job, drv, opts = attempts.job, attempts.drv, attempts.opts
        retrier = self.retrier
        if self.remote_retrier is not None and await self._goes_remote(attempts):
            retrier, attempts.remote = self.remote_retrier, True
        limits = (opts.timeout, opts.max_silent_time)
        env = dict(drv.env)
        try:
            return await retrier.run(
                job.drv_path, env, opts.retries, limits, attempts.attempt, job.tell
            )
        except StayLocal as e:
            attempts.remote = False
            line = e.why
            if e.unreachable:
                remote = self.room.remote
                assert remote is not None
                fallback, line = on_unavailable(remote.policy(opts.remote), remote.fallback, e.why)
                logger.warning("%s: %s", job.drv_path, line)
                if fallback is Fallback.FAIL:
                    await job.tell(Failed(job.drv_path, ""))
                    return Outcome(attempts=1, failure=Failure(Cause.SETUP, line))
            await job.tell(Note(f"{drv_name(job.drv_path)}: {line}", job.drv_path))
        return await self.retrier.run(
            job.drv_path, env, opts.retries, limits, attempts.attempt, job.tell
        )

    async def _goes_remote(self, attempts: "_Attempts") -> bool:
        """Whether this build goes to the remote engine, as it is about to start; a
        build that could have gone and stays says why in its log."""
        remote, opts = self.room.remote, attempts.opts
        assert remote is not None
        choice = choose(
            remote.policy(opts.remote),
            attempts.drv.env,
            self.room.scheduler.free(),
            durable=bool(attempts.drv.durable_dirs),
            keep_failed=opts.keep_failed_for is not None,
            resumed=opts.resume_from is not None and opts.resume_into == attempts.job.drv_path,
        )
        if choice.why:
            await attempts.job.tell(
                Note(f"{drv_name(attempts.job.drv_path)}: {choice.why}", attempts.job.drv_path)
            )
        return choice.where is Where.REMOTE


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
        self.remote = False  # the attempts go to the remote engine

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
            return Failure(e.cause, str(e), e.exit_code, (e.exit_code or 0) < 0, e.kept)
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
        attempt: Attempt | RemoteAttempt
        if self.remote and self.room.remote is not None:
            # Here, and in a thread the first time: the remote attempt loads gRPC (some
            # 80 ms, the loop's otherwise), which a daemon whose builds all stay local
            # never needs.
            remote_attempt = sys.modules.get(REMOTE_ATTEMPT) or await trio.to_thread.run_sync(
                importlib.import_module, REMOTE_ATTEMPT
            )
            remote = self.room.remote
            attempt = remote_attempt.RemoteAttempt(
                self.room, remote, job, self.drv, self.inputs, limits, register
            )
        else:
            resume = self._resume()
            self.first = False
            attempt = Attempt(self.room, job, self.drv, self.inputs, limits, register, resume)
        locked = self.room.locks.exclusive_bytes(output_paths(self.drv), build_owner(path))
        try:
            async with locked:
                try:
                    # Under the locks, the first thing in the attempt's first trip: a look
                    # whether another build made the outputs meanwhile.
                    await attempt.run(register.needed, task_status.started)
                finally:
                    if isinstance(attempt, Attempt):
                        self._left(attempt.stops.spent, attempt.stops.made)
            if register.present is not None:
                note = f"{drv_name(path)}: content already in the store as {register.present}"
                await job.tell(Note(note, path))
        except (LockError, OSError) as e:
            if not attempt.done:
                raise
            # The outputs are registered: a locker lost costs the build nothing now.
            logger.warning("%s: after the build: %s", build_owner(path), e)

    def _left(self, spent: SnapshotRecord | None, made: SnapshotRecord | None) -> None:
        """After an attempt: the snapshot the next one starts from."""
        if spent is not None and self.last is not None and spent.path == self.last.path:
            self.last = None  # forgotten: garbage from now on
        if made is not None:
            self.last = made

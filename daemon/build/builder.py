"""Building derivation graphs: what is missing, in dependency order, in parallel.

`Builder.build` loads the requested derivations and everything they need, checks that
their output paths are the ones their inputs give, and walks the graph inputs first.  At
most `max-jobs` builds run at once in the daemon (and at most the request's `-j` for one
request).  A build several requests need runs once: later requests wait for the first.

One build: lock the outputs (through the locker; a derivation whose inputs are being
built locks them ahead, `_reserve`), take a build slot (a host uid for the sandbox), then
in one worker-thread trip check again that they are missing and lay out
`var/builds/<slot>/` (0700, the daemon's); spawn the builder in its sandbox with the
input closure, stream its log to the waiting clients, kill it on timeout or silence; then
in one more trip hand the outputs to `Store.add_outputs` (canonical copy, hash, reference
scan, one transaction), store the log compressed in `var/log/` and empty the slot.  The
build's dependents go on from there; the locks are released and the attempt recorded
after, off their path.

When a build may start, and whether a failed one is tried again, is the scheduler's and
the retry policy's business (`scheduler.py`, `retrying.py`; docs/scheduling.md).
"""

import contextlib
import dataclasses
import functools
import gzip
import hashlib
import logging
import os
import stat
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import trio

from daemon.build.closures import Closures
from daemon.build.keepfailed import keep_failed
from daemon.proc.cpus import UNSHARED, Cpus
from daemon.proc.locks import LockError, LockService
from daemon.proc.processes import Process
from daemon.proc.spawner import SpawnError, SpawnerService, build_ids
from daemon.proc.wakeups import QuickWakeups
from daemon.sched.admission import Admission, Limits
from daemon.sched.freezer import Freezer
from daemon.sched.loadsignals import LoadMonitor, ProcReader
from daemon.sched.retry import Cause, RetrySettings
from daemon.sched.retrying import Failure, RetryRunner
from daemon.sched.scheduler import Running, Scheduler
from daemon.upkeep.collector import Collector
from daemon.wire.spawner import SpawnRequest
from store.derivation import (
    Derivation,
    DerivationError,
    HashModulo,
    check_output_paths,
    closure_order,
)
from store.hashing import hash_path
from store.history import History
from store.layout import Settings, StateDir
from store.lru import Lru
from store.paths import InvalidPath
from store.pins import PinOwner
from store.store import HashMismatch, PathInfo, Store, StoreError
from store.tmparea import remove_tree

logger = logging.getLogger("weft.builds")
T = TypeVar("T")
LOG_TAIL = 25
# Derivations (and hashes modulo) kept from one request to the next: a few tens of MB.
KNOWN_DERIVATIONS = 8192
# Called with a message and, for progress, (built, to build); None marks a log line.
Listener = Callable[[str, tuple[int, int] | None], Awaitable[None]]
# What to do with a finished build's outputs, {output: (where left, store path)}, given
# the input closure: register them, or compare them with the registered ones.  Called in a
# worker thread.
Finish = Callable[[dict[str, tuple[str, str]], list[str]], None]


class BuildError(Exception):
    """A build that failed; the message says why and shows the end of its log."""

    def __init__(self, message: str, cause: Cause = Cause.EXIT, exit_code: int | None = None):
        super().__init__(message)
        self.cause = cause
        self.exit_code = exit_code


def _nothing() -> None:
    pass


async def _no_objection() -> str | None:
    return None


@dataclass
class Hooks:
    """What a request hears of a build it runs, as it goes (on the loop)."""

    spawned: Callable[[], None] = _nothing  # the builder runs
    # The outputs are in the store, their registration not yet committed: builds that
    # need them may start.
    placed: Callable[[], None] = _nothing
    registered: Callable[[], None] = _nothing  # the outputs are valid
    # Asked before the outputs are registered: why they must not be (an input whose
    # registration failed after it was placed), or None once all inputs are valid.
    may_register: Callable[[], Awaitable[str | None]] = _no_objection


@dataclass
class Job:
    drv_path: str
    done: trio.Event = field(default_factory=trio.Event)
    error: str | None = None
    listeners: list[Listener] = field(default_factory=list)
    # The scheduler's record of the attempt in progress.
    run: Running | None = None
    attempts: int = 0
    flaky: bool = False
    # The requester's; and, once a builder runs, what the requests waiting for this build
    # call (the daemon waits then, with time for what comes next).
    hooks: Hooks = field(default_factory=Hooks)
    on_spawn: list[Callable[[], None]] = field(default_factory=list)
    spawned: bool = False

    def running(self) -> None:
        self.spawned = True
        self.hooks.spawned()
        for call in self.on_spawn:
            call()


@dataclass(frozen=True)
class BuildOptions:
    max_jobs: int
    keep_going: bool = False
    check: bool = False
    # uid and gid of the user to whom a failed build's directory is handed, if any.
    keep_failed_for: tuple[int, int] | None = None
    timeout: float = 24 * 3600.0
    max_silent_time: float = 3600.0
    max_log_size: int = 64 << 20
    # None: the daemon's retry policy; 0: no retries; N: N retries, flakiness expected.
    retries: int | None = None


def _not_a_derivation(path: str) -> DerivationError:
    return DerivationError(f"{path} is not a valid derivation in the store")


def _drv_name(drv_path: str) -> str:
    return os.path.basename(drv_path).split("-", 1)[1].removesuffix(".drv")


def _owner(drv_path: str) -> str:
    """The owner of a build's output locks: one per derivation, whichever request builds it,
    so that a request's locks taken ahead (`Builder._reserve`) serve another's build."""
    return f"build:{drv_path}"


def _movable(drv: Derivation) -> bool:
    """Whether a build's outputs may be moved into the store rather than copied.  Once
    the builder is reaped no process of its sandbox is left; but a fixed-output build
    shares the host's network, through which it could have handed a descriptor of its
    output to a process outside, to write into the store later."""
    return not drv.is_fixed_output


def _lock_files(drv: Derivation) -> list[str]:
    return [f"{o.path}.lock" for o in drv.outputs.values()]


def _inputs(drvs: dict[str, Derivation], path: str) -> list[str]:
    """The output paths of `path`'s input derivations that it uses."""
    return [drvs[d].outputs[n].path for d, names in drvs[path].input_drvs.items() for n in names]


@dataclass
class Inputs:
    """What a build's sandbox shows: the outputs of its input derivations that it uses and
    its sources, with what its request knows of their closures."""

    paths: list[str]
    closures: Closures


class Builder:
    def __init__(
        self,
        state: StateDir,
        store: Store,
        settings: Settings,
        locks: LockService,
        spawner: SpawnerService,
        collector: Collector | None = None,
        cpus: Cpus = UNSHARED,
    ) -> None:
        self.state = state
        self.cpus = cpus
        self.wakeups = QuickWakeups(settings.quick_wakeups)
        self.collector = collector
        self.store = store
        self.settings = settings
        self.locks = locks
        self.spawner = spawner
        self.jobs: dict[str, Job] = {}
        self.max_jobs = settings.max_jobs or os.cpu_count() or 1
        self._cores = str(settings.cores or os.cpu_count() or 1)
        limits = Limits.from_settings(settings, os.cpu_count() or 1)
        self.load = LoadMonitor(
            ProcReader(settings.load_proc_dir),
            settings.load_sample_interval,
            lambda sample: self.scheduler.on_sample(sample),
        )
        self.scheduler = Scheduler(Admission(limits, self.max_jobs), self.load)
        self.history = History(store.db)
        self.retrier = RetryRunner(
            self.scheduler, self.history, limits, RetrySettings.from_settings(settings), cpus
        )
        # The builds' freezer cgroups, under one named after the state dir.
        tag = hashlib.sha256(str(state.root).encode()).hexdigest()[:16]
        self.freezer = Freezer.find(tag)
        self._free_slots = deque(range(settings.build_slots))
        self._slot_lot = trio.lowlevel.ParkingLot()
        # Slots their last build left ready for the next (laid out, emptied but for its
        # inputs' mount points).
        self._ready: set[int] = set()
        # Derivations whose outputs a request found missing under the locks it took ahead,
        # with its token (`_reserve`); dropped when any build of one ends.
        self._found_missing: dict[str, object] = {}
        # Derivations read and checked, and their hashes modulo, for the next requests.
        self._checked = Lru[str, Derivation](KNOWN_DERIVATIONS)
        self._hashes = Lru[str, str](KNOWN_DERIVATIONS)
        self.builds_dir = state.root / "var" / "builds"

    def close(self) -> None:
        if self.freezer is not None:
            self.freezer.close()

    # -- loading ------------------------------------------------------------------------

    def _load(self, roots: list[str]) -> tuple[dict[str, Derivation], list[str]]:
        """The derivations of `roots`' closure, read and checked, inputs first.  Each
        must be valid in the store, which one query asks; those checked before come from
        `_checked`, as a `.drv` path's contents never change."""
        drvs: dict[str, Derivation] = {}
        read: list[str] = []

        def resolve(path: str) -> Derivation:
            drv = drvs.get(path) or self._checked.get(path)
            if drv is None:
                drv = self._read(path)
                read.append(path)
            drvs[path] = drv
            return drv

        order = closure_order(roots, resolve)
        valid = self.store.valid_paths(order)
        for path in order:
            if path not in valid:
                raise _not_a_derivation(path)
        hashes = HashModulo(resolve, self._hashes)
        for path in read:
            check_output_paths(drvs[path], self.store.store_dir, hashes)
            self._checked.put(path, drvs[path])
        return drvs, order

    def _read(self, path: str) -> Derivation:
        try:
            self.store.parse(path)
            if not path.endswith(".drv"):
                raise InvalidPath(path)
            return Derivation.from_json(Path(path).read_text())
        except (InvalidPath, OSError):
            raise _not_a_derivation(path) from None

    def learn(self, path: str, text: str) -> None:
        """A `.drv` just added (as `text`), checked in the adding worker thread as Nix
        checks a derivation it registers: a build of it then finds it in `_checked`.  One
        that does not check out is left for the build to refuse."""

        def resolve(p: str) -> Derivation:
            return drv if p == path else self._checked.get(p) or self._read(p)

        try:
            drv = Derivation.from_json(text)
            check_output_paths(drv, self.store.store_dir, HashModulo(resolve, self._hashes))
        except DerivationError:
            return
        self._checked.put(path, drv)

    # -- the graph ----------------------------------------------------------------------

    async def build(
        self, roots: list[str], opts: BuildOptions, listener: Listener
    ) -> list[dict[str, object]]:
        # Everything the request reads or makes stays pinned until it is over, so a
        # concurrent collection never takes an input (or an output just registered).
        owner = PinOwner(f"build of {', '.join(map(_drv_name, roots))}")
        try:
            return await self._build(roots, opts, listener, owner)
        finally:
            self.store.pins.release(owner)

    async def _pinned(self, owner: PinOwner, paths: list[str], then: Callable[[], T]) -> T:
        """`then()`, once `paths` are pinned for `owner`: one worker-thread trip for both."""

        def pin_then() -> T:
            self.store.pins.pin(owner, paths)
            return then()

        return await trio.to_thread.run_sync(pin_then)

    async def _build(
        self, roots: list[str], opts: BuildOptions, listener: Listener, owner: PinOwner
    ) -> list[dict[str, object]]:
        drvs, order = await self._pinned(owner, roots, functools.partial(self._load, roots))
        outputs = {p: [o.path for o in d.outputs.values()] for p, d in drvs.items()}
        srcs = [s for d in drvs.values() for s in d.input_srcs]
        produced = [o for outs in outputs.values() for o in outs]
        valid = await self._pinned(
            owner, [*order, *srcs, *produced], functools.partial(self.store.valid_paths, produced)
        )
        missing = {p for p in order if not set(outputs[p]) <= valid}
        if missing and self.collector is not None:
            freed = await self.collector.auto_collect()
            if freed is not None:
                await listener(
                    f"free space was low: collected {len(freed.deleted)} paths, "
                    f"{freed.bytes_freed} bytes",
                    None,
                )
        await listener(
            f"{len(missing)} derivations to build, {len(order) - len(missing)} present",
            (0, len(missing)),
        )
        results: dict[str, dict[str, object]] = {}
        built: list[str] = []
        finished = {p: trio.Event() for p in order}
        # Set once a derivation's outputs are in the store, registered or not yet.
        in_place = {p: trio.Event() for p in order}
        # Set once a derivation's builder runs (or it is settled without one).
        started = {p: trio.Event() for p in order}
        request_jobs = trio.CapacityLimiter(max(1, opts.max_jobs))
        stop = trio.Event()
        closures = Closures(self.store)

        def inputs_of(path: str) -> Inputs:
            return Inputs([*_inputs(drvs, path), *drvs[path].input_srcs], closures)

        async def one(path: str) -> None:
            try:
                async with contextlib.AsyncExitStack() as stack:
                    reserved = None
                    if path in missing and drvs[path].input_drvs:
                        reserved = await self._reserve(stack, path, drvs[path], started)
                    await settle(path, reserved)
            except LockError as e:
                # The locker died while the outputs were locked ahead.
                results.setdefault(path, {"status": "failed", "message": str(e)})
            finally:
                results.setdefault(path, {"status": "cancelled"})
                started[path].set()
                in_place[path].set()
                finished[path].set()

        def failed_inputs(path: str) -> list[str]:
            # Those still registering are not failed yet.
            return [
                d
                for d in drvs[path].input_drvs
                if d in results and results[d]["status"] not in ("built", "valid", "checked")
            ]

        async def settle(path: str, reserved: object | None) -> None:
            drv = drvs[path]
            for dep in drv.input_drvs:
                await in_place[dep].wait()
            failed = failed_inputs(path)
            if failed:
                results[path] = {
                    "status": "dependency-failed",
                    "message": f"dependency failed: {_drv_name(failed[0])}",
                }
            elif path not in missing and opts.check and path in roots:
                results[path] = await self.check(path, drv, inputs_of(path), opts, listener)
            elif path not in missing:
                results[path] = {"status": "valid"}
            else:
                # Dependents go on once the outputs are in place, while their
                # registration commits: the locks' release and the history record follow
                # off their path.
                borrower = object()
                try:
                    # No checkpoint when a place is free: on a chain, each is latency.
                    request_jobs.acquire_on_behalf_of_nowait(borrower)
                except trio.WouldBlock:
                    await request_jobs.acquire_on_behalf_of(borrower)

                def release() -> None:
                    if borrower in request_jobs.statistics().borrowers:
                        request_jobs.release_on_behalf_of(borrower)

                def placed() -> None:
                    release()
                    in_place[path].set()

                def registered() -> None:
                    placed()
                    results[path] = {"status": "built"}
                    finished[path].set()

                async def may_register() -> str | None:
                    for dep in drv.input_drvs:
                        if not finished[dep].is_set():  # else no checkpoint: no latency
                            await finished[dep].wait()
                    failed = failed_inputs(path)
                    return f"dependency failed: {_drv_name(failed[0])}" if failed else None

                hooks = Hooks(started[path].set, placed, registered, may_register)

                try:
                    if stop.is_set():
                        results[path] = {
                            "status": "cancelled",
                            "message": "an earlier build failed",
                        }
                        return
                    job = await self._shared_build(
                        path, drv, inputs_of(path), opts, listener, nursery, hooks, reserved
                    )
                finally:
                    release()
                tries = {"attempts": job.attempts, "flaky": job.flaky} if job.attempts else {}
                failed = failed_inputs(path) if job.error is not None else []
                if failed:
                    results[path] = {
                        "status": "dependency-failed",
                        "message": f"dependency failed: {_drv_name(failed[0])}",
                    }
                elif job.error is None:
                    results[path] = {"status": "built", **tries}
                    built.append(path)
                    note = f" on attempt {job.attempts}" if job.attempts > 1 else ""
                    note += " (flaky)" if job.flaky else ""
                    await listener(f"built {_drv_name(path)}{note}", (len(built), len(missing)))
                else:
                    results[path] = {"status": "failed", "message": job.error, **tries}
                    if not opts.keep_going:
                        stop.set()

        with self.wakeups.held() if missing else contextlib.nullcontext():
            async with trio.open_nursery() as nursery:
                for path in order:
                    nursery.start_soon(one, path)
        return [
            {"drv": p, "outputs": {k: o.path for k, o in drvs[p].outputs.items()}, **results[p]}
            for p in roots
        ]

    async def _shared_build(
        self,
        path: str,
        drv: Derivation,
        inputs: Inputs,
        opts: BuildOptions,
        listener: Listener,
        tails: trio.Nursery,
        hooks: Hooks,
        reserved: object | None = None,
    ) -> Job:
        """Build `path`, or wait for the build another request already started.

        `hooks` hear of a build this request runs; of another's, only `spawned` is called
        (at once if its builder runs already).  What follows a build (releasing its locks,
        its history record) goes on in `tails`.  `reserved`: the outputs are locked
        already, by this owner (`_reserve`'s token)."""
        job = self.jobs.get(path)
        if job is None:
            job = self.jobs[path] = Job(path, hooks=hooks)
            job.listeners.append(listener)
            await listener(f"building {_drv_name(path)}", None)

            async def attempt(run: Running, timeout: float, silence: float) -> Failure | None:
                job.run = run
                limits = dataclasses.replace(opts, timeout=timeout, max_silent_time=silence)
                try:
                    await tails.start(self._run, job, drv, inputs, limits, reserved)
                except BuildError as e:
                    return Failure(e.cause, str(e), e.exit_code, (e.exit_code or 0) < 0)
                except (SpawnError, LockError, StoreError) as e:
                    # The sandbox could not be made, the locker died under the build, or the
                    # store refused (an input gone, say): this build fails, the daemon goes on.
                    return Failure(Cause.SETUP, str(e))
                hooks.registered()
                return None

            async def tell(message: str) -> None:
                await _tell(job, message)

            try:
                outcome = await self.retrier.run(
                    path,
                    dict(drv.env),
                    opts.retries,
                    (opts.timeout, opts.max_silent_time),
                    attempt,
                    tell,
                )
                job.attempts, job.flaky = outcome.attempts, outcome.flaky
                if outcome.failure is not None:
                    job.error = outcome.failure.message
            except trio.Cancelled:
                # Whoever else waits for this build must not take it for a success.
                job.error = f"the build of {_drv_name(path)} was cancelled"
                raise
            finally:
                del self.jobs[path]
                # A request that found the outputs missing before this build ended must
                # look again.
                self._found_missing.pop(path, None)
                job.done.set()
        else:
            job.listeners.append(listener)
            if job.spawned:
                hooks.spawned()
            else:
                job.on_spawn.append(hooks.spawned)
            await listener(f"waiting for {_drv_name(path)}, which another client is building", None)
            await job.done.wait()
        return job

    # -- one build ----------------------------------------------------------------------

    async def _run(
        self,
        job: Job,
        drv: Derivation,
        inputs: Inputs,
        opts: BuildOptions,
        reserved: object | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """One attempt; `task_status.started()` once the outputs are registered, before the
        locks are released."""
        outs = [o.path for o in drv.outputs.values()]
        owner = _owner(job.drv_path)
        name = _drv_name(job.drv_path)
        expected = {k: o.hash for k, o in drv.outputs.items() if o.hash}
        loop = trio.lowlevel.current_trio_token()

        def placed(infos: list[PathInfo]) -> None:
            # Dependents start while the registration commits: they register after it.
            inputs.closures.add_outputs(infos)
            loop.run_sync_soon(job.hooks.placed)

        def register(built: dict[str, tuple[str, str]], closure: list[str]) -> None:
            try:
                infos = self.store.add_outputs(
                    job.drv_path, built, closure, expected, move=_movable(drv), placed=placed
                )
            except Exception as e:
                cause = Cause.HASH_MISMATCH if isinstance(e, HashMismatch) else Cause.REFUSED
                raise BuildError(f"outputs of '{name}' refused: {e}", cause) from None
            # Those placed are known already; only outputs valid before need adding.
            if inputs.closures.known(i.path for i in infos) is None:
                inputs.closures.add_outputs(infos)
            unlink_lock_files()

        def unlink_lock_files() -> None:
            # As Nix does, once the outputs are valid and while still locked, here in the
            # worker thread already at work: the release then has no file to delete.
            for lock_file in _lock_files(drv):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock_file)

        present: list[str] = []

        def needed() -> bool:
            # Under the locks: another process may have made the outputs meanwhile.
            if self.store.valid_paths(outs) == set(outs):
                unlink_lock_files()
                return False
            if drv.is_fixed_output:
                found = self.store.path_with_hash(expected["out"])
                if found is not None:
                    # The content is already in the store: no need to fetch it again.
                    register({"out": (found, outs[0])}, [])
                    present.append(found)
                    return False
            return True

        done = False

        def registered() -> None:
            nonlocal done
            done = True
            task_status.started()

        # Outputs found missing under the locks taken ahead need no second look.
        checked = reserved is not None and self._found_missing.get(job.drv_path) is reserved
        try:
            locked = (
                contextlib.nullcontext()
                if reserved is not None
                else self.locks.exclusive(_lock_files(drv), owner, delete=True)
            )
            async with locked:
                await self._in_slot(
                    job, drv, inputs, opts, register, registered, None if checked else needed
                )
            if present:
                await _tell(job, f"{name}: content already in the store as {present[0]}")
        except (LockError, OSError) as e:
            if not done:
                raise
            # The outputs are registered: a locker lost, or a lock file that would not go,
            # costs the build nothing now.
            logger.warning("%s: after the build: %s", owner, e)

    async def _in_slot(
        self,
        job: Job,
        drv: Derivation,
        inputs: Inputs,
        opts: BuildOptions,
        finish: Finish,
        finished: Callable[[], None] = _nothing,
        needed: Callable[[], bool] | None = None,
    ) -> None:
        slot = await self._take_slot()
        try:
            log = await self._run_in_slot(job, drv, inputs, opts, slot, finish, finished, needed)
        finally:
            # The slot freed last is taken first: its directories and mount points are
            # there already, where a slot not used for a while would have them made anew.
            self._free_slots.appendleft(slot)
            self._slot_lot.unpark()
        if log is not None:
            # A successful build's log is stored once its dependents went on and its slot
            # is free: making a file is sometimes slow on a busy disk.
            try:
                await trio.to_thread.run_sync(
                    self.cpus.background(self._store_log), job.drv_path, log
                )
            except OSError as e:
                logger.warning("%s: storing the log: %s", job.drv_path, e)

    async def check(
        self,
        path: str,
        drv: Derivation,
        inputs: Inputs,
        opts: BuildOptions,
        listener: Listener,
    ) -> dict[str, object]:
        """Build a valid derivation again and compare, bit for bit, with what is registered."""
        job = Job(path, listeners=[listener])
        differs: list[str] = []

        def compare(built: dict[str, tuple[str, str]], closure: list[str]) -> None:
            for out_name, (left, registered) in built.items():
                info = self.store.path_info(registered)
                got, _ = hash_path(left)
                if info is None or got != info.nar_hash:
                    differs.append(out_name)

        await listener(f"checking {_drv_name(path)}", None)
        try:
            async with (
                self.scheduler.slot(path) as job.run,
                self.locks.exclusive(_lock_files(drv), f"check:{path}", delete=True),
            ):
                await self._in_slot(job, drv, inputs, opts, compare)
        except BuildError as e:
            return {"status": "failed", "message": str(e)}
        if differs:
            return {
                "status": "checked",
                "identical": False,
                "message": f"{_drv_name(path)}: output {', '.join(differs)} differs "
                "from the registered one",
            }
        return {"status": "checked", "identical": True}

    async def repair(self, drv_path: str, listener: Listener) -> str | None:
        """Build `drv_path` again and put its outputs in place of the registered ones
        (corrupt or missing).  Returns why it could not, or None."""
        owner = PinOwner(f"repair of {_drv_name(drv_path)}")
        try:
            load = functools.partial(self._load, [drv_path])
            drvs, _ = await self._pinned(owner, [drv_path], load)
            drv = drvs[drv_path]
            inputs = Inputs([*_inputs(drvs, drv_path), *drv.input_srcs], Closures(self.store))
            outs = [o.path for o in drv.outputs.values()]
            valid = functools.partial(self.store.valid_paths, inputs.paths)
            present = await self._pinned(owner, [*inputs.paths, *outs], valid)
            absent = [p for p in inputs.paths if p not in present]
            if absent:
                return f"its input {absent[0]} is not valid: build it first"
            expected = {k: o.hash for k, o in drv.outputs.items() if o.hash}

            def replace(built: dict[str, tuple[str, str]], closure: list[str]) -> None:
                self.store.add_outputs(
                    drv_path, built, closure, expected, repair=True, move=_movable(drv)
                )

            await listener(f"repairing {_drv_name(drv_path)}", None)
            job = Job(drv_path, listeners=[listener])
            async with (
                self.scheduler.slot(drv_path) as job.run,
                self.locks.exclusive(_lock_files(drv), str(owner), delete=True),
            ):
                await self._in_slot(job, drv, inputs, BuildOptions(max_jobs=1), replace)
        except (BuildError, SpawnError, LockError, StoreError, DerivationError) as e:
            return str(e)
        finally:
            self.store.pins.release(owner)
        return None

    async def _reserve(
        self,
        stack: contextlib.AsyncExitStack,
        path: str,
        drv: Derivation,
        started: dict[str, trio.Event],
    ) -> object | None:
        """Lock `path`'s outputs while its inputs build, held until `stack` closes, and
        look whether they are still missing: on a chain, each build then starts without
        the locker's round trip or a look at the database.  Only once every input's
        builder runs (the daemon has time then, and no lock is held long for nothing), and
        only without waiting: if another owner holds one, the build locks the usual way
        (None is returned).  Else a token: `_found_missing` has it while what was found
        still holds."""
        for dep in drv.input_drvs:
            await started[dep].wait()
        try:
            await stack.enter_async_context(
                self.locks.exclusive(_lock_files(drv), _owner(path), wait=False, delete=True)
            )
        except LockError:
            return None
        token = object()
        if drv.is_fixed_output:
            # Its content may be in the store under another name: the build looks.
            return token

        def forget() -> None:
            if self._found_missing.get(path) is token:
                del self._found_missing[path]

        # Set before looking, so that a build of it ending meanwhile clears it.
        self._found_missing[path] = token
        stack.callback(forget)
        outs = [o.path for o in drv.outputs.values()]
        if len(await trio.to_thread.run_sync(self.store.valid_paths, outs)) == len(outs):
            forget()
        return token

    async def _take_slot(self) -> int:
        while not self._free_slots:
            await self._slot_lot.park()
        return self._free_slots.popleft()

    async def _run_in_slot(
        self,
        job: Job,
        drv: Derivation,
        inputs: Inputs,
        opts: BuildOptions,
        slot: int,
        finish: Finish,
        finished: Callable[[], None],
        needed: Callable[[], bool] | None,
    ) -> bytes | None:
        """Run the builder, unless `needed` (if given, called first, in a worker thread)
        says otherwise; hand what it left to `finish` (in a worker thread, which then
        readies the slot for the next build), say so to `finished` and return its log, to
        be stored; or, if it failed, keep the build dir if asked, store the log and ready
        the slot."""
        uid, gid = build_ids(slot, self.settings.build_uid_base, self.settings.build_slots)
        work = self.builds_dir / str(slot)
        freezer = self.freezer
        ready = slot in self._ready
        self._ready.discard(slot)
        closure = inputs.closures.known(inputs.paths)

        def prepare() -> list[str] | None:
            # One worker-thread trip for all of it, and none when the slot is ready, the
            # closure known and the outputs known missing: on a chain, each trip is
            # latency.
            if needed is not None and not needed():
                return None
            closure = inputs.closures.compute(inputs.paths)
            if not ready:
                _prepare_workdir(work, self.store.store_dir, uid, gid, _mount_points(closure))
            return closure

        if needed is not None or not ready or closure is None:
            closure = await trio.to_thread.run_sync(prepare)
            if closure is None:
                if ready:
                    self._ready.add(slot)
                finished()
                return None
        mount_points = _mount_points(closure)
        request = SpawnRequest(
            builder=drv.builder,
            args=list(drv.args),
            env=self._environment(drv),
            root=str(work / "root"),
            build_dir=str(work / "build"),
            store_dir=self.store.store_dir,
            host_uid=uid,
            host_gid=gid,
            inputs=closure,
            sandbox_paths=list(self.settings.sandbox_paths),
            network=drv.is_fixed_output,
            reuse_network=self.settings.reuse_network_namespaces,
            freezer=str(freezer.base) if freezer else "",
        )
        read_end, write_end = os.pipe()
        log = _LogTail()
        ran = cleared = False
        proc: Process | None = None

        def ready_slot() -> None:
            # Emptied but for the mount points of this build's inputs, which the next
            # build may share.
            if freezer and proc is not None and proc.cgroup and proc.returncode is not None:
                freezer.remove(proc.cgroup)
            _prepare_workdir(work, self.store.store_dir, uid, gid, mount_points)
            self._ready.add(slot)

        def wrap_up() -> None:
            try:
                if ran:
                    self._store_log(job.drv_path, log.data)
            finally:
                ready_slot()

        def finish_and_ready_slot() -> None:
            # One trip, nothing else running beside it: a build's dependents wait for it.
            nonlocal cleared
            finish(built, closure)
            cleared = True
            try:
                ready_slot()
            except OSError as e:
                logger.warning("%s: after the build: %s", job.drv_path, e)

        try:
            try:
                proc = await self.spawner.spawn(request, write_end)
            finally:
                os.close(write_end)
            job.running()
            freeze = None
            if freezer is not None and proc.cgroup:
                freeze = functools.partial(freezer.freeze, proc.cgroup)
            code, why, cause = await self._supervise(job, proc, read_end, log, opts, freeze)
            read_end = -1
            ran = True
            name = _drv_name(job.drv_path)
            if why:
                raise BuildError(f"builder for '{name}' {why}{log.tail()}", cause, code)
            if code != 0:
                message = f"builder for '{name}' failed with exit code {code}{log.tail()}"
                raise BuildError(message, Cause.EXIT, code)
            built: dict[str, tuple[str, str]] = {}
            for out_name, out in drv.outputs.items():
                left = work / "root" / out.path.lstrip("/")
                if not os.path.lexists(left):
                    raise BuildError(
                        f"builder for '{name}' did not produce output "
                        f"'{out_name}' ({out.path}){log.tail()}",
                        Cause.MISSING_OUTPUT,
                    )
                built[out_name] = (str(left), out.path)
            if (objection := await job.hooks.may_register()) is not None:
                raise BuildError(f"outputs of '{name}' refused: {objection}", Cause.DEPENDENCY)
            await trio.to_thread.run_sync(self.cpus.spread(finish_and_ready_slot))
            if job.run is not None:
                job.run.succeeded = True
            finished()
            return log.data
        except BuildError as e:
            if opts.keep_failed_for is not None:
                kept = await trio.to_thread.run_sync(
                    keep_failed,
                    work / "build",
                    uid,
                    _drv_name(job.drv_path),
                    *opts.keep_failed_for,
                )
                raise BuildError(
                    f"{e}\nthe build dir is kept at {kept}", e.cause, e.exit_code
                ) from None
            raise
        finally:
            if read_end >= 0:
                os.close(read_end)
            if not cleared:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(wrap_up)

    async def _supervise(
        self,
        job: Job,
        proc: Process,
        fd: int,
        log: "_LogTail",
        opts: BuildOptions,
        freeze: Callable[[bool], None] | None = None,
    ) -> tuple[int, str, Cause]:
        """Stream the log until EOF while waiting for the builder, within the limits."""
        why = ""
        cause = Cause.EXIT
        silent = trio.CancelScope(deadline=trio.current_time() + opts.max_silent_time)
        deadline = trio.CancelScope(deadline=trio.current_time() + opts.timeout)

        async def pump() -> None:
            nonlocal why, cause
            stream = trio.lowlevel.FdStream(fd)
            async with stream:
                while chunk := await stream.receive_some(65536):
                    silent.deadline = trio.current_time() + opts.max_silent_time
                    for line in log.add(chunk):
                        await _tell(job, f"{_drv_name(job.drv_path)}> {line}")
                    if log.size > opts.max_log_size:
                        why = f"exceeded the log size limit of {opts.max_log_size} bytes"
                        cause = Cause.LOG_LIMIT
                        proc.kill()
                        break

        # A paused build's deadlines are set aside by the scheduler while it is paused.
        if job.run is not None:
            job.run.watch(proc, [deadline, silent], freeze)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump)
                try:
                    with deadline, silent:
                        code = await proc.wait()
                except trio.Cancelled:
                    # The client went away or the daemon is stopping: the whole sandbox dies.
                    proc.kill()
                    raise
                if why:
                    pass
                elif deadline.cancelled_caught:
                    why, cause = f"timed out after {opts.timeout:g} s", Cause.TIMEOUT
                elif silent.cancelled_caught:
                    why, cause = f"was silent for {opts.max_silent_time:g} s", Cause.SILENT
                if deadline.cancelled_caught or silent.cancelled_caught:
                    proc.kill()
                    code = await proc.wait()
        finally:
            if job.run is not None:
                job.run.unwatch()
        return code, why, cause

    def _environment(self, drv: Derivation) -> dict[str, str]:
        env = {
            "PATH": "/path-not-set",
            "HOME": "/homeless-shelter",
            "NIX_STORE": self.store.store_dir,
            "NIX_BUILD_TOP": "/build",
            "NIX_BUILD_CORES": self._cores,
            "TMPDIR": "/build",
            "TEMPDIR": "/build",
            "TMP": "/build",
            "TEMP": "/build",
            "PWD": "/build",
        }
        env.update(drv.env)
        return env

    def _store_log(self, drv_path: str, data: bytes) -> None:
        path = self.state.log_dir / f"{os.path.basename(drv_path)}.gz"
        tmp = path.with_suffix(".gz.tmp")
        # Compressed in one call, gzip header and all (wbits 31): a GzipFile costs more
        # than the compression of most logs.
        view = memoryview(zlib.compress(data, 6, 31))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def read_log(self, drv_path: str) -> bytes:
        path = self.state.log_dir / f"{os.path.basename(drv_path)}.gz"
        with gzip.open(path, "rb") as f:
            return f.read()


async def _tell(job: Job, message: str) -> None:
    """Pass a log line to every client waiting on the build; one that has gone is dropped."""
    for listener in list(job.listeners):
        try:
            await listener(message, None)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            job.listeners.remove(listener)


class _LogTail:
    """The build log so far (for the log file) and its last lines (for the error)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self._partial = b""
        self.lines: deque[str] = deque(maxlen=LOG_TAIL)

    def add(self, chunk: bytes) -> list[str]:
        self.chunks.append(chunk)
        self.size += len(chunk)
        *complete, self._partial = (self._partial + chunk).split(b"\n")
        lines = [line.decode(errors="replace") for line in complete]
        self.lines.extend(lines)
        return lines

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def tail(self) -> str:
        lines = list(self.lines) + (
            [self._partial.decode(errors="replace")] if self._partial else []
        )
        if not lines:
            return ""
        return f"; last {len(lines[-LOG_TAIL:])} log lines:\n" + "\n".join(
            f"  {line}" for line in lines[-LOG_TAIL:]
        )


def _mount_points(closure: list[str]) -> set[str]:
    return {os.path.basename(p) for p in closure}


def _prepare_workdir(
    work: Path, store_dir: str, uid: int, gid: int, keep: Collection[str] = ()
) -> None:
    """A slot's directory, kept from build to build: what a build leaves (in `build/`, and
    in the root's store dir but the mount points named `keep`) is emptied.  Only what is
    missing or wrong is written: this disk is sometimes slow at any change of metadata."""
    _own_dir(work.parent, 0o700)
    _own_dir(work, 0o700)
    _own_dir(work / "root", 0o755)
    _clear_workdir(work, store_dir, keep)
    build = work / "build"
    if build.is_dir() and os.listxattr(build, follow_symlinks=False):
        # ACLs or attributes the last builder set on its /build: not for the next one.
        remove_tree(build)
    _own_dir(build, 0o700, uid, gid)


def _own_dir(path: Path, mode: int, uid: int = -1, gid: int = -1) -> None:
    """A directory at `path` with `mode` (and owner, if given), made or fixed if needed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        # Builds in other slots may make the same parents at the same time.
        path.mkdir(mode=mode, parents=True, exist_ok=True)
        st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        remove_tree(path)
        path.mkdir(mode=mode)
        st = os.lstat(path)
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)
    if (uid, gid) != (-1, -1) and (st.st_uid, st.st_gid) != (uid, gid):
        os.chown(path, uid, gid)


def _clear_workdir(work: Path, store_dir: str, keep: Collection[str] = ()) -> None:
    """Empty the build dir, and the root's store dir but for the entries named `keep`: the
    mount points of inputs (the spawner checks them before it mounts on them again)."""
    for where, kept in ((work / "build", ()), (work / "root" / store_dir.lstrip("/"), keep)):
        if where.is_dir() and not where.is_symlink():
            for name in os.listdir(where):
                if name not in kept:
                    remove_tree(where / name)

"""One build request's walk of its graph: what is missing, built in dependency order, in
parallel.

`GraphRun.run` pins and loads the requested derivations and everything they need, and
finds which outputs are missing, in one worker-thread trip (`derivations.py`); collects
garbage first if space is low; settles at once, as valid, the derivations present with
nothing missing below them (a request with nothing to build starts no task); then runs
one task per other derivation: each waits for its inputs, then for a place among the
request's `-j`, and builds (or waits for another request's build of it, `shared.py`),
checks it again (`--check`, `rebuild.py`), or finds it valid.  A failed
build stops the builds not started yet, unless `keep_going`; its dependents fail as
"dependency failed", naming it by its .drv path.  Everything the request reads or makes
stays pinned until it is over, so a concurrent collection never takes an input, or an
output just registered.
"""

import contextlib
import functools

import trio

from daemon.build.attempt import Inputs
from daemon.build.closures import Closures
from daemon.build.derivations import Graph, pinned
from daemon.build.events import Built, Listener, Note
from daemon.build.job import Job
from daemon.build.rebuild import check
from daemon.build.request import BuildOptions, Outcome, Result, State
from daemon.build.room import Room
from daemon.build.shared import Jobs
from store.derivation import drv_name
from store.pins import PinOwner

# What a derivation present with nothing to build ends as: one for all.
_VALID = Outcome(State.VALID)


def _dependency_failed(dep: str, its: Outcome) -> Outcome:
    """A derivation not built because its input `dep` ended as `its`: the message names
    the derivation that broke, by its .drv path, and says why (its exit code, its log's
    last lines), since only the requested roots' own results reach the user."""
    if its.state is State.DEPENDENCY_FAILED:
        return Outcome(State.DEPENDENCY_FAILED, its.message)  # the same broken derivation
    why = f": {its.message}" if its.message else ""
    verb = "was cancelled" if its.state is State.CANCELLED else "failed"
    return Outcome(State.DEPENDENCY_FAILED, f"dependency '{dep}' {verb}{why}")


class _Place:
    """A build's place among its request's `-j`: given back once its outputs are
    registered, or when it ends."""

    def __init__(self, limiter: trio.CapacityLimiter) -> None:
        self._limiter = limiter

    async def take(self) -> None:
        try:
            # No checkpoint when a place is free: on a chain, each is latency.
            self._limiter.acquire_on_behalf_of_nowait(self)
        except trio.WouldBlock:
            await self._limiter.acquire_on_behalf_of(self)

    def give_back(self) -> None:
        if self in self._limiter.statistics().borrowers:
            self._limiter.release_on_behalf_of(self)


class _Hooks:
    """What the request hears of one of its derivations' build (`job.Hooks`)."""

    def __init__(self, run: "GraphRun", path: str, place: _Place) -> None:
        self._run = run
        self._path = path
        self._place = place

    def registered(self) -> None:
        self._place.give_back()
        self._run.outcomes[self._path] = Outcome(State.BUILT)
        self._run.finished[self._path].set()


class GraphRun:
    def __init__(
        self, room: Room, jobs: Jobs, roots: list[str], opts: BuildOptions, listener: Listener
    ) -> None:
        self.room = room
        self.jobs = jobs
        self.roots = roots
        self.opts = opts
        self.listener = listener
        self.owner = PinOwner(f"build of {', '.join(map(drv_name, roots))}")
        self.graph = Graph({}, [])
        self.missing: set[str] = set()
        self.outcomes: dict[str, Outcome] = {}
        self.built = 0
        # Set once a derivation is settled: built and registered, failed, or given up.
        self.finished: dict[str, trio.Event] = {}
        self.stop = trio.Event()  # a build failed, and not keep_going
        self._places = trio.CapacityLimiter(max(1, opts.max_jobs))
        self._closures = Closures(room.store)

    async def run(self) -> list[Result]:
        try:
            await self._load()
            await self._make_room()
            present = len(self.graph.order) - len(self.missing)
            note = f"{len(self.missing)} derivations to build, {present} present"
            await self.listener(Note(note, done=0, total=len(self.missing)))
            waiting = self._settle_present()
            with self.room.wakeups.held() if self.missing else contextlib.nullcontext():
                async with trio.open_nursery() as nursery:
                    for path in waiting:
                        nursery.start_soon(self._one, path, nursery)
            return self._results()
        finally:
            self.room.store.pins.release(self.owner)

    async def _load(self) -> None:
        """The graph, and what of it is missing: one worker-thread trip, one query."""
        store, owner = self.room.store, self.owner
        pin = functools.partial(store.pins.pin, owner)
        load = functools.partial(self.room.derivations.load, self.roots, pin)
        self.graph = graph = await pinned(store, owner, self.roots, load)
        self.finished = {p: trio.Event() for p in graph.order}
        drvs = graph.drvs
        self.missing = {
            p
            for p in graph.order
            if any(o.path not in graph.valid for o in drvs[p].outputs.values())
        }

    def _settle_present(self) -> list[str]:
        """Settle now, as valid, the derivations with nothing to wait for: present, not
        checked again, and nothing missing among their inputs, all the way down (a
        request with nothing to build starts no task).  The rest, inputs first."""
        waiting: list[str] = []
        waits: set[str] = set()
        checked = set(self.roots) if self.opts.check else set()
        for path in self.graph.order:
            inputs = self.graph.drvs[path].input_drvs
            if path in self.missing or path in checked or not waits.isdisjoint(inputs):
                waits.add(path)
                waiting.append(path)
            else:
                self.outcomes[path] = _VALID
                self.finished[path].set()
        return waiting

    async def _make_room(self) -> None:
        """Collect garbage first if free space is low (`min-free`)."""
        if not self.missing or self.room.collector is None:
            return
        freed = await self.room.collector.auto_collect()
        if freed is not None:
            await self.listener(
                Note(
                    f"free space was low: collected {len(freed.deleted)} paths, "
                    f"{freed.bytes_freed} bytes"
                )
            )

    async def _one(self, path: str, tails: trio.Nursery) -> None:
        """Settle one derivation, in a task of its own; what follows its build goes on in
        `tails`."""
        try:
            await self._settle(path, tails)
        finally:
            self.outcomes.setdefault(path, Outcome(State.CANCELLED))
            self.finished[path].set()

    async def _settle(self, path: str, tails: trio.Nursery) -> None:
        for dep in self.graph.drvs[path].input_drvs:
            await self.finished[dep].wait()
        failed = self.failed_inputs(path)
        if failed:
            self.outcomes[path] = _dependency_failed(failed[0], self.outcomes[failed[0]])
        elif path not in self.missing and self.opts.check and path in self.roots:
            inputs = self._inputs(path)
            drv = self.graph.drvs[path]
            self.outcomes[path] = await check(
                self.room, path, drv, inputs, self.opts, self.listener
            )
        elif path not in self.missing:
            self.outcomes[path] = _VALID
        else:
            await self._build(path, tails)

    async def _build(self, path: str, tails: trio.Nursery) -> None:
        # Dependents go on once the outputs are registered: the locks' release and the
        # history record follow off their path.
        place = _Place(self._places)
        await place.take()
        try:
            if self.stop.is_set():
                self.outcomes[path] = Outcome(State.CANCELLED, "an earlier build failed")
                return
            job = await self.jobs.build(
                path,
                self.graph.drvs[path],
                self._inputs(path),
                self.opts,
                self.listener,
                tails,
                _Hooks(self, path, place),
            )
        finally:
            place.give_back()
        await self._built(path, job)

    async def _built(self, path: str, job: Job) -> None:
        """Settle `path` by its job's end."""
        failed = self.failed_inputs(path) if job.error is not None else []
        if failed:
            self.outcomes[path] = _dependency_failed(failed[0], self.outcomes[failed[0]])
        elif job.error is None:
            self.outcomes[path] = Outcome(State.BUILT, None, job.attempts, job.flaky)
            self.built += 1
            built = Built(path, job.attempts, job.flaky, self.built, len(self.missing))
            await self.listener(built)
        else:
            self.outcomes[path] = Outcome(State.FAILED, job.error, job.attempts, job.flaky)
            if not self.opts.keep_going:
                self.stop.set()

    def failed_inputs(self, path: str) -> list[str]:
        """`path`'s inputs that failed."""
        outcomes = self.outcomes
        return [
            d
            for d in self.graph.drvs[path].input_drvs
            if d in outcomes and not outcomes[d].state.succeeded
        ]

    def _inputs(self, path: str) -> Inputs:
        return Inputs(self.graph.inputs(path), self._closures)

    def _results(self) -> list[Result]:
        drvs = self.graph.drvs
        return [
            Result(p, {k: o.path for k, o in drvs[p].outputs.items()}, self.outcomes[p])
            for p in self.roots
        ]

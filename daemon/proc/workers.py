"""Where the daemon's blocking calls run: worker threads, each kind with its CPU policy.

Nothing slow runs on the event loop.  Every call into the store that may run long goes
through one of four methods here, which pick where it runs (`cpus.py` says why):

- `long`: the daemon's own work on store contents at length (a build's outputs
  registered, a collection's deletions): spread over every CPU the daemon was allowed
  while it lasts, so that it neither waits for the loop nor makes the loop wait;
- `client`: the same for store work a client asked for (a dump, verify, optimise), at
  most `CLIENT_CALLS` at once;
- `feed`: work that waits on what a client supplies (an upload's bytes, the files
  `add-from-path` reads as the client), in a pool of its own of `FEED_CALLS`: a client
  can stall such a call (a trickle of bytes, a FUSE file that never answers), and
  stalled ones must take no thread that queries, builds or other work need;
- `background`: work off the path of any build: at the lowest priority, so that the
  loop takes the shared CPU back at once;
- `batched`: background work that many callers hand in, each build its log and its
  history record: what arrives while a trip runs goes in the next, and each kind of
  work in a batch is one call for all of it (one transaction for every record).  A
  caller that knows more will come (other builds are running) lets its call wait for
  them a little (`LINGER`).  On a run of short builds that is one trip, and one write
  of the database, for several builds instead of two trips for each.

Short look-ups (path info, validity) go to `trio.to_thread.run_sync` directly, or in
batches through `rpc/batcher.py`: they take less time than moving a thread would.
"""

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, TypeVarTuple, Unpack

import trio

from daemon.proc.cpus import UNSHARED, Cpus

T = TypeVar("T")
A = TypeVar("A")
Ts = TypeVarTuple("Ts")
log = logging.getLogger("weft.daemon")
# A batch's work of one kind: the arguments of its callers, in order, in; their results,
# in the same order, out.
Many = Callable[[list[A]], Sequence[T]]
# Long store calls clients may have running at once: with trio's own pool of 40 threads
# (queries, builds, collections), more than two CPUs' worth of disk work each way.
CLIENT_CALLS = 16
# Calls waiting on clients' data at once.  Each is a thread, mostly asleep: 16 let that
# many uploads stream in parallel, which a disk cannot outrun, and 40 stalled uploaders
# (the attack that once took every thread of trio's pool) take none of the others'.
FEED_CALLS = 16
# How long a batched call may wait for company, when its caller says more is coming.
# Evaluating and building 201 trivial derivations at -j2 (bench/eval_bench.py, whole
# command, alternated rounds): a trip for each build's record and log took 6% more time
# than waits of 10 ms, and those 2.5-3.7% more than waits of 30 ms, which gather some six
# builds'; 100 ms gained nothing more.  Nothing a build's dependents need waits for these
# calls, and the last build's call does not wait (no other build runs).
LINGER = 0.030


class Workers:
    def __init__(
        self, cpus: Cpus = UNSHARED, client_calls: int = CLIENT_CALLS, feed_calls: int = FEED_CALLS
    ) -> None:
        self.cpus = cpus
        self._clients = trio.CapacityLimiter(client_calls)
        self._feeds = trio.CapacityLimiter(feed_calls)
        self._batches = Batches(self.background)

    async def long(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        return await trio.to_thread.run_sync(self.cpus.spread(fn), *args)

    async def client(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        return await trio.to_thread.run_sync(self.cpus.spread(fn), *args, limiter=self._clients)

    async def feed(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        return await trio.to_thread.run_sync(self.cpus.spread(fn), *args, limiter=self._feeds)

    async def background(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        return await trio.to_thread.run_sync(self.cpus.background(fn), *args)

    async def batched(self, many: "Many[A, T]", arg: A, linger: bool = False) -> T:
        """`many([arg, ...])`'s result for `arg`, in the background, in one trip with
        whatever else waits; what `many` raised, raised to each of its callers.  With
        `linger`, the trip may wait for more calls (`LINGER`)."""
        return await self._batches.call(many, arg, linger)


class BatchAbandoned(Exception):
    """The daemon stopped before the batch holding this call ran."""


@dataclass
class _Call(Generic[A, T]):
    arg: A
    done: trio.Event = field(default_factory=trio.Event)
    result: T | None = None
    error: BaseException | None = None


class Batches:
    """Calls waiting for the next trip, by kind.  Each caller waits for its own call;
    the queue holds one call per waiting caller, so it is bounded by what may call
    (a call per running build).  The trips run in a trio system task, so that no
    caller's cancellation drops the others' work (a cancelled caller's own call runs
    all the same, as a thread already started would); nothing leaves it but its
    cancellation when the daemon stops.  A trip whose calls all linger waits for more
    until `LINGER` has passed or a call that does not linger comes."""

    def __init__(self, trip: Callable[..., Awaitable[None]]) -> None:
        self._trip = trip  # `trip(fn, arg)`: `fn(arg)` in a worker thread
        self._waiting: dict[Many[Any, Any], list[_Call[Any, Any]]] = {}
        self._draining = False
        self._go = trio.Event()  # set by a call for the next trip that does not linger

    async def call(self, many: "Many[A, T]", arg: A, linger: bool = False) -> T:
        call: _Call[A, T] = _Call(arg)
        self._waiting.setdefault(many, []).append(call)
        if not linger:
            self._go.set()
        if not self._draining:
            self._draining = True
            trio.lowlevel.spawn_system_task(self._drain)
        await call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[return-value]

    async def _drain(self) -> None:
        batch: dict[Many[Any, Any], list[_Call[Any, Any]]] = {}
        try:
            while self._waiting:
                # One round of the loop first: what the tasks that run in it hand in (a
                # build's record, then its log) goes in this batch.
                await trio.lowlevel.checkpoint()
                if not self._go.is_set():
                    with trio.move_on_after(LINGER):
                        await self._go.wait()
                batch, self._waiting = self._waiting, {}
                self._go = trio.Event()
                await self._trip(_run_batch, batch)
                _tell(batch)
                batch = {}
        finally:
            self._draining = False
            left = [*batch.values(), *self._waiting.values()]
            self._waiting = {}
            for calls in left:
                for call in calls:
                    call.error = BatchAbandoned("the daemon stopped before it ran")
                    call.done.set()


def _run_batch(batch: "dict[Many[Any, Any], list[_Call[Any, Any]]]") -> None:
    """Each kind's call, in a worker thread; nothing raised leaves it."""
    for many, calls in batch.items():
        try:
            results = many([c.arg for c in calls])
            if len(results) != len(calls):
                raise ValueError(f"{many!r} answered {len(results)} of {len(calls)} calls")
        except Exception as e:
            log.debug("batched %r failed: %s", many, e)
            for c in calls:
                c.error = e
            continue
        for c, result in zip(calls, results, strict=True):
            c.result = result


def _tell(batch: "dict[Many[Any, Any], list[_Call[Any, Any]]]") -> None:
    for calls in batch.values():
        for call in calls:
            call.done.set()

"""The one CPU the daemon's threads and the locker share, and the work that leaves it.

The daemon's Python runs one thread at a time, and on each build it hands work back and
forth between the event loop, worker threads and the locker a dozen times.  A hand-off
to a thread on another CPU costs that CPU an interrupt and, when it is idle (on a virtual
machine: halted), a wake-up first: 30-140 µs measured on the 2-core VM of
`bench/RESULTS.md`, against 4 µs on the same CPU.  So, unless `share-cpu = false`, the
daemon's threads and the locker run on one CPU, the one the daemon started on; the
spawner, and so every builder, keeps all the CPUs the daemon was allowed.  Work that
reads or writes store contents at length (a build's outputs, an upload, `verify`,
`optimise`) spreads to all of them while it runs (`Cpus.spread`): it then neither waits
for the loop nor makes the loop wait.  Work off the path of any build (a build's log
stored, its history record) runs at the lowest priority while it lasts
(`Cpus.background`): on the shared CPU, the loop takes the CPU back from it as soon as it
has work, where at the same priority it would wait for the worker's time slice to end.
Affinity and priority are only hints here: a call the kernel refuses (a CPU taken
offline, say) changes nothing else.
"""

import contextlib
import functools
import os
import resource
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")
LOWEST = 19  # nice


@dataclass(frozen=True)
class Cpus:
    allowed: frozenset[int] = frozenset()  # what the daemon was allowed when it started
    home: int | None = None  # the CPU its threads and the locker share; None: no sharing
    # Whether a worker thread may lower its priority and take it back after (root may,
    # and whoever RLIMIT_NICE lets): else `background` leaves it alone.
    renice: bool = False

    @classmethod
    def plan(cls, share: bool) -> "Cpus":
        allowed = frozenset(os.sched_getaffinity(0))
        if not share or len(allowed) < 2:
            return cls(allowed)
        here = current_cpu()
        return cls(allowed, here if here in allowed else min(allowed), _may_renice())

    def settle(self) -> None:
        """Move the calling thread home, before it starts the threads that will follow it."""
        if self.home is not None:
            _set_affinity(0, {self.home})

    def for_helper(self, shares: bool) -> frozenset[int] | None:
        """Where a helper runs: the locker shares the daemon's CPU, the spawner gets all of
        them (None: wherever it was started)."""
        if self.home is None:
            return None
        return frozenset({self.home}) if shares else self.allowed

    def spread(self, fn: Callable[P, T]) -> Callable[P, T]:
        """`fn`, run by a worker thread on all allowed CPUs, and back home after."""
        if self.home is None:
            return fn
        home = {self.home}

        @functools.wraps(fn)
        def spread_out(*args: P.args, **kwargs: P.kwargs) -> T:
            _set_affinity(0, self.allowed)
            try:
                return fn(*args, **kwargs)
            finally:
                _set_affinity(0, home)

        return spread_out

    def background(self, fn: Callable[P, T]) -> Callable[P, T]:
        """`fn`, run by a worker thread at the lowest priority, and at its own after."""
        if self.home is None or not self.renice:
            return fn

        @functools.wraps(fn)
        def yielding(*args: P.args, **kwargs: P.kwargs) -> T:
            thread = threading.get_native_id()
            own = os.getpriority(os.PRIO_PROCESS, thread)
            _set_nice(thread, LOWEST)
            try:
                return fn(*args, **kwargs)
            finally:
                _set_nice(thread, own)

        return yielding


# Every thread anywhere: for library users, tests and the daemon with `share-cpu = false`.
UNSHARED = Cpus()


def place(pid: int, cpus: Collection[int] | None) -> None:
    """Set a started process's CPUs, if given."""
    if cpus is not None:
        _set_affinity(pid, cpus)


def current_cpu() -> int:
    """The CPU the calling thread runs on (field 39 of its stat line)."""
    with open("/proc/thread-self/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[36])


def _set_affinity(pid: int, cpus: Collection[int]) -> None:
    with contextlib.suppress(OSError):
        os.sched_setaffinity(pid, cpus)


def _may_renice() -> bool:
    """Whether this process may take back its priority once lowered: root may, others as
    far as RLIMIT_NICE lets them (down to nice 20 - limit)."""
    if os.geteuid() == 0:
        return True
    limit = resource.getrlimit(resource.RLIMIT_NICE)[0]
    return limit == resource.RLIM_INFINITY or 20 - limit <= os.getpriority(os.PRIO_PROCESS, 0)


def _set_nice(thread: int, nice: int) -> None:
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, thread, nice)

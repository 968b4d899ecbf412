"""The trio side of load-adaptive scheduling: who runs, who waits, who is paused.

`Scheduler.slot` is where every build waits for its turn (`admission.py` decides);
`on_sample`, called by the load monitor about once a second, adapts the parallelism,
notes each running build's peak load and parallelism, pauses the newest build under
memory pressure and resumes it when the pressure falls, and wakes the waiting builds.

A build whose `on-pause` scope is `data` (docs/snapshots.md) is evicted instead of
paused: its builder is killed, which frees its memory and, once its attempt has kept its
durable directories, its slots.  Its next attempt waits here (`slot(evicted=True)`) until
the pressure that evicted it has fallen as a paused build's would have to
(`Admission.to_resume`): one such build is let in per sample, oldest first.  While one
waits or has been let in, a new build does not take the moment nothing runs: that moment
is what lets an evicted build in, and a stream of new builds would otherwise keep it out.

A paused build's time limits are suspended: its timeout and silence deadlines are set
aside when it stops and given back, whatever was left of them, when it resumes.  How a
build is paused is the `Pauser`'s business (`pauser.py`): its cgroup frozen, or signals.
"""

import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from daemon.proc.processes import Process
from daemon.sched.admission import Admission
from daemon.sched.loadsignals import LoadMonitor, LoadSample, peak
from daemon.sched.pauser import Pauser
from daemon.sched.sigstop import SIGNALS


@dataclass
class Running:
    """A build holding a slot; the builds layer attaches its process and deadlines."""

    drv: str
    attempt: int
    cap: int | None
    started: float  # seconds since the epoch
    load_start: LoadSample
    load_peak: LoadSample
    parallelism: int
    # How this build is paused: the daemon's pauser, or signals once that failed it.
    pauser: Pauser
    ended: float = 0.0
    spawned: bool = False  # a builder ran (an attempt may find its outputs there already)
    succeeded: bool = False  # its outputs registered
    proc: Process | None = None
    deadlines: list[trio.CancelScope] = field(default_factory=list)
    paused_at: float | None = None  # trio time
    paused_total: float = 0.0
    # Under memory pressure, killed and requeued rather than paused (on-pause = data).
    evict_on_pause: bool = False
    evicted: bool = False  # killed so: its attempt ends as evicted, not failed
    # A commit copies the build now (`daemon/build/stops.py`): the scheduler leaves it be.
    held: bool = False
    snapshot: str | None = None  # the snapshot the attempt left, for its history
    # What each deadline had left when the build was paused.
    _left: list[float] = field(default_factory=list)

    def watch(self, proc: Process, deadlines: list[trio.CancelScope]) -> None:
        self.spawned = True
        self.proc = proc
        self.deadlines = deadlines

    def unwatch(self) -> None:
        """The builder is done with: nothing left to pause.  A paused tree is resumed, as
        what was killed in a frozen cgroup v1 dies only once thawed."""
        if self.paused_at is not None:
            self.resume()
        self.proc = None
        self.deadlines = []

    def pause(self) -> None:
        assert self.proc is not None
        now = trio.current_time()
        self._hold(True)
        self.paused_at = now
        self._left = [s.deadline - now for s in self.deadlines]
        for s in self.deadlines:
            s.deadline = float("inf")

    def resume(self) -> None:
        assert self.proc is not None and self.paused_at is not None
        now = trio.current_time()
        for s, left in zip(self.deadlines, self._left, strict=True):
            s.deadline = now + left
        self.paused_total += now - self.paused_at
        self.paused_at = None
        self._hold(False)

    def evict(self) -> None:
        """Kill the builder (pid 1 of its sandbox: all of it goes)."""
        assert self.proc is not None
        self.evicted = True
        self.proc.kill()

    def _hold(self, stop: bool) -> None:
        assert self.proc is not None
        try:
            (self.pauser.pause if stop else self.pauser.resume)(self.proc)
        except OSError:
            # The cgroup went away under us (an admin, say): signals still work, and
            # pause and resume this build from now on.
            self.pauser = SIGNALS
            (SIGNALS.pause if stop else SIGNALS.resume)(self.proc)


class Scheduler:
    def __init__(self, admission: Admission, monitor: LoadMonitor, pauser: Pauser) -> None:
        self.admission = admission
        self.monitor = monitor
        self.pauser = pauser
        self.running: list[Running] = []  # in the order they started
        self.queued = 0
        self._retry_caps: list[int] = []  # of retries waiting for the builds to drain
        # The next attempts of evicted builds, oldest first, until let in; then counted
        # in `_letting_in` until they run.
        self._evicted: deque[trio.Event] = deque()
        self._letting_in = 0
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def latest(self) -> LoadSample:
        return self.monitor.latest

    def _may_start(self, cap: int | None, readmitted: bool = False) -> bool:
        if not readmitted and not self.running and (self._evicted or self._letting_in):
            return False
        caps = [r.cap for r in self.running if r.cap is not None]
        return self.admission.may_start(len(self.running), caps, cap, bool(self._retry_caps))

    def free(self) -> bool:
        """Whether a build asking now would start at once: nothing waits before it and
        the admission lets one more in (the `overflow` remote policy's question)."""
        return self.queued == 0 and self._may_start(None)

    def others_running(self, run: Running | None) -> bool:
        """Whether a build other than `run` holds a slot (so more builds will end soon)."""
        return any(r is not run for r in self.running)

    @asynccontextmanager
    async def slot(
        self, drv: str, attempt: int = 1, cap: int | None = None, evicted: bool = False
    ) -> AsyncIterator[Running]:
        """Wait until this build may start (an `evicted` one's next attempt, first until
        `on_sample` lets it in); hold its place among the running ones."""
        if evicted:
            await self._readmitted()
        waiting = self._retry_caps if cap is not None else None
        if waiting is not None:
            waiting.append(cap)  # type: ignore[arg-type]
        self.queued += 1
        try:
            while not self._may_start(cap, evicted):
                await self._lot.park()
        finally:
            self.queued -= 1
            if waiting is not None:
                waiting.remove(cap)  # type: ignore[arg-type]
            if evicted:
                self._let_in()
        now = self.latest
        run = Running(drv, attempt, cap, time.time(), now, now, len(self.running) + 1, self.pauser)
        self.running.append(run)
        for r in self.running:
            r.parallelism = max(r.parallelism, len(self.running))
        try:
            yield run
        finally:
            if not run.succeeded:
                # A build shorter than the sampling interval would otherwise have no
                # sample of its own load, which the retry policy weighs.  (A success's
                # load is only history: not worth six /proc files a build.)
                run.load_peak = peak(run.load_peak, self.monitor.reader.sample(keep=False))
            run.ended = time.time()
            self.running.remove(run)
            self._lot.unpark_all()

    async def _readmitted(self) -> None:
        """Once `on_sample` lets this evicted build in (counted in `_letting_in`)."""
        let_in = trio.Event()
        self._evicted.append(let_in)
        try:
            await let_in.wait()
        except BaseException:
            if let_in.is_set():
                self._let_in()
            else:
                self._evicted.remove(let_in)
                self._lot.unpark_all()
            raise

    def _let_in(self) -> None:
        """An evicted build let in runs now, or gave up: new builds may take its turn."""
        self._letting_in -= 1
        self._lot.unpark_all()

    def on_sample(self, sample: LoadSample) -> None:
        for r in self.running:
            r.load_peak = peak(r.load_peak, sample)
        self.admission.on_sample(sample, len(self.running))
        # A builder already reaped is not paused: its pid may be another process's now.
        # Nor is one being committed: its commit freezes and thaws it.
        pausable = [
            r
            for r in self.running
            if r.proc is not None and r.proc.returncode is None and not r.held and not r.evicted
        ]
        unpaused = [r for r in pausable if r.paused_at is None]
        paused = [r for r in pausable if r.paused_at is not None]
        relieved = self.admission.to_resume(sample, len(unpaused))
        if paused and relieved:
            paused[0].resume()
        elif self._evicted and relieved:
            self._evicted.popleft().set()
            self._letting_in += 1
        elif self.admission.to_pause(sample, len(unpaused)):
            newest = unpaused[-1]
            if newest.evict_on_pause:
                newest.evict()
            else:
                newest.pause()
        self._lot.unpark_all()

    def status(self) -> dict[str, object]:
        now = time.time()
        return {
            "load": self.latest.as_dict(),
            "max_jobs": self.admission.max_jobs,
            "parallelism": self.admission.limit,
            "held_back": list(self.admission.held_back),
            "queued": self.queued,
            "retries_waiting": len(self._retry_caps),
            "evicted": len(self._evicted),
            "running": [
                {
                    "drv": r.drv,
                    "attempt": r.attempt,
                    "seconds": round(now - r.started, 1),
                    "paused": r.paused_at is not None,
                    "pid": r.proc.pid if r.proc is not None else None,
                }
                for r in self.running
            ],
        }

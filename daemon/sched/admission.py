"""When a new build may start, and when a running one should be paused: no I/O.

`Admission.on_sample` adapts the parallelism in effect to the load: while some signal is
over its limit it drops below the number of builds running (so none starts until they
drain), and once every signal is back under `resume-fraction` of its limit it grows by one
per sample, up to `max-jobs`.  Between the two marks it holds.  Two marks and one step
per sample are the hysteresis: ninja's `-l` decides from the load average alone, which
trails its own decisions by a minute, and so swings between too many jobs and too few.

One build may always run: load from outside weft must not stop it forever.

A retry (see `retry.py`) asks for a cap: it starts only once the running builds have
drained below it, ahead of every new build, and while it runs nothing starts past its cap.
"""

from dataclasses import dataclass

from daemon.sched.loadsignals import RESOURCES, LoadSample
from daemon.settings import Settings


@dataclass(frozen=True)
class Limits:
    """The load limits in force, from the settings (whose defaults are the defaults)."""

    # Pressure (% of time some task stalled) per resource; 0 turns a limit off.
    cpu: float
    memory: float
    io: float
    # 1-minute load average per core; 0: off.
    load_per_core: float
    # Bytes of MemAvailable below which no build starts; 0: off.
    min_available: int
    # Under this share of every limit, the load counts as relieved.
    resume_fraction: float
    # Memory pressure at which the newest builds are paused; resumed under
    # resume_fraction of it.  0: never pause.
    pause_memory: float
    cores: int

    @classmethod
    def from_settings(cls, s: Settings, cores: int = 1) -> "Limits":
        return cls(
            cpu=s.max_cpu_pressure,
            memory=s.max_memory_pressure,
            io=s.max_io_pressure,
            load_per_core=s.max_load_per_core,
            min_available=s.min_free_memory_mib << 20,
            resume_fraction=s.load_resume_fraction,
            pause_memory=s.pause_memory_pressure,
            cores=cores,
        )

    def over(self, sample: LoadSample, fraction: float = 1.0) -> list[str]:
        """The signals over `fraction` of their limits, described for people."""
        found = []
        for r in RESOURCES:
            limit, value = getattr(self, r), sample.pressure(r)
            if limit > 0 and value is not None and value > limit * fraction:
                found.append(f"{r} pressure {value:.0f}% > {limit * fraction:.0f}%")
        load_limit = self.load_per_core * self.cores * fraction
        if self.load_per_core > 0 and sample.load1 > load_limit:
            found.append(f"load average {sample.load1:.2f} > {load_limit:.2f}")
        if self.min_available > 0 and sample.mem_available < self.min_available / fraction:
            found.append(f"{sample.mem_available >> 20} MiB available")
        return found

    def loaded(self, sample: LoadSample) -> bool:
        """Whether the machine was under pressure: over the relieved mark somewhere."""
        return bool(self.over(sample, self.resume_fraction))


class Admission:
    def __init__(self, limits: Limits, max_jobs: int) -> None:
        self.limits = limits
        self.max_jobs = max_jobs
        self.limit = max_jobs
        # Why the parallelism in effect is below max-jobs; empty when it is not held back.
        self.held_back: list[str] = []

    def on_sample(self, sample: LoadSample, running: int) -> None:
        over = self.limits.over(sample)
        if over:
            self.limit = max(1, min(self.limit, running) - 1)
            self.held_back = over
        elif not self.limits.loaded(sample):
            self.limit = min(self.max_jobs, self.limit + 1)
            if self.limit == self.max_jobs:
                self.held_back = []

    def may_start(
        self, running: int, caps_running: list[int], cap: int | None, retry_waiting: bool
    ) -> bool:
        """Whether a build (a retry, if it has a `cap`) may start now."""
        if running == 0:
            return True
        limit = min([self.limit, *caps_running])
        if cap is None:
            return not retry_waiting and running < limit
        return running < min(limit, cap)

    def to_pause(self, sample: LoadSample, unpaused: int) -> bool:
        """Whether to pause the newest running build (one per sample; one always runs)."""
        memory = sample.memory
        return (
            self.limits.pause_memory > 0
            and memory is not None
            and memory > self.limits.pause_memory
            and unpaused > 1
        )

    def to_resume(self, sample: LoadSample, unpaused: int) -> bool:
        """Whether to resume the oldest paused build (one per sample): when the pressure
        has fallen, or when nothing else runs (a paused build set nothing free)."""
        memory = sample.memory or 0.0
        return unpaused == 0 or memory <= self.limits.pause_memory * self.limits.resume_fraction

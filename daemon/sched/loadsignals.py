"""What the machine's load is: pressure stall information, load average, free memory.

`ProcReader` reads the kernel's files under a `/proc`-like root (`load-proc-dir` in
`weft.toml`, `/proc` unless a test points it at a directory it writes itself) and turns
them into a `LoadSample`.  The pressures are the share of time (in %) some task waited for
the CPU, memory or I/O.  The kernel's own `avg10` trails a change by tens of seconds, so
the figure used is the rate of the cumulative `total` over the last few samples, which
follows a build starting or ending within a few seconds; a file without `total` (written
by hand) gives its `avg10`.

These are reads of in-memory kernel files, microseconds each: `LoadMonitor` does them on
the event loop once per interval rather than pay a worker-thread trip.
"""

import dataclasses
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

RESOURCES = ("cpu", "memory", "io")
# Samples the pressure rate is taken over: about three seconds at the default interval.
RATE_WINDOW = 4


@dataclass(frozen=True)
class LoadSample:
    time: float  # monotonic
    # Share of the recent past (%) in which some task stalled on each resource; None when
    # the kernel gives no pressure information.
    cpu: float | None
    memory: float | None
    io: float | None
    load1: float
    load5: float
    mem_available: int  # bytes
    oom_kills: int  # the kernel's count since boot

    def pressure(self, resource: str) -> float | None:
        return getattr(self, resource)

    def as_dict(self) -> dict[str, object]:
        # Not `asdict`, which copies every field deeply: this runs on the loop, twice for
        # every build's history record.
        return {name: getattr(self, name) for name in _RECORDED}


IDLE = LoadSample(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0)
# What a history record keeps of a sample: all but its time, which means nothing after.
_RECORDED = tuple(f.name for f in dataclasses.fields(LoadSample) if f.name != "time")


def peak(a: LoadSample, b: LoadSample) -> LoadSample:
    """The worst of two samples, signal by signal (for the peak load during a build)."""

    def worst(x: float | None, y: float | None) -> float | None:
        return y if x is None else x if y is None else max(x, y)

    return LoadSample(
        max(a.time, b.time),
        worst(a.cpu, b.cpu),
        worst(a.memory, b.memory),
        worst(a.io, b.io),
        max(a.load1, b.load1),
        max(a.load5, b.load5),
        min(a.mem_available, b.mem_available),
        max(a.oom_kills, b.oom_kills),
    )


def _field(text: str | None, name: str) -> int:
    """The number after `name` at the start of a line of a /proc file, 0 if none: found
    with one search, not by splitting the file (/proc/vmstat has over a hundred lines)."""
    text = "\n" + (text or "")
    at = text.find(f"\n{name} ")
    if at < 0:
        return 0
    value = text[at + len(name) + 2 :].split(None, 1)
    return int(value[0]) if value and value[0].isdigit() else 0


def _parse_pressure(text: str) -> tuple[float, float | None]:
    """The `some` line of a pressure file: (avg10, total in µs or None)."""
    for line in text.splitlines():
        kind, *fields = line.split()
        if kind != "some":
            continue
        values = dict(f.split("=", 1) for f in fields)
        total = values.get("total")
        return float(values.get("avg10", 0.0)), float(total) if total is not None else None
    return 0.0, None


class ProcReader:
    """Samples from the files under `root`; remembers recent totals to compute rates."""

    def __init__(self, root: str = "/proc") -> None:
        self.root = root
        self._totals: dict[str, deque[tuple[float, float]]] = {
            r: deque(maxlen=RATE_WINDOW) for r in RESOURCES
        }

    def _read(self, name: str) -> str | None:
        try:
            with open(os.path.join(self.root, name)) as f:
                return f.read()
        except OSError:
            return None

    def _pressure(self, resource: str, now: float, keep: bool) -> float | None:
        text = self._read(f"pressure/{resource}")
        if text is None:
            return None
        avg10, total = _parse_pressure(text)
        if total is None:
            return avg10
        history = self._totals[resource]
        if keep:
            history.append((now, total))
        if not history:
            return avg10
        then, before = history[0]
        if now - then < 0.05:
            return avg10
        return max(0.0, min(100.0, (total - before) / 1e6 / (now - then) * 100))

    def sample(self, keep: bool = True) -> LoadSample:
        """A sample; with `keep` false (a look between the regular samples) the totals read
        are not remembered, so the regular samples keep their spacing."""
        now = time.monotonic()
        cpu, memory, io = (self._pressure(r, now, keep) for r in RESOURCES)
        load = (self._read("loadavg") or "0 0 0").split()
        available = _field(self._read("meminfo"), "MemAvailable:") * 1024
        oom = _field(self._read("vmstat"), "oom_kill")
        return LoadSample(now, cpu, memory, io, float(load[0]), float(load[1]), available, oom)


class LoadMonitor:
    """Samples every `interval` seconds; each sample goes to `latest` and to `on_sample`."""

    def __init__(
        self,
        reader: ProcReader,
        interval: float,
        on_sample: Callable[[LoadSample], None],
    ) -> None:
        self.reader = reader
        # A zero or negative interval (a typo in weft.toml) would spin the event loop.
        self.interval = max(interval, 0.05)
        self.on_sample = on_sample
        self.latest = reader.sample()

    async def run(self) -> None:
        while True:
            # Aligned to the interval, so a slow wake-up does not drift the sampling.
            await trio.sleep_until(
                math.floor(trio.current_time() / self.interval + 1) * self.interval
            )
            self.latest = self.reader.sample()
            self.on_sample(self.latest)

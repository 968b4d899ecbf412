"""Timing helpers shared by the benchmarks.

The disk here swings 10 to 20 times in speed for minutes at a time, so every figure that
touches it is taken beside a reference measured in the same run, the two alternated, and
the ratio of each pair is what the tables report.
"""

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def settle() -> None:
    """Flush dirty pages so one run's writeback does not land in the next run's time."""
    os.sync()
    time.sleep(0.2)


def timed(fn: Callable[[], object]) -> float:
    settle()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@dataclass
class Alternating:
    """Times of several contenders, run in turn, round after round; cleanup after each."""

    times: dict[str, list[float]] = field(default_factory=dict)

    def run(
        self,
        rounds: int,
        contenders: dict[str, Callable[[], object]],
        cleanup: Callable[[], object] | None = None,
    ) -> None:
        names = list(contenders)
        # A first round is thrown away (cold caches), and each round starts with a different
        # contender, so none always pays for the previous round's cleanup.
        for round_ in range(rounds + 1):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                elapsed = timed(contenders[name])
                if round_:
                    self.times.setdefault(name, []).append(elapsed)
                if cleanup is not None:
                    cleanup()

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratio(self, name: str, reference: str) -> float:
        """Median of per-round ratios: robust to the disk changing speed between rounds."""
        return statistics.median(
            a / b for a, b in zip(self.times[name], self.times[reference], strict=True)
        )

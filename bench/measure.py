"""Timing helpers shared by the benchmarks.

The disk here swings 10 to 20 times in speed for minutes at a time, so every figure that
touches it is taken beside a reference measured in the same run, the two alternated, and
the ratio of each pair is what the tables report.
"""

import contextlib
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# Where the benchmarks make their stores and scratch: beside weft's default state dir
# (/var/lib/weft), each run in a block group of its own, as Nix's store has one (/nix is a
# top-level directory, which ext4 places apart).  On an ext4 without a journal (this
# VM's), making an inode skips over every inode of its group deleted in the last minutes
# (up to five), so in a group that a test run or the last benchmark's cleanup emptied,
# each file made costs 0.2-0.5 ms instead of 0.02: measured on 2026-12-06, 0.23-0.54 ms in
# /var/tmp, 0.33-0.37 ms in /var/lib a few minutes after a benchmark, 0.016-0.018 ms in
# /nix and in a fresh group.  The benchmark would measure the machine's last minutes, not
# weft.  ext4's top-directory flag (`chattr +T`) on SCRATCH has each run's directory
# placed in a group of its own.
SCRATCH = "/var/lib/weft-bench"


def scratch(prefix: str) -> "tempfile.TemporaryDirectory[str]":
    """A run's scratch directory, in SCRATCH (made, flagged as a top directory where the
    file system has the flag: elsewhere the flag is refused, and nothing else changes)."""
    os.makedirs(SCRATCH, mode=0o700, exist_ok=True)
    with contextlib.suppress(OSError):
        subprocess.run(["chattr", "+T", SCRATCH], capture_output=True, check=False)
    return tempfile.TemporaryDirectory(prefix=prefix, dir=SCRATCH)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _busy(interval: float) -> float:
    """The share of the machine's CPU time that was not idle over `interval` seconds."""

    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)  # idle and iowait; all

    idle0, all0 = read()
    time.sleep(interval)
    idle1, all1 = read()
    return 1 - (idle1 - idle0) / max(1, all1 - all0)


def settle(patience: float = 5.0) -> None:
    """Flush dirty pages, then wait (at most `patience` seconds) until the machine is
    quiet: one run's writeback, and the kernel's teardown of the namespaces of its
    sandboxes, which goes on for a while after it, must not land in the next run's time."""
    os.sync()
    deadline = time.monotonic() + patience
    while _busy(0.2) > 0.1 and time.monotonic() < deadline:
        pass


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

"""The locker: uncontended round trips, handoff latency, the daemon's fds under 10,000 locks."""

import os
import time
from pathlib import Path

import trio

from bench.measure import percentile, scratch
from daemon.proc.locks import running_locker
from daemon.wire.locker import Mode

Row = tuple[str, str, str]
ROUND_TRIPS = 20_000
HANDOFFS = 2_000
MANY = 10_000
CONCURRENT = 16


async def _bench(work: Path) -> list[Row]:
    rows: list[Row] = []
    async with running_locker() as svc, trio.open_nursery() as nursery:
        path = str(work / "one.lock")
        t = time.perf_counter()
        for _ in range(ROUND_TRIPS):
            held = await svc.lock(path, Mode.EXCLUSIVE, "solo")
            await svc.unlock(held, "solo")
        rate = ROUND_TRIPS / (time.perf_counter() - t)
        rows.append(
            (
                "uncontended lock+unlock round trips, one owner in sequence",
                f"{rate:,.0f} /s",
                "target >= 10,000",
            )
        )

        async def cycle(owner: str, n: int) -> None:
            own = str(work / f"{owner}.lock")
            for _ in range(n):
                held = await svc.lock(own, Mode.EXCLUSIVE, owner)
                await svc.unlock(held, owner)

        t = time.perf_counter()
        async with trio.open_nursery() as group:
            for i in range(CONCURRENT):
                group.start_soon(cycle, f"c{i}", ROUND_TRIPS // CONCURRENT)
        rate = ROUND_TRIPS / (time.perf_counter() - t)
        rows.append(
            (
                f"uncontended lock+unlock round trips, {CONCURRENT} owners at once",
                f"{rate:,.0f} /s",
                "each owner its own file",
            )
        )

        latencies: list[float] = []
        clock = {"released": 0.0}
        held = await svc.lock(path, Mode.EXCLUSIVE, "owner-0")
        for i in range(1, HANDOFFS + 1):
            granted = trio.Event()

            async def take(owner: str, granted: trio.Event) -> None:
                nonlocal held
                held = await svc.lock(path, Mode.EXCLUSIVE, owner)
                latencies.append(time.perf_counter() - clock["released"])
                granted.set()

            nursery.start_soon(take, f"owner-{i % 2}", granted)
            await trio.sleep(0.0005)  # let the request reach the locker and queue
            previous = held
            clock["released"] = time.perf_counter()
            await svc.unlock(previous, f"owner-{(i - 1) % 2}")
            await granted.wait()
        await svc.unlock(held, f"owner-{HANDOFFS % 2}")
        p50, p99 = (percentile(latencies, q) * 1e6 for q in (0.5, 0.99))
        rows.append(
            (
                "handoff between two owners of one file",
                f"p50 {p50:.0f} us, p99 {p99:.0f} us",
                "target p50 < 200 us",
            )
        )

        before = len(os.listdir("/proc/self/fd"))
        paths = [str(work / f"many-{i}.lock") for i in range(MANY)]
        async with svc.exclusive(paths, "many"):
            during = len(os.listdir("/proc/self/fd"))
            locker_fds = len(os.listdir(f"/proc/{svc.locker_pid}/fd"))
        rows.append(
            (
                f"daemon fds while {MANY:,} locks are held",
                f"{before} before, {during} during",
                f"locker holds {locker_fds}; target < 100",
            )
        )
    return rows


def run() -> list[Row]:
    with scratch("weft-bench-") as tmp:
        return trio.run(_bench, Path(tmp))

"""The spawner: request to the builder's first instruction, exit to reaped status, and
sandboxed builders per second; without the network and with a fixed-output build's (a
namespace of its own, connected by pasta); back to back (the spawner is still making its
spare when the next request comes) and 10 ms apart.

Builders are adopted by the spawner's parent (a subreaper), reaped by its process
monitor, so the measurement runs in a process of its own (`python -m bench.spawner_bench`),
as the daemon would.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio

from bench.measure import percentile, scratch
from daemon.proc.processes import ProcessMonitor
from daemon.proc.spawner import SpawnerService, start_spawner_process
from daemon.wire.spawner import SpawnRequest
from store.store import Store

Row = tuple[str, str, str]
SPAWNS = 500
CONCURRENT = 8
PAUSE = 0.01
BUILD_UID = 30001
STAMP_C = r"""
#include <stdio.h>
#include <time.h>
int main(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    printf("%ld.%09ld\n", (long)t.tv_sec, t.tv_nsec);
    fflush(stdout);
    clock_gettime(CLOCK_REALTIME, &t);
    printf("%ld.%09ld\n", (long)t.tv_sec, t.tv_nsec);
    return 0;
}
"""


def _stamp_builder(work: Path, store: Store) -> str:
    """A static program that prints the time it starts and the time it exits."""
    tree = work / "stamp" / "bin"
    tree.mkdir(parents=True)
    (work / "stamp.c").write_text(STAMP_C)
    subprocess.run(
        ["gcc", "-O2", "-static", "-o", str(tree / "stamp"), str(work / "stamp.c")], check=True
    )
    return store.add_path(work / "stamp", name="stamp").path


async def _measure(work: Path) -> list[Row]:
    monitor = ProcessMonitor()
    monitor.become_subreaper()
    store = Store.open(work / "state")
    stamp = _stamp_builder(work, store)
    spawner = SpawnerService(monitor, *start_spawner_process(monitor))
    counter = iter(range(10**9))

    def request(network: bool) -> SpawnRequest:
        i = next(counter)
        root, build = work / f"root-{i}", work / f"build-{i}"
        root.mkdir()
        build.mkdir()
        os.chown(build, BUILD_UID, BUILD_UID)
        return SpawnRequest(
            builder=f"{stamp}/bin/stamp",
            root=str(root),
            build_dir=str(build),
            store_dir=store.store_dir,
            host_uid=BUILD_UID,
            host_gid=BUILD_UID,
            inputs=[stamp],
            network=network,
        )

    async def one(network: bool, pause: float = 0.0) -> tuple[float, float]:
        req = request(network)
        # The spawner makes its next spare after each reply; a pause lets it finish, as the
        # daemon's own work between two builds of a chain does.
        await trio.sleep(pause)
        r, w = os.pipe()
        t0 = time.time()
        proc = await spawner.spawn(req, w)
        os.close(w)
        await proc.wait()
        reaped = time.time()
        started, exiting = map(float, os.read(r, 4096).split())
        os.close(r)
        return started - t0, reaped - exiting

    rows: list[Row] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        await nursery.start(spawner.run)
        for network, pause, label in (
            (False, 0.0, "own network namespace, back to back"),
            (False, PAUSE, f"own network namespace, {PAUSE * 1e3:.0f} ms apart"),
            (True, 0.0, "fixed-output network (pasta), back to back"),
            (True, PAUSE, f"fixed-output network (pasta), {PAUSE * 1e3:.0f} ms apart"),
        ):
            rows += _latency_rows(label, [await one(network, pause) for _ in range(SPAWNS)])
        t = time.perf_counter()
        async with trio.open_nursery() as group:
            for _ in range(CONCURRENT):
                group.start_soon(lambda: _many(one, SPAWNS // CONCURRENT))
        rate = SPAWNS / (time.perf_counter() - t)
        rows.append(
            (
                f"trivial sandboxed builders per second, {CONCURRENT} at once",
                f"{rate:,.0f} /s",
                "target >= 100",
            )
        )
        await spawner.aclose()
        nursery.cancel_scope.cancel()
    store.close()
    return rows


def _latency_rows(label: str, results: list[tuple[float, float]]) -> list[Row]:
    to_exec = [a for a, _ in results]
    to_reap = [b for _, b in results]
    return [
        (
            f"spawn to first instruction, {label}",
            f"median {statistics.median(to_exec) * 1e3:.2f} ms, "
            f"p99 {percentile(to_exec, 0.99) * 1e3:.2f} ms",
            "target median < 10 ms",
        ),
        (
            f"builder exit to reaped status, {label}",
            f"median {statistics.median(to_reap) * 1e3:.2f} ms, "
            f"p99 {percentile(to_reap, 0.99) * 1e3:.2f} ms",
            "target < 2 ms",
        ),
    ]


async def _many(one, n: int) -> None:  # type: ignore[no-untyped-def]
    for _ in range(n):
        await one(False)


def run() -> list[Row]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.spawner_bench"],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    return [tuple(r) for r in json.loads(out.stdout)]  # type: ignore[misc]


if __name__ == "__main__":
    with scratch("weft-bench-") as tmp:
        print(json.dumps(trio.run(_measure, Path(tmp))))

"""The daemon: round trips, many clients at once (`clients_bench.py`, beside a
nix-daemon), memory over a million requests, add throughput, and the whole-process cost
of one store-query beside nix-store."""

import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from bench.clients_bench import bench_clients
from bench.daemons import DaemonProc, command_server, start_daemon, stop_daemon
from bench.measure import Alternating, percentile, scratch
from daemon.cli.blocking import BlockingClient, chunk_reader
from store import Store, nar
from store.tmparea import remove_tree

Row = tuple[str, str, str]
SEQUENTIAL = 5_000
PIPELINE_BATCH = 1_000
PIPELINED_TOTAL = 50_000
MILLION = 1_000_000
LARGE_MIB = 512


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def _seed(d: DaemonProc, work: Path) -> str:
    f = work / "seed"
    f.write_text("seed")
    with BlockingClient(d.socket) as c:
        return c.call("add-from-path", path=str(f))["path"]


def bench_round_trips(d: DaemonProc, path: str) -> list[Row]:
    rows: list[Row] = []
    with BlockingClient(d.socket) as c:
        lat = []
        for _ in range(SEQUENTIAL):
            t = time.perf_counter()
            c.call("path-info", path=path)
            lat.append(time.perf_counter() - t)
        rows.append(
            (
                "path-info, one client in sequence",
                f"{SEQUENTIAL / sum(lat):,.0f} /s",
                f"p50 {_ms(percentile(lat, 0.5))}, p99 {_ms(percentile(lat, 0.99))}",
            )
        )
        calls = [("path-info", {"path": path})] * PIPELINE_BATCH
        t = time.perf_counter()
        for _ in range(PIPELINED_TOTAL // PIPELINE_BATCH):
            c.call_many(calls)
        elapsed = time.perf_counter() - t
        rows.append(
            (
                f"path-info, one client, {PIPELINE_BATCH} in flight",
                f"{PIPELINED_TOTAL / elapsed:,.0f} replies/s",
                "target >= 20,000",
            )
        )
    return rows


def bench_memory(d: DaemonProc, path: str) -> list[Row]:
    calls = [("path-info", {"path": path})] * PIPELINE_BATCH
    with BlockingClient(d.socket) as c:
        c.call_many(calls)
        before = d.rss_kib()
        t = time.perf_counter()
        for _ in range(MILLION // PIPELINE_BATCH):
            c.call_many(calls)
        elapsed = time.perf_counter() - t
    after = d.rss_kib()
    return [
        (
            f"daemon RSS over {MILLION:,} requests",
            f"{before / 1024:.1f} -> {after / 1024:.1f} MiB ({(after - before) / before:+.1%})",
            f"target < +10%; {MILLION / elapsed:,.0f} req/s",
        )
    ]


def bench_add(d: DaemonProc, work: Path) -> list[Row]:
    src = work / "large.bin"
    block = os.urandom(4 << 20)
    with src.open("wb") as f:
        for _ in range(LARGE_MIB // 4):
            f.write(block)
    local = work / "local-state"

    def in_process() -> None:
        with Store.open(local) as s:
            s.add_path(src)

    def from_path() -> None:
        with BlockingClient(d.socket) as c:
            c.call("add-from-path", path=str(src))

    def streamed() -> None:
        def pieces() -> Iterator[bytes]:
            size = LARGE_MIB << 20
            yield nar.HEADER + nar.file_header(False, size)
            with src.open("rb") as f:
                while chunk := f.read(1 << 20):
                    yield chunk
            yield nar.file_trailer(size)

        with BlockingClient(d.socket) as c:
            c.upload("add", chunk_reader(pieces()), name="large.bin")

    def cleanup() -> None:
        remove_tree(local)
        # Forget the daemon's copy so every run is a real add.
        for name in os.listdir(d.store_dir):
            if name.endswith("-large.bin"):
                with Store.open(d.state) as s, s.db.connection() as conn:
                    conn.execute(
                        "DELETE FROM ValidPaths WHERE path = ?", (f"{d.store_dir}/{name}",)
                    )
                remove_tree(f"{d.store_dir}/{name}")

    alt = Alternating()
    alt.run(
        3,
        {
            "in-process add": in_process,
            "daemon add-from-path": from_path,
            "daemon add (streamed archive)": streamed,
        },
        cleanup,
    )
    src.unlink()
    return [
        (
            f"add {LARGE_MIB} MiB: {name}",
            f"{LARGE_MIB / alt.median(name):,.0f} MB/s",
            f"{alt.ratio(name, 'in-process add'):.2f}x in-process time; target <= 1.3",
        )
        for name in alt.times
    ]


def bench_process_cost(d: DaemonProc, path: str, work: Path) -> list[Row]:
    with command_server(work / "run") as env:
        return _process_cost(d, path, work, {**env, "WEFT_SOCKET": d.socket})


def _process_cost(d: DaemonProc, path: str, work: Path, env: dict[str, str]) -> list[Row]:
    bin_dir = Path(sys.executable).parent
    rows = []

    def median_ms(cmd: list[str], env: dict[str, str]) -> float:
        samples = []
        for _ in range(41):
            t = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, env=env, check=True)
            samples.append(time.perf_counter() - t)
        return statistics.median(samples) * 1000

    weft = median_ms([str(bin_dir / "store-query"), "--references", path], env)
    rows.append(("store-query --references P, whole process", f"{weft:.1f} ms", "target <= 20 ms"))
    if shutil.which("nix-store"):
        nix_env = {k: v for k, v in os.environ.items() if k != "NIX_REMOTE"}
        f = work / "nixseed"
        f.write_text("nix seed")
        nix_path = subprocess.run(
            ["nix-store", "--add", str(f)], capture_output=True, text=True, env=nix_env, check=True
        ).stdout.strip()
        nix = median_ms(["nix-store", "-q", "--references", nix_path], nix_env)
        rows.append(
            (
                "nix-store -q --references P, whole process",
                f"{nix:.1f} ms",
                f"weft/nix {weft / nix:.2f}",
            )
        )
        subprocess.run(["nix-store", "--delete", nix_path], capture_output=True, env=nix_env)
    py = median_ms([sys.executable, "-c", "pass"], os.environ.copy())
    rows.append(("python -c pass (interpreter start, for scale)", f"{py:.1f} ms", ""))
    return rows


def run() -> list[Row]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with scratch("weft-bench-") as tmp:
        work = Path(tmp)
        d = start_daemon(work / "state")
        try:
            path = _seed(d, work)
            rows = bench_process_cost(d, path, work)
            rows += bench_round_trips(d, path)
            rows += bench_clients(d, work)
            rows += bench_add(d, work)
            rows += bench_memory(d, path)
        finally:
            stop_daemon(d)
    return rows

"""Garbage collection: 5,000 small dead paths side by side with Nix (paths/s); weft alone:
100,000 dead paths, the time to mark a store of 100,000 live and 1,000 dead paths, and
query latency while a 100,000-path collection runs.

Collections are timed as the whole `store-gc` / `nix-store --gc` command.  Paths are made
in bulk beforehand (`Store.add_texts`, `nix-store --add` of many files at once).
"""

import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from bench.daemons import DaemonProc, start_daemon, stop_daemon
from bench.measure import percentile, settle
from bench.nixdaemon import Nix, NixUnavailable, scratch_nix
from daemon.cli.blocking import BlockingClient
from store import gc
from store.layout import StateDir
from store.store import Store

Row = tuple[str, str, str]
SIDE_BY_SIDE = 5_000
LARGE = 100_000
DEAD_AMONG_LIVE = 1_000
GROUP = 100
BATCH = 2_000
ROUNDS = 3


def _add_dead(state: Path, n: int, tag: str) -> None:
    with Store(StateDir.at(state)) as store:
        for start in range(0, n, BATCH):
            store.add_texts(
                [(f"d{i}", f"{tag} dead {i}", ()) for i in range(start, min(n, start + BATCH))]
            )


def _add_live(state: Path, n: int, tag: str) -> None:
    """`n` live paths in groups of GROUP: a rooted head that refers to the rest."""
    groups = n // GROUP
    with Store(StateDir.at(state)) as store:
        roots = store.state.gcroots_dir
        for first in range(0, groups, 20):
            block = range(first, min(groups, first + 20))
            leaves = store.add_texts(
                [(f"l{g}-{i}", f"{tag} {g} {i}", ()) for g in block for i in range(GROUP - 1)]
            )
            heads = store.add_texts(
                [
                    (
                        f"h{g}",
                        f"{tag} head {g}",
                        [x.path for x in leaves[k * (GROUP - 1) : (k + 1) * (GROUP - 1)]],
                    )
                    for k, g in enumerate(block)
                ]
            )
            for g, head in zip(block, heads, strict=True):
                os.symlink(head.path, roots / f"group-{g}")


def _store_gc(d: DaemonProc) -> tuple[float, int]:
    env = {**os.environ, "WEFT_STATE_DIR": str(d.state)}
    settle()
    t = time.perf_counter()
    out = subprocess.run(
        [Path(sys.executable).parent / "store-gc"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return time.perf_counter() - t, len(out.stdout.splitlines())


def _weft_round(work: Path, tag: str) -> tuple[float, int]:
    state = work / f"weft-{tag}"
    _add_dead(state, SIDE_BY_SIDE, tag)
    d = start_daemon(state)
    try:
        return _store_gc(d)
    finally:
        stop_daemon(d)


def _nix_round(nix: Nix, work: Path, tag: str) -> tuple[float, int]:
    files = work / f"nix-{tag}"
    files.mkdir()
    for i in range(SIDE_BY_SIDE):
        (files / f"d{i}").write_text(f"{tag} dead {i}")
    names = [str(files / f"d{i}") for i in range(SIDE_BY_SIDE)]
    for start in range(0, SIDE_BY_SIDE, 1000):
        nix("nix-store", "--add", *names[start : start + 1000])
    settle()
    t = time.perf_counter()
    out = nix("nix-store", "--gc")
    elapsed = time.perf_counter() - t
    found = re.search(r"(\d+) store paths deleted", out.stdout + out.stderr)
    return elapsed, int(found.group(1)) if found else 0


def _side_by_side(work: Path, tag: str) -> Row:
    """Rounds of weft and Nix in turn; the median of the per-round ratios of paths/s."""
    weft: list[float] = []
    ratios: list[float] = []
    skipped = ""
    try:
        with scratch_nix(work) as nix:
            nix("nix-store", "--gc")  # earlier runs' garbage, untimed
            for round_ in range(ROUNDS):
                order = ("weft", "nix") if round_ % 2 == 0 else ("nix", "weft")
                rates: dict[str, float] = {}
                for who in order:
                    name = f"{tag}-{round_}"
                    t, n = _weft_round(work, name) if who == "weft" else _nix_round(nix, work, name)
                    rates[who] = n / t
                weft.append(rates["weft"])
                ratios.append(rates["weft"] / rates["nix"])
    except NixUnavailable as e:
        skipped = str(e)
    head = f"collect {SIDE_BY_SIDE:,} small dead paths, whole command"
    if skipped or not ratios:
        if not weft:
            t, n = _weft_round(work, f"{tag}-alone")
            weft.append(n / t)
        return head, f"weft {statistics.median(weft):,.0f} paths/s", f"Nix skipped: {skipped}"
    nix_rates = [w / r for w, r in zip(weft, ratios, strict=True)]
    return (
        head,
        f"weft {statistics.median(weft):,.0f} paths/s, nix {statistics.median(nix_rates):,.0f} "
        f"paths/s; medians of {ROUNDS} rounds",
        f"weft/nix {statistics.median(ratios):.1f}x (rounds: "
        + ", ".join(f"{r:.1f}" for r in ratios)
        + "); target >= 3x",
    )


def _queries_during_gc(d: DaemonProc, path: str) -> tuple[float, int, list[float]]:
    """Time a collection while one client asks path-info in a loop."""
    latencies: list[float] = []
    done = threading.Event()

    def ask() -> None:
        with BlockingClient(d.socket) as c:
            while not done.is_set():
                t = time.perf_counter()
                c.call("path-info", path=path)
                latencies.append(time.perf_counter() - t)
                time.sleep(0.001)

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        elapsed, deleted = _store_gc(d)
    finally:
        done.set()
        asker.join()
    return elapsed, deleted, latencies


def run() -> list[Row]:
    tag = uuid.uuid4().hex
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="weft-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        state = work / "weft-state"

        rows.append(_side_by_side(work, tag))

        _add_live(state, LARGE, tag)
        _add_dead(state, DEAD_AMONG_LIVE, tag + "x")
        with Store(StateDir.at(state)) as store:
            settle()
            t = time.perf_counter()
            plan = gc.plan(store)
            mark = time.perf_counter() - t
            assert len(plan.dead) == DEAD_AMONG_LIVE, len(plan.dead)
            live_path = sorted(plan.live)[0]
        d = start_daemon(state)
        try:
            small_time, small_n = _store_gc(d)
        finally:
            stop_daemon(d)
        rows.append(
            (
                f"{LARGE:,} live and {DEAD_AMONG_LIVE:,} dead paths",
                f"mark {mark * 1000:.0f} ms; whole store-gc {small_time:.2f} s",
                f"{small_n} deleted",
            )
        )

        _add_dead(state, LARGE, tag + "y")
        d = start_daemon(state)
        try:
            big_time, big_n, latencies = _queries_during_gc(d, live_path)
        finally:
            stop_daemon(d)
        rows.append(
            (
                f"collect {LARGE:,} dead paths (beside {LARGE:,} live)",
                f"{big_n / big_time:,.0f} paths/s ({big_n} in {big_time:.2f} s)",
                "",
            )
        )
        rows.append(
            (
                "path-info latency during that collection",
                f"p50 {percentile(latencies, 0.5) * 1000:.2f} ms, "
                f"p99 {percentile(latencies, 0.99) * 1000:.2f} ms",
                f"{len(latencies)} queries; target p99 < 50 ms",
            )
        )
    return rows

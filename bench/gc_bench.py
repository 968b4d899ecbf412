"""Garbage collection: 5,000 small dead paths side by side with Nix (paths/s, alternated
rounds); the time to mark a store of 100,000 live and 1,000 dead paths; 100,000 dead paths
beside 100,000 live, with path-info latency meanwhile.

Collections are timed as the whole `store-gc` / `nix-store --gc` command.  weft's command
answers once the dead paths are out of the store and their space comes back after it
(docs/gc.md), so each row also gives "space back": from the command's start until the last
deletion directory is removed, against Nix's whole command (its removal is inside it).
Paths are made in bulk beforehand (`Store.add_texts`, `nix-store --add` of many files at
once), each contender's by its own library, in a process of its own.

Other weft trees take turns in the same rounds, named in `WEFT_BENCH_TREES` as
`name=path[,name=path...]` (as the tricks bench; a tree's store must be able to open a
state dir its own library made); their rows give their times over this checkout's.
"""

import os
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from bench.daemons import DaemonProc, start_daemon, stop_daemon, store_command, tree_env
from bench.measure import percentile, scratch, settle
from bench.nixdaemon import Nix, NixUnavailable, scratch_nix
from daemon.cli.blocking import BlockingClient
from store import gc
from store.layout import StateDir
from store.store import Store

Row = tuple[str, str, str]
SIDE_BY_SIDE = 5_000
LARGE = 100_000
DEAD_AMONG_LIVE = 1_000
ROUNDS = 5
LARGE_ROUNDS = 3
TREES = "WEFT_BENCH_TREES"
# How often the end of a collection's removal is looked for: small beside its seconds.
POLL_SECONDS = 0.005

# Run by each contender's own Python path: `live` paths in groups of 100 (a rooted head
# that refers to the other 99), then `dead` unrooted ones.
FILL = """
import os, sys
from store.layout import StateDir
from store.store import Store
state, live, dead, tag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
BATCH, GROUP = 2000, 100
with Store(StateDir.at(state)) as store:
    roots = store.state.gcroots_dir
    groups = live // GROUP
    for first in range(0, groups, 20):
        block = range(first, min(groups, first + 20))
        leaves = store.add_texts(
            [(f"l{g}-{i}", f"{tag} {g} {i}", ()) for g in block for i in range(GROUP - 1)])
        heads = store.add_texts([
            (f"h{g}", f"{tag} head {g}",
             [x.path for x in leaves[k * (GROUP - 1):(k + 1) * (GROUP - 1)]])
            for k, g in enumerate(block)])
        for g, head in zip(block, heads):
            os.symlink(head.path, roots / f"group-{tag}-{g}")
    for start in range(0, dead, BATCH):
        store.add_texts(
            [(f"d{i}", f"{tag} dead {i}", ()) for i in range(start, min(dead, start + BATCH))])
"""


def _trees() -> dict[str, Path | None]:
    trees: dict[str, Path | None] = {"weft": None}
    for entry in filter(None, os.environ.get(TREES, "").split(",")):
        name, _, path = entry.partition("=")
        trees[name] = Path(path)
    return trees


def _fill(state: Path, tree: Path | None, live: int, dead: int, tag: str) -> None:
    state.mkdir(parents=True, exist_ok=True)
    env = tree_env(tree) or {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    # -P: the tree's library, not the working directory's.
    fill = [sys.executable, "-P", "-c", FILL, str(state), str(live), str(dead), tag]
    subprocess.run(fill, env=env, check=True)


def _deleting(state: Path) -> bool:
    with os.scandir(state / "store" / ".tmp") as entries:
        return any(e.name.endswith(".del") for e in entries)


def _store_gc(d: DaemonProc, tree: Path | None) -> tuple[float, float, int]:
    """(whole command, space back, paths deleted), both times from the command's start."""
    env = {**(tree_env(tree) or os.environ), "WEFT_STATE_DIR": str(d.state)}
    settle()
    t = time.perf_counter()
    out = subprocess.run(
        store_command("store-gc", tree), env=env, check=True, capture_output=True, text=True
    )
    took = time.perf_counter() - t
    while _deleting(d.state):
        time.sleep(POLL_SECONDS)
    return took, time.perf_counter() - t, len(out.stdout.splitlines())


def _weft_round(work: Path, name: str, tree: Path | None, tag: str) -> tuple[float, float, int]:
    state = work / f"{name}-{tag}"
    _fill(state, tree, 0, SIDE_BY_SIDE, tag)
    d = start_daemon(state, tree=tree)
    try:
        return _store_gc(d, tree)
    finally:
        stop_daemon(d)


def _nix_round(nix: Nix, work: Path, tag: str) -> tuple[float, float, int]:
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
    return elapsed, elapsed, int(found.group(1)) if found else 0


def _median_ratio(a: list[float], b: list[float]) -> tuple[float, str]:
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return statistics.median(ratios), ", ".join(f"{r:.1f}" for r in ratios)


def _side_by_side(work: Path, tag: str) -> list[Row]:
    """Rounds of each weft tree and Nix in rotated order; medians of per-round ratios."""
    trees = _trees()
    rates: dict[str, list[float]] = {name: [] for name in [*trees, "nix"]}
    back: dict[str, list[float]] = {name: [] for name in [*trees, "nix"]}
    head = f"collect {SIDE_BY_SIDE:,} small dead paths, whole command"
    try:
        with scratch_nix(work) as nix:
            nix("nix-store", "--gc")  # earlier runs' garbage, untimed
            names = list(rates)
            for round_ in range(ROUNDS):
                shift = round_ % len(names)
                for name in names[shift:] + names[:shift]:
                    label = f"{tag}-{round_}"
                    if name == "nix":
                        took, space, n = _nix_round(nix, work, label)
                    else:
                        took, space, n = _weft_round(work, name, trees[name], label)
                    rates[name].append(n / took)
                    back[name].append(n / space)
    except NixUnavailable as e:
        return [(head, f"weft {statistics.median(rates['weft'] or [0]):,.0f} paths/s", str(e))]
    ratio, rounds = _median_ratio(rates["weft"], rates["nix"])
    back_ratio, back_rounds = _median_ratio(back["weft"], back["nix"])
    rows = [
        (
            head,
            f"weft {statistics.median(rates['weft']):,.0f} paths/s, nix "
            f"{statistics.median(rates['nix']):,.0f} paths/s; medians of {ROUNDS} rounds",
            f"weft/nix {ratio:.1f}x (rounds: {rounds}); target >= 3x",
        ),
        (
            f"collect {SIDE_BY_SIDE:,} small dead paths, until the space is back",
            f"weft {statistics.median(back['weft']):,.0f} paths/s, nix's whole command "
            f"{statistics.median(back['nix']):,.0f} paths/s",
            f"weft/nix {back_ratio:.1f}x (rounds: {back_rounds})",
        ),
    ]
    for name in list(trees)[1:]:
        mine, theirs = _median_ratio(rates[name], rates["weft"])
        rows.append((f"{head}, {name}", f"{mine:.2f} of this checkout's paths/s", theirs))
    return rows


def _queries_during_gc(
    d: DaemonProc, path: str, tree: Path | None
) -> tuple[tuple[float, float, int], list[float], list[float]]:
    """A collection while one client asks path-info in a loop: its times, and the
    latencies during the command and during the removal after it."""
    during: list[float] = []
    after: list[float] = []
    done = threading.Event()
    answered = threading.Event()

    def ask() -> None:
        with BlockingClient(d.socket) as c:
            while not done.is_set():
                t = time.perf_counter()
                c.call("path-info", path=path)
                (after if answered.is_set() else during).append(time.perf_counter() - t)
                time.sleep(0.001)

    asker = threading.Thread(target=ask)
    asker.start()
    env = {**(tree_env(tree) or os.environ), "WEFT_STATE_DIR": str(d.state)}
    try:
        settle()
        t = time.perf_counter()
        out = subprocess.run(
            store_command("store-gc", tree), env=env, check=True, capture_output=True, text=True
        )
        took = time.perf_counter() - t
        answered.set()
        while _deleting(d.state):
            time.sleep(POLL_SECONDS)
        space = time.perf_counter() - t
    finally:
        done.set()
        asker.join()
    return (took, space, len(out.stdout.splitlines())), during, after


def _marking(work: Path, tag: str) -> tuple[Row, str]:
    """Marking a store of LARGE live and DEAD_AMONG_LIVE dead paths, and the whole
    collection of those; the state is kept (its live paths) for the large rounds."""
    state = work / "weft-large"
    _fill(state, None, LARGE, DEAD_AMONG_LIVE, tag)
    with Store(StateDir.at(state)) as store:
        settle()
        t = time.perf_counter()
        plan = gc.plan(store)
        mark = time.perf_counter() - t
        assert len(plan.dead) == DEAD_AMONG_LIVE, len(plan.dead)
        live_path = sorted(plan.live)[0]
    d = start_daemon(state)
    try:
        took, _, n = _store_gc(d, None)
    finally:
        stop_daemon(d)
    row = (
        f"{LARGE:,} live and {DEAD_AMONG_LIVE:,} dead paths",
        f"mark {mark * 1000:.0f} ms; whole store-gc {took:.2f} s",
        f"{n} deleted",
    )
    return row, live_path


def _large(work: Path, tag: str, live_path: str) -> list[Row]:
    """LARGE dead paths beside LARGE live, LARGE_ROUNDS times for each tree in turn."""
    trees = _trees()
    states = {name: work / ("weft-large" if name == "weft" else f"{name}-large") for name in trees}
    for name, tree in trees.items():
        if name != "weft":
            _fill(states[name], tree, LARGE, 0, f"{tag}-{name}")
    runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in trees}
    during: list[float] = []
    after: list[float] = []
    names = list(trees)
    for round_ in range(LARGE_ROUNDS):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            _fill(states[name], trees[name], 0, LARGE, f"{tag}-{round_}-big")
            d = start_daemon(states[name], tree=trees[name])
            try:
                if name == "weft":
                    times, now, later = _queries_during_gc(d, live_path, None)
                    during += now
                    after += later
                else:
                    times = _store_gc(d, trees[name])
            finally:
                stop_daemon(d)
            runs[name].append(times)
    return _large_rows(runs, during, after)


def _large_rows(
    runs: dict[str, list[tuple[float, float, int]]], during: list[float], after: list[float]
) -> list[Row]:
    weft = runs["weft"]
    rates = [n / took for took, _, n in weft]
    back = [n / space for _, space, n in weft]
    rows = [
        (
            f"collect {LARGE:,} dead paths (beside {LARGE:,} live), whole command",
            f"{statistics.median(rates):,.0f} paths/s; median of {LARGE_ROUNDS} rounds ("
            + ", ".join(f"{r:,.0f}" for r in rates)
            + ")",
            "target >= 20,000; Nix: not run (hours at 10^6 paths: NixOS/nix#6207, #9581)",
        ),
        (
            f"collect {LARGE:,} dead paths, until the space is back",
            f"{statistics.median(back):,.0f} paths/s ("
            + ", ".join(f"{r:,.0f}" for r in back)
            + ")",
            "the removal's pace is the disk's (an unlink waits for its discard)",
        ),
        (
            "path-info latency during those collections",
            f"p50 {percentile(during, 0.5) * 1000:.2f} ms, "
            f"p99 {percentile(during, 0.99) * 1000:.2f} ms",
            f"{len(during)} queries; target p99 < 50 ms; during the removal after: "
            f"p99 {percentile(after, 0.99) * 1000:.2f} ms of {len(after)}",
        ),
    ]
    for name in list(runs)[1:]:
        ratios = [
            (n / t) / (wn / wt) for (t, _, n), (wt, _, wn) in zip(runs[name], weft, strict=True)
        ]
        rows.append(
            (
                f"collect {LARGE:,} dead paths, {name}",
                f"{statistics.median(ratios):.2f} of this checkout's paths/s",
                ", ".join(f"{r:.2f}" for r in ratios),
            )
        )
    return rows


def run() -> list[Row]:
    tag = uuid.uuid4().hex
    with scratch("weft-bench-") as tmp:
        work = Path(tmp)
        rows = _side_by_side(work, tag)
        marking, live_path = _marking(work, tag)
        rows.append(marking)
        rows += _large(work, tag, live_path)
    return rows

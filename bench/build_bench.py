"""Builds side by side with nix-daemon (sandbox on, same machine, same run), busybox as the
builder: 200 independent trivial derivations, and a chain of 50, in alternated rounds (the
median of each round's weft/nix ratio is reported).  Before each timed graph the machine
is let settle (`bench.measure.settle`): the kernel tears the namespaces of the last
graph's sandboxes down for a while after it, whoever built it.  Each graph is built the
way a user builds it, by a command: `store-build` against weft's daemon, `nix-store
--realise` against Nix's; either command's start is in its time (with nothing to build,
23 and 29 ms here).  Also reference scanning.

The Nix column needs Debian's nix-bin (install.sh installs it); this bench starts its own
nix-daemon with a scratch configuration, and says so when it cannot.
"""

import os
import shutil
import statistics
import subprocess
import time
import uuid
from pathlib import Path

from bench.daemons import start_daemon, stop_daemon, store_command, tree_env
from bench.measure import scratch, settle
from bench.nixdaemon import NixUnavailable, scratch_nix
from daemon.cli.blocking import BlockingClient
from daemon.cli.recipestore import DaemonRecipeStore
from store import base32
from store.recipe import busybox, derivation, using
from store.refscan import ReferenceScanner

Row = tuple[str, str, str]
INDEPENDENT = 200
CHAIN = 50
JOBS = 2
ROUNDS = 5


def weft_graphs(
    work: Path, nonce: str, settings: str = "", tree: Path | None = None
) -> tuple[float, float]:
    """The times `store-build` takes for the 200 and the chain of 50, on a fresh daemon
    with `settings` (weft.toml lines), run from `tree` (None: this checkout)."""
    state = work / "weft-state"
    state.mkdir(parents=True)
    (state / "weft.toml").write_text(settings)
    d = start_daemon(state, tree=tree)
    try:
        with BlockingClient(d.socket) as client, using(DaemonRecipeStore(client, d.store_dir)):
            bb = busybox()
            sh = f"{bb}/bin/busybox"
            flat = [
                derivation(f"t{i}", sh, ["sh", "-c", f"echo {nonce} {i} > $out"])
                for i in range(INDEPENDENT)
            ]
            chain = [derivation("c0", sh, ["sh", "-c", f"echo {nonce} > $out"])]
            for i in range(1, CHAIN):
                chain.append(derivation(f"c{i}", sh, ["sh", "-c", f"cat {chain[-1]} > $out"]))
            flat_time = _store_build(d.socket, [x.path for x in flat], INDEPENDENT, tree)
            chain_time = _store_build(d.socket, [chain[-1].path], 1, tree)
    finally:
        stop_daemon(d)
    return flat_time, chain_time


def _store_build(socket: str, drvs: list[str], outputs: int, tree: Path | None) -> float:
    """The time `store-build` takes to build `drvs`, once the machine settled."""
    command = [*store_command("store-build", tree), "--socket", socket, "-j", str(JOBS), *drvs]
    settle()
    t = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=tree_env(tree))
    took = time.perf_counter() - t
    assert done.returncode == 0 and len(done.stdout.split()) == outputs, done.stderr[-2000:]
    return took


def _nix(work: Path, nonce: str) -> tuple[float, float] | str:
    try:
        with scratch_nix(work) as nix:
            bb_dir = work / "nix-busybox" / "bin"
            bb_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy("/bin/busybox", bb_dir / "busybox")
            bb = nix("nix-store", "--add", str(bb_dir.parent)).stdout.strip()
            expr = work / "graphs.nix"
            expr.write_text(f"""
let
  bb = builtins.storePath "{bb}";
  mk = name: script: derivation {{
    inherit name; system = "x86_64-linux";
    builder = "${{bb}}/bin/busybox"; args = [ "sh" "-c" script ];
  }};
  chain = n: if n == 0 then mk "c0" "echo {nonce} > $out"
             else mk "c${{toString n}}" "cat ${{chain (n - 1)}} > $out";
in {{
  flat = builtins.genList (i: mk "t${{toString i}}" "echo {nonce} ${{toString i}} > $out")
                          {INDEPENDENT};
  chain = chain {CHAIN - 1};
}}
""")
            flat = nix("nix-instantiate", str(expr), "-A", "flat").stdout.split()
            last = nix("nix-instantiate", str(expr), "-A", "chain").stdout.split()
            settle()
            t = time.perf_counter()
            nix("nix-store", "--realise", "--max-jobs", str(JOBS), *flat)
            flat_time = time.perf_counter() - t
            settle()
            t = time.perf_counter()
            nix("nix-store", "--realise", "--max-jobs", str(JOBS), *last)
            chain_time = time.perf_counter() - t
    except NixUnavailable as e:
        return str(e)
    return flat_time, chain_time


def _scan_rate() -> float:
    candidates = [base32.encode(os.urandom(20)) for _ in range(500)]
    chunk = os.urandom(1 << 20)
    scanner = ReferenceScanner(candidates)
    t = time.perf_counter()
    for _ in range(1024):
        scanner.feed(chunk)
    return 1024 / (time.perf_counter() - t) * 1.048576


def run() -> list[Row]:
    weft: list[tuple[float, float]] = []
    nix: list[tuple[float, float]] = []
    skipped = ""
    with scratch("weft-bench-") as tmp:
        for round_ in range(ROUNDS):
            # Fresh derivations each round (a new nonce), in turn: the disk's and the other
            # users' load change from minute to minute, so each ratio pairs runs taken
            # side by side, and the median of the ratios is reported.
            work = Path(tmp) / f"round-{round_}"
            work.mkdir()
            nonce = uuid.uuid4().hex

            for contender in ("weft", "nix") if round_ % 2 == 0 else ("nix", "weft"):
                if contender == "weft":
                    weft.append(weft_graphs(work, nonce))
                elif not skipped:
                    got = _nix(work, nonce)
                    if isinstance(got, str):
                        skipped = got
                    else:
                        nix.append(got)
    rows: list[Row] = []
    for i, (label, n) in enumerate(
        (
            ("independent trivial derivations", INDEPENDENT),
            ("chain of dependent derivations", CHAIN),
        )
    ):
        w = statistics.median(r[i] for r in weft)
        head = f"{n} {label}, -j{JOBS}"
        if skipped:
            rows.append(
                (head, f"weft {w:.2f} s ({w / n * 1000:.1f} ms each)", f"Nix skipped: {skipped}")
            )
            continue
        x = statistics.median(r[i] for r in nix)
        ratios = [a[i] / b[i] for a, b in zip(weft, nix, strict=True)]
        rows.append(
            (
                head,
                f"weft {w:.2f} s ({w / n * 1000:.1f} ms each), "
                f"nix-daemon {x:.2f} s ({x / n * 1000:.1f} ms each); medians of {ROUNDS} rounds",
                f"weft/nix {statistics.median(ratios):.2f} "
                f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)}); target <= 0.33",
            )
        )
    rows.append(
        (
            "reference scan of 1 GiB against 500 candidates",
            f"{_scan_rate():,.0f} MB/s",
            "target >= 500",
        )
    )
    return rows

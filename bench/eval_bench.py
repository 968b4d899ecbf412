"""Evaluating a recipe, side by side with Nix: the wait a user has before anything builds.

`wide` is 200 trivial leaves and one derivation that reads them all: 201 derivations.
Two whole commands are timed against each daemon, both daemons of a round alive together
(a fresh nonce and fresh daemons each round, so nothing is shared between rounds); the
builds one after the other, in alternated order, then the no-op commands in turns, run by
run, so that each pair meets the same machine:
- evaluate and build them: `store-build wide.py -j2` (its evaluation included) against
  `nix-store --realise` of the derivations `nix-instantiate` made beforehand (Nix's
  evaluation not included, as the issue's row has it);
- the same again with nothing to build: `store-build wide.py` (evaluate, add the `.drv`s,
  check validity) against `nix-build drvs.nix -A wide` (the same three steps).
The medians of each round's weft/Nix ratio are reported: the disk of this VM changes speed
tenfold for minutes, so only ratios of runs taken side by side mean anything.
"""

import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.daemons import start_daemon, stop_daemon
from bench.measure import settle
from bench.nixdaemon import Nix, NixUnavailable, scratch_nix

Row = tuple[str, str, str]
LEAVES = 200
JOBS = 2
ROUNDS = 5
# No-op runs per round and contender, taken in turns: each is short (a tenth of a second),
# so one run is noise, and the machine's load drifts within a round.
NOOP_RUNS = 7
STORE_BUILD = str(Path(sys.executable).parent / "store-build")

RECIPE = """\
from store.recipe import busybox, derivation

bb = busybox()
sh = f"{{bb}}/bin/busybox"
leaves = [
    derivation(f"w{{i}}", sh, ["sh", "-c", f"echo {nonce} {{i}} > $out"]) for i in range({leaves})
]
default = derivation("wide", sh, ["sh", "-c", "cat " + " ".join(map(str, leaves)) + " > $out"])
"""

NIX_EXPR = """
let
  bb = builtins.storePath "{bb}";
  mk = name: script: derivation {{
    inherit name; system = "x86_64-linux";
    builder = "${{bb}}/bin/busybox"; args = [ "sh" "-c" script ];
  }};
  leaves = builtins.genList (i: mk "w${{toString i}}" "echo {nonce} ${{toString i}} > $out")
                            {leaves};
in {{
  wide = mk "wide" "cat ${{toString leaves}} > $out";
}}
"""


def _timed(command: list[str], **kwargs: object) -> float:
    t = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    took = time.perf_counter() - t
    assert done.returncode == 0, done.stderr[-2000:]
    return took


@contextlib.contextmanager
def _weft(work: Path, nonce: str) -> Iterator[tuple[Callable[[], float], Callable[[], float]]]:
    """(evaluate and build, nothing to build) with `store-build`, each a call timing one
    whole command, against a daemon of this round."""
    state = work / "weft-state"
    state.mkdir(parents=True)
    recipe = work / "wide.py"
    recipe.write_text(RECIPE.format(nonce=nonce, leaves=LEAVES))
    d = start_daemon(state)
    try:
        command = [sys.executable, STORE_BUILD, "--socket", d.socket, str(recipe)]
        yield (lambda: _timed([*command, "-j", str(JOBS)])), (lambda: _timed(command))
    finally:
        stop_daemon(d)


def _nix_bb(work: Path, nix: Nix) -> str:
    bb_dir = work / "nix-busybox" / "bin"
    bb_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", bb_dir / "busybox")
    path = nix("nix-store", "--add", str(bb_dir.parent)).stdout.strip()
    _root(nix, work / "nix-bb-root", path)
    return path


def _root(nix: Nix, link: Path, path: str) -> None:
    """A GC root for `path` (a .drv's outputs, built if they are not): the machine's
    /nix/store is shared, and another bench's `nix-store --gc` (bench/gc_bench.py) would
    otherwise take this round's paths, and Nix would build again what it must find valid."""
    nix("nix-store", "--add-root", str(link), "--realise", path)


@contextlib.contextmanager
def _nix(work: Path, nonce: str) -> Iterator[tuple[Callable[[], float], Callable[[], float]]]:
    """(realise the instantiated derivations, nothing to build) with Nix, each a call
    timing one whole command, against a nix-daemon of this round."""
    with scratch_nix(work) as nix:
        expr = work / "drvs.nix"
        expr.write_text(NIX_EXPR.format(bb=_nix_bb(work, nix), nonce=nonce, leaves=LEAVES))
        # The .drv rooted as it is made (its inputs are its references); the outputs once
        # built.  The root's link stands for the .drv in the commands.
        root = str(work / "nix-drv-root")
        drvs = nix("nix-instantiate", "--add-root", root, str(expr), "-A", "wide").stdout.split()

        def build() -> float:
            t = time.perf_counter()
            nix("nix-store", "--realise", "--max-jobs", str(JOBS), *drvs)
            took = time.perf_counter() - t
            _root(nix, work / "nix-out-root", drvs[0])
            return took

        def noop() -> float:
            t = time.perf_counter()
            nix("nix-build", str(expr), "-A", "wide", "--no-out-link")
            return time.perf_counter() - t

        yield build, noop


def _round(work: Path, nonce: str, weft_first: bool) -> tuple[tuple[float, float], ...]:
    """((weft's build, weft's no-op), (Nix's build, Nix's no-op)) of one round: the builds
    one after the other, then the no-op commands in turns, run by run, so that each pair
    sees the same machine."""
    with _weft(work, nonce) as weft, _nix(work, nonce) as nix:
        builds: dict[str, float] = {}
        for name, (build, _) in (("weft", weft), ("nix", nix))[:: 1 if weft_first else -1]:
            settle()
            builds[name] = build()
        noops: dict[str, list[float]] = {"weft": [], "nix": []}
        for i in range(NOOP_RUNS):
            for name, (_, noop) in (("weft", weft), ("nix", nix))[:: 1 if i % 2 else -1]:
                settle()
                noops[name].append(noop())
    return tuple((builds[n], statistics.median(noops[n])) for n in ("weft", "nix"))


def run() -> list[Row]:
    weft: list[tuple[float, float]] = []
    nix: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="weft-bench-", dir="/var/tmp") as tmp:
        for round_ in range(ROUNDS):
            work = Path(tmp) / f"round-{round_}"
            work.mkdir()
            try:
                ours, theirs = _round(work, uuid.uuid4().hex, round_ % 2 == 0)
            except NixUnavailable as e:
                return [("evaluation", "Nix unavailable", str(e))]
            weft.append(ours)
            nix.append(theirs)
    n = LEAVES + 1
    rows: list[Row] = []
    for i, (head, unit, scale, goal) in enumerate(
        (
            (f"evaluate and build {n} trivial derivations, -j{JOBS}", "ms/drv", 1000 / n, 0.25),
            (f"{n} derivations, nothing to build (whole command)", "s", 1.0, 0.5),
        )
    ):
        ratios = [a[i] / b[i] for a, b in zip(weft, nix, strict=True)]
        w = statistics.median(r[i] for r in weft) * scale
        x = statistics.median(r[i] for r in nix) * scale
        met = sum(r <= goal for r in ratios)
        rows.append(
            (
                head,
                f"weft {w:.3g} {unit}, Nix {x:.3g} {unit}; medians of {ROUNDS} rounds",
                f"weft/Nix {statistics.median(ratios):.2f} (rounds: "
                f"{', '.join(f'{r:.2f}' for r in ratios)}); goal <= {goal}, met in {met}/{ROUNDS}",
            )
        )
    return rows

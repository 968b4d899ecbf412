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
`store-build` is the command as install.sh installs it: the command server's client, with
the user's server started (by one untimed command) before the first round, as it is once a
user has run any command in the last quarter of an hour.  The no-op is also timed with
`WEFT_COMMAND_SERVER=0`, the interpreter's start and the imports paid by each command.
The medians of each round's weft/Nix ratio are reported: the disk of this VM changes speed
tenfold for minutes, so only ratios of runs taken side by side mean anything.
"""

import contextlib
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.daemons import command_server, start_daemon, stop_daemon
from bench.measure import scratch, settle
from bench.nixdaemon import Nix, NixUnavailable, scratch_nix

Row = tuple[str, str, str]
LEAVES = 200
JOBS = 2
ROUNDS = 5
# No-op runs per round and contender, taken in turns: each is short (a tenth of a second),
# so one run is noise, and the machine's load drifts within a round.
NOOP_RUNS = 7
STORE_BUILD = str(Path(sys.executable).parent / "store-build")
DIRECT = {"WEFT_COMMAND_SERVER": "0"}

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


Weft = tuple[Callable[[], float], Callable[[], float], Callable[[], float]]


@contextlib.contextmanager
def _weft(work: Path, nonce: str, env: dict[str, str]) -> Iterator[Weft]:
    """(evaluate and build, nothing to build, nothing to build without the command
    server) with `store-build`, each a call timing one whole command, against a daemon of
    this round."""
    state = work / "weft-state"
    state.mkdir(parents=True)
    recipe = work / "wide.py"
    recipe.write_text(RECIPE.format(nonce=nonce, leaves=LEAVES))
    d = start_daemon(state)
    try:
        command = [STORE_BUILD, "--socket", d.socket, str(recipe)]
        yield (
            lambda: _timed([*command, "-j", str(JOBS)], env=env),
            lambda: _timed(command, env=env),
            lambda: _timed(command, env={**env, **DIRECT}),
        )
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


def _round(
    work: Path, nonce: str, weft_first: bool, env: dict[str, str]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """((weft's build, no-op, no-op without the server), (Nix's build, no-op)) of one
    round: the builds one after the other, then the no-op commands in turns, run by run,
    so that each pair sees the same machine."""
    with _weft(work, nonce, env) as weft, _nix(work, nonce) as nix:
        builds: dict[str, float] = {}
        for name, build in (("weft", weft[0]), ("nix", nix[0]))[:: 1 if weft_first else -1]:
            settle()
            builds[name] = build()
        noops: dict[str, list[float]] = {"weft": [], "direct": [], "nix": []}
        contenders = (("weft", weft[1]), ("direct", weft[2]), ("nix", nix[1]))
        for i in range(NOOP_RUNS):
            for name, noop in contenders[:: 1 if i % 2 else -1]:
                settle()
                noops[name].append(noop())
    med = {n: statistics.median(t) for n, t in noops.items()}
    return (builds["weft"], med["weft"], med["direct"]), (builds["nix"], med["nix"])


def run() -> list[Row]:
    weft: list[tuple[float, ...]] = []
    nix: list[tuple[float, ...]] = []
    with (
        scratch("weft-bench-") as tmp,
        command_server(Path(tmp) / "run") as env,
    ):
        for round_ in range(ROUNDS):
            work = Path(tmp) / f"round-{round_}"
            work.mkdir()
            try:
                ours, theirs = _round(work, uuid.uuid4().hex, round_ % 2 == 0, env)
            except NixUnavailable as e:
                return [("evaluation", "Nix unavailable", str(e))]
            weft.append(ours)
            nix.append(theirs)
    n = LEAVES + 1
    rows: list[Row] = []
    for i, j, head, unit, scale, goal in (
        (0, 0, f"evaluate and build {n} trivial derivations, -j{JOBS}", "ms/drv", 1000 / n, 0.25),
        (1, 1, f"{n} derivations, nothing to build (whole command)", "s", 1.0, 0.5),
        (2, 1, "the same, WEFT_COMMAND_SERVER=0 (no command server)", "s", 1.0, None),
    ):
        ratios = [a[i] / b[j] for a, b in zip(weft, nix, strict=True)]
        w = statistics.median(r[i] for r in weft) * scale
        x = statistics.median(r[j] for r in nix) * scale
        verdict = "" if goal is None else f"; goal <= {goal}, met in "
        verdict += "" if goal is None else f"{sum(r <= goal for r in ratios)}/{ROUNDS}"
        rows.append(
            (
                head,
                f"weft {w:.3g} {unit}, Nix {x:.3g} {unit}; medians of {ROUNDS} rounds",
                f"weft/Nix {statistics.median(ratios):.2f} (rounds: "
                f"{', '.join(f'{r:.2f}' for r in ratios)}){verdict}",
            )
        )
    return rows

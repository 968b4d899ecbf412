"""`store-run` as a user runs it, beside `nix shell` and beside a plain exec.

The profile is one store path P holding `bin/true` (a copy of the system's `true`), added
to a weft daemon this bench starts and, with `nix-store --add`, to a scratch nix-daemon's
store: `store-run -p P -- true`, `nix shell P -c true` and `env PATH=P/bin true` all run
that same binary, so what differs is what each does before the exec.  Each is timed as a
whole command (interpreter or binary start, the daemon's round trips, the runtime weft
registers, the exec); the interpreter's own start is timed beside them, for scale.

The commands take tens of milliseconds, and the disk here changes speed tenfold for
minutes at a time, so no lone time is the claim: the contenders run in turn, each round
starting with the next one, and the table reports the median of each round's ratio.

The Nix column needs Debian's nix-bin (install.sh installs it); when the scratch
nix-daemon cannot be started or `nix shell` fails, the row says why.
"""

import contextlib
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.daemons import start_daemon, stop_daemon
from bench.measure import scratch, settle
from bench.nixdaemon import Nix, NixUnavailable, scratch_nix
from daemon.cli.blocking import BlockingClient

Row = tuple[str, str, str]
# Whole commands of 2 to 300 ms, five contenders: 31 rounds (and one thrown away, cold
# caches) keep the bench well under a minute with the two daemons' start-up.
ROUNDS = 31
STORE_RUN = str(Path(sys.executable).parent / "store-run")
TREE_NAME = "weft-run-bench"

WEFT_RUN = "weft store-run -- true"
WEFT_PRINT = "weft store-run --print-env"
NIX_SHELL = "nix shell -c true"
PLAIN = "env PATH=P/bin true"
PYTHON = "python -c pass"


def _tree(work: Path) -> Path:
    """The profile's contents: a directory with `bin/true`, a small real executable."""
    tree = work / TREE_NAME
    (tree / "bin").mkdir(parents=True)
    shutil.copy(shutil.which("true") or "/bin/true", tree / "bin" / "true")
    return tree


def _command(argv: list[str], env: dict[str, str] | None = None) -> Callable[[], str]:
    """A contender: runs `argv` as a whole process, fails loudly, returns its stdout."""

    def run() -> str:
        done = subprocess.run(argv, capture_output=True, text=True, env=env)
        assert done.returncode == 0, f"{argv}: {done.stderr[-2000:]}"
        return done.stdout

    return run


def _nix_contender(
    stack: contextlib.ExitStack, work: Path, tree: Path
) -> Callable[[], object] | str:
    """`nix shell P -c true` against a scratch nix-daemon that `stack` stops, checked
    once; else why Nix is left out."""
    try:
        nix = stack.enter_context(scratch_nix(work))
        path = nix("nix-store", "--add", str(tree)).stdout.strip()
        stack.callback(_forget, nix, path)
        _check_path(nix("nix", "shell", path, "-c", "printenv", "PATH").stdout, path)
    except NixUnavailable as e:
        return str(e)
    return lambda: nix("nix", "shell", path, "-c", "true")


def _forget(nix: Nix, path: str) -> None:
    with contextlib.suppress(NixUnavailable):
        nix("nix-store", "--delete", path)


def _check_path(printed: str, path: str) -> None:
    """The command ran with P's bin first on PATH, so `true` was P's."""
    assert printed.split(":")[0] == f"{path}/bin", printed


def _alternate(contenders: dict[str, Callable[[], object]]) -> dict[str, list[float]]:
    """Each contender's time in each round, the rounds' orders rotated."""
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    settle()
    for round_ in range(ROUNDS + 1):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            t = time.perf_counter()
            contenders[name]()
            took = time.perf_counter() - t
            if round_:
                times[name].append(took)
    return times


def _ratio(times: dict[str, list[float]], name: str, reference: str) -> tuple[float, str]:
    ratios = [a / b for a, b in zip(times[name], times[reference], strict=True)]
    spread = f"{min(ratios):.2f} to {max(ratios):.2f}"
    return statistics.median(ratios), spread


def _ms(times: dict[str, list[float]], name: str) -> str:
    return f"{statistics.median(times[name]) * 1000:.1f} ms"


def _rows(times: dict[str, list[float]], skipped: str) -> list[Row]:
    rounds = f"median of {ROUNDS} alternated rounds"
    rows: list[Row] = []
    for measure, name, aside in (
        ("store-run -p P -- true, whole command", WEFT_RUN, ""),
        # `nix print-dev-env` wants a derivation: Nix prints no environment of a store path.
        ("store-run -p P --print-env, whole command", WEFT_PRINT, "; Nix prints none"),
    ):
        if skipped:
            rows.append((measure, f"weft {_ms(times, name)}", f"Nix skipped: {skipped}"))
            continue
        ratio, spread = _ratio(times, name, NIX_SHELL)
        rows.append(
            (
                measure,
                f"weft {_ms(times, name)}, Nix `nix shell P -c true` {_ms(times, NIX_SHELL)}, "
                f"ratio weft/Nix {ratio:.2f}",
                f"{rounds}; rounds' ratios {spread}{aside}",
            )
        )
    ratio, spread = _ratio(times, WEFT_RUN, PLAIN)
    extra = statistics.median(a - b for a, b in zip(times[WEFT_RUN], times[PLAIN], strict=True))
    rows.append(
        (
            "store-run -p P -- true over `env PATH=P/bin true`",
            f"weft {_ms(times, WEFT_RUN)}, plain exec {_ms(times, PLAIN)}, "
            f"ratio {ratio:.1f} (+{extra * 1000:.1f} ms a run)",
            f"{rounds}; rounds' ratios {spread}",
        )
    )
    python, _ = _ratio(times, PYTHON, WEFT_RUN)
    rows.append(
        (
            "python -c pass (the interpreter's start, for scale)",
            f"{_ms(times, PYTHON)}, {python:.2f} of store-run -p P -- true",
            rounds,
        )
    )
    return rows


def run() -> list[Row]:
    with scratch("weft-run-bench-") as tmp:
        work = Path(tmp)
        tree = _tree(work)
        d = start_daemon(work / "weft-state")
        try:
            with BlockingClient(d.socket) as client:
                path = client.call("add-from-path", path=str(tree))["path"]
            store_run = [STORE_RUN, "--socket", d.socket, "-p", path]
            _check_path(_command([*store_run, "--", "printenv", "PATH"])(), path)
            contenders: dict[str, Callable[[], object]] = {
                WEFT_RUN: _command([*store_run, "--", "true"]),
                WEFT_PRINT: _command([*store_run, "--print-env"]),
                PLAIN: _command(["env", f"PATH={path}/bin", "true"]),
                PYTHON: _command([sys.executable, "-c", "pass"]),
            }
            with contextlib.ExitStack() as stack:
                nix_shell = _nix_contender(stack, work, tree)
                skipped = ""
                if isinstance(nix_shell, str):
                    skipped = nix_shell
                else:
                    contenders[NIX_SHELL] = nix_shell
                times = _alternate(contenders)
        finally:
            stop_daemon(d)
    return _rows(times, skipped)

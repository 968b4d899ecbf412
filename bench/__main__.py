"""`python -m bench [NAME...]`: run benchmarks, print their tables, append them to RESULTS.md."""

import argparse
import compileall
import datetime
import os
import platform
from collections.abc import Callable
from pathlib import Path

from bench import (
    bigadd_bench,
    build_bench,
    daemon_bench,
    eval_bench,
    flaky_bench,
    gc_bench,
    locker_bench,
    remote_bench,
    run_bench,
    spawner_bench,
    store_bench,
    tricks_bench,
)

BENCHES: dict[str, Callable[[], list[tuple[str, str, str]]]] = {
    "store": store_bench.run,
    "daemon": daemon_bench.run,
    "locker": locker_bench.run,
    "spawner": spawner_bench.run,
    "build": build_bench.run,
    "eval": eval_bench.run,
    "gc": gc_bench.run,
    "flaky": flaky_bench.run,
    "tricks": tricks_bench.run,
    "run": run_bench.run,
    "bigadd": bigadd_bench.run,
    "remote": remote_bench.run,
}
RESULTS = Path(__file__).parent / "RESULTS.md"


def _table(name: str, rows: list[tuple[str, str, str]]) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{os.cpu_count()} cores, Linux {platform.release()}"
    head = (
        f"## {name} — {now}\n\n"
        f"{machine}, Python {platform.python_version()}\n\n"
        "| measure | result | note |\n|---|---|---|\n"
    )
    return head + "".join(f"| {a} | {b} | {c} |\n" for a, b, c in rows)


def main() -> None:
    # Measure what install.sh leaves: compiled bytecode, even where writing it is disabled.
    compileall.compile_dir(str(Path(__file__).parent.parent), quiet=2, maxlevels=1)
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("names", nargs="*", choices=[*BENCHES, []], help="default: all")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    for name in args.names or list(BENCHES):
        table = _table(name, BENCHES[name]())
        print(table)
        if not args.no_record:
            with RESULTS.open("a") as f:
                f.write("\n" + table)


if __name__ == "__main__":
    main()

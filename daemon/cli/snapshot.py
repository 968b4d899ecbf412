"""`store-snapshot`: the snapshots builds left (docs/snapshots.md), and forgetting one.

store-snapshot [--json] DRV|OUTPUT    a derivation's snapshots, newest first
store-snapshot [--json] --forget SNAPSHOT
                                      drop a snapshot's record (its owner, or a trusted
                                      user): its store path is then garbage

A snapshot stays in the store, a GC root, until it is forgotten, or until newer ones of
its derivation push it out (a bounded number is kept of each).
"""

import time

from daemon.cli.common import (
    Command,
    Flag,
    UsageError,
    absolute,
    connect,
    human_size,
    lines,
    print_json,
    say,
)

SNAPSHOT = Command(
    "store-snapshot",
    "[--json] (DRV|OUTPUT | --forget SNAPSHOT)",
    "List the snapshots of a derivation's builds (named by its .drv or an output), newest\n"
    "first: what a failed, committed or evicted build kept (docs/snapshots.md); or forget\n"
    "one, which leaves its store path to the next collection.",
    (
        Flag("--json", "print the records as JSON"),
        Flag("--forget", "drop the record of SNAPSHOT (yours, or any if trusted)", "SNAPSHOT"),
    ),
)

# An age in its largest whole unit: how old a snapshot is, not when to the second.
_UNITS = (("d", 86400), ("h", 3600), ("m", 60))


def age(seconds: float) -> str:
    for unit, size in _UNITS:
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(int(seconds), 0)}s"


def _row(record: dict, now: float) -> list[str]:
    return [
        record["path"],
        record["state"],
        record["scope"],
        record["reason"],
        str(record["attempt"]),
        human_size(record["nar_size"]),
        age(now - record["created"]),
    ]


def table(records: list[dict], now: float) -> list[str]:
    """One line a snapshot, the columns padded to their widest cell."""
    rows = [
        ["path", "state", "scope", "reason", "attempt", "size", "age"],
        *(_row(r, now) for r in records),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _forget(opts: dict[str, str | bool], rest: list[str]) -> int:
    if rest:
        raise UsageError("--forget takes one snapshot, and no other path")
    with connect(opts) as client:
        gone = client.call("snapshot-forget", path=absolute(str(opts["--forget"])))
    if "--json" in opts:
        print_json(gone)
    else:
        lines(
            [
                f"forgot {gone['path']}, the {gone['state']} {gone['scope']} snapshot of "
                f"{gone['drv']} (attempt {gone['attempt']}); the next store-gc may delete it"
            ]
        )
    return 0


def store_snapshot(argv: list[str]) -> int:
    opts, rest = SNAPSHOT.parse(argv)
    if "--forget" in opts:
        return _forget(opts, rest)
    if len(rest) != 1:
        raise UsageError("give one derivation or output path, or --forget SNAPSHOT")
    target = absolute(rest[0])
    with connect(opts) as client:
        records = client.call("snapshots", target=target)["snapshots"]
    if "--json" in opts:
        print_json(records)
    elif records:
        lines(table(records, time.time()))
    else:
        say(f"{target}: no snapshots")
    return 0

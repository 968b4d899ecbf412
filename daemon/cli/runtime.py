"""`store-runtime`: the caller's runtimes, the runs `store-run` registered.

store-runtime [--json]                    every runtime of yours, newest first
store-runtime [--json] --show ID          one, with its cwd, pid and children
store-runtime [--json] --lineage ID       ID, its parent, ... up to the outermost
store-runtime --env ID [--pristine] [-0]  the environment it was started from
store-runtime --forget ID                 drop it (and a durable one's GC roots)

The daemon answers each user about their own runtimes only: another user's id is
answered as an id that does not exist.  Environments are printed as they were captured,
byte for byte (`env` prints them so), since a value need not be UTF-8.
"""

import os
import sys
import time

from daemon.cli.common import Command, Flag, UsageError, connect, lines, print_json
from daemon.cli.run import sh_quote

RUNTIME = Command(
    "store-runtime",
    "[--json] [--show ID | --lineage ID] | --env ID [--pristine] [-0] | --forget ID",
    "List your runtimes (each store-run is one: WEFT_RUNTIME in its command's\n"
    "environment), newest first; or show one, its lineage (it, its parent, ... up to the\n"
    "outermost), or the environment it was started from (with --pristine: the one the\n"
    "outermost was started from); or forget one.",
    (
        Flag("--json", "print JSON (argv and cwd decoded as file names are)"),
        Flag("--show", "one runtime in full", "ID"),
        Flag("--lineage", "ID, then its parent, ... the outermost last", "ID"),
        Flag("--env", "the environment ID was started from, NAME=VALUE lines", "ID"),
        Flag("--pristine", "with --env: the outermost ancestor's environment"),
        Flag("--null", "with --env: end each NAME=VALUE with NUL, not newline", short="-0"),
        Flag("--forget", "drop the runtime's record and environments", "ID"),
    ),
)
MODES = ("--show", "--lineage", "--env", "--forget")
# How a time is shown: local time to the second, sortable.
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def store_runtime(argv: list[str]) -> int:
    opts, rest = RUNTIME.parse(argv)
    if rest:
        raise UsageError(f"unexpected argument {rest[0]!r}")
    chosen = [m for m in MODES if m in opts]
    if len(chosen) > 1:
        raise UsageError("give at most one of " + ", ".join(MODES))
    mode = chosen[0] if chosen else ""
    if mode != "--env" and ("--pristine" in opts or "--null" in opts):
        raise UsageError("--pristine and --null are for --env")
    if mode in ("--env", "--forget") and "--json" in opts:
        raise UsageError(f"{mode} prints no JSON")
    as_json = "--json" in opts
    with connect(opts) as client:
        if mode == "--show":
            show(client.call("runtime-show", id=opts["--show"]), as_json)
        elif mode == "--lineage":
            lineage(client.call("runtime-lineage", id=opts["--lineage"]), as_json)
        elif mode == "--env":
            reply = client.call("runtime-env", id=opts["--env"], pristine="--pristine" in opts)
            end = b"\0" if "--null" in opts else b"\n"
            sys.stdout.buffer.write(b"".join(k + b"=" + v + end for k, v in reply["env"]))
        elif mode == "--forget":
            client.call("runtime-forget", id=opts["--forget"])
        else:
            listing(client.call("runtimes"), as_json)
    return 0


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime(TIME_FORMAT, time.localtime(t))


def _command(argv: list[bytes]) -> str:
    return " ".join(sh_quote(os.fsdecode(a)) for a in argv)


def _names(profiles: list[str]) -> str:
    """Profiles by their names (the store path without its hash part)."""
    names = [os.path.basename(p).partition("-")[2] or os.path.basename(p) for p in profiles]
    return ",".join(names) or "-"


def _state(summary: dict) -> str:
    state = "alive" if summary["alive"] else f"ended {_when(summary['ended'])}"
    return f"{state}, durable" if summary["durable"] else state


def _line(summary: dict) -> list[str]:
    return [
        summary["id"],
        _when(summary["started"]),
        _state(summary),
        summary["name"] or "-",
        _names(summary["profiles"]),
        _command(summary["argv"]),
    ]


def _aligned(rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell, the last one (the command) left as it is."""
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]).rstrip()
        for r in rows
    ]


def _decoded(summary: dict) -> dict:
    """A summary as JSON can hold it: bytes decoded as file names are (`os.fsdecode`)."""
    out = dict(summary, argv=[os.fsdecode(a) for a in summary["argv"]])
    if "cwd" in out:
        out["cwd"] = os.fsdecode(out["cwd"])
    return out


def listing(runtimes: list[dict], as_json: bool) -> None:
    if as_json:
        print_json([_decoded(r) for r in runtimes])
        return
    head = ["id", "started", "state", "name", "profiles", "command"]
    lines(_aligned([head, *(_line(r) for r in runtimes)]) if runtimes else [])


def _parent(summary: dict) -> str:
    if summary["parent"] is None:
        return "none (outermost)"
    if summary["parent_status"] == "dangling":
        return f"{summary['parent']} (dangling: forgotten, unknown, or not yours)"
    return summary["parent"]


def show(summary: dict, as_json: bool) -> None:
    if as_json:
        print_json(_decoded(summary))
        return
    out = [
        f"id:       {summary['id']}",
        f"name:     {summary['name'] or '-'}",
        f"parent:   {_parent(summary)}",
        f"started:  {_when(summary['started'])}",
        f"state:    {_state(summary)}" + (f" (pid {summary['pid']})" if summary["alive"] else ""),
        f"command:  {_command(summary['argv'])}",
        f"cwd:      {sh_quote(os.fsdecode(summary['cwd']))}",
        f"children: {' '.join(summary['children']) or '-'}",
        "profiles:",
        *(f"  {p}" for p in summary["profiles"]),
    ]
    lines(out)


def lineage(summaries: list[dict], as_json: bool) -> None:
    if as_json:
        print_json([_decoded(s) for s in summaries])
        return
    out = _aligned([_line(s) for s in summaries])
    if summaries and summaries[-1]["parent_status"] == "dangling":
        out.append(f"{summaries[-1]['parent']}  (dangling: forgotten, unknown, or not yours)")
    lines(out)

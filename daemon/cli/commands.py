"""The store-* commands on store paths (add, dump, log, verify, gc, optimise; the queries
are `query.py`): thin clients of the daemon, one request each.  Each has its `Command`
spec beside it, which `--help` and the parser both read."""

import sys

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

JSON = Flag("--json", "print the result as JSON")

ADD = Command(
    "store-add",
    "[--name NAME] PATH...  |  store-add --nar NAME < ARCHIVE",
    "Add files or directories to the store; print their store paths.",
    (
        Flag("--name", "the store path's name", "NAME", default="the file's name"),
        Flag("--nar", "add the NAR archive read from stdin, as a path named NAME", "NAME"),
    ),
)


def store_add(argv: list[str]) -> int:
    opts, paths = ADD.parse(argv)
    if "--nar" in opts:
        if paths:
            raise UsageError("--nar reads the archive from stdin and takes no paths")
        with connect(opts) as client:
            info = client.upload("add", sys.stdin.buffer.read, name=opts["--nar"])
        lines([info["path"]])
        return 0
    if not paths:
        raise UsageError("no paths given")
    # Every path checked before the first is added.
    wanted = [absolute(p) for p in paths]
    name = opts.get("--name")
    with connect(opts) as client:
        for path in wanted:
            args = {"path": path} | ({"name": name} if name else {})
            lines([client.call("add-from-path", **args)["path"]])
    return 0


def _download_one(path: str, opts: dict[str, str | bool], op: str, **args: object) -> int:
    """Stream what the daemon sends for one path (an archive, a log) to stdout."""
    out, path = sys.stdout.buffer, absolute(path)
    with connect(opts) as client:
        client.download(op, out.write, path=path, **args)
    out.flush()
    return 0


DUMP = Command("store-dump", "PATH > ARCHIVE", "Write a store path as a NAR archive to stdout.")


def store_dump(argv: list[str]) -> int:
    opts, paths = DUMP.parse(argv)
    if len(paths) != 1:
        raise UsageError("give exactly one path")
    return _download_one(paths[0], opts, "dump")


LOG = Command(
    "store-log",
    "[-f] DRV|OUTPUT",
    "Print the build log of a derivation, or of the one that built an output path; of a\n"
    "build still running, what it wrote so far.",
    (Flag("--follow", "then print what a running build writes, until it ends", short="-f"),),
)


def store_log(argv: list[str]) -> int:
    opts, paths = LOG.parse(argv)
    if len(paths) != 1:
        raise UsageError("give exactly one derivation or output path")
    follow = {"follow": True} if "--follow" in opts else {}
    return _download_one(paths[0], opts, "log", **follow)


VERIFY = Command(
    "store-verify",
    "[--check-contents] [--repair] [--json] [PATH...]",
    "Check that registered paths (all, or PATHs) are there; exit 1 if any is missing or corrupt.",
    (
        Flag("--check-contents", "also hash each path's contents and compare"),
        Flag("--repair", "rebuild or forget what is missing or corrupt; exit 1 if some cannot be"),
        JSON,
    ),
)


def store_verify(argv: list[str]) -> int:
    opts, paths = VERIFY.parse(argv)
    repair = "--repair" in opts
    wanted = [absolute(p) for p in paths]
    with connect(opts) as client:
        report = client.call(
            "verify",
            paths=wanted,
            check_contents="--check-contents" in opts,
            repair=repair,
        )
    if "--json" in opts:
        print_json(report)
    for p in report["missing"]:
        say(f"missing: {p}")
    for p, want, got in report["mismatched"]:
        say(f"hash mismatch: {p}: registered {want}, found {got}")
    for p in report.get("repaired", []):
        say(f"repaired: {p}")
    for p in report.get("removed", []):
        say(f"removed from the database: {p}")
    for p, why in report.get("unrepairable", []):
        say(f"cannot repair {p}: {why}")
    say(f"checked {report['checked']} paths")
    if repair:
        return 1 if report["unrepairable"] else 0
    return 0 if not report["missing"] and not report["mismatched"] else 1


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """`1G`, `500M`, `4096`: bytes, with binary suffixes as Nix takes them."""
    number, unit = text[:-1], text[-1:].upper()
    if unit.isdigit():
        number, unit = text, ""
    if not number.isdigit() or unit not in _UNITS:
        raise UsageError(f"bad size {text!r} (a number of bytes, optionally with K, M, G, T)")
    return int(number) * _UNITS[unit]


GC_PRINTS = {
    "--print-roots": "print-roots",
    "--print-live": "print-live",
    "--print-dead": "print-dead",
    "--dry-run": "dry-run",
}


# Under which key `--json` lists what each mode prints.
GC_LISTS = {
    "collect": "deleted",
    "dry-run": "dead",
    "print-dead": "dead",
    "print-live": "live",
    "print-roots": "roots",
}


GC = Command(
    "store-gc",
    "[--print-roots|--print-live|--print-dead|--dry-run] [--max-freed SIZE]\n"
    "                [--json] [--delete PATH...]",
    "Delete store paths no root keeps alive, or list roots, live or dead paths.",
    (
        Flag("--print-roots", "list the roots (`SOURCE -> PATH`), delete nothing"),
        Flag("--print-live", "list the paths the roots keep, delete nothing"),
        Flag("--print-dead", "list the paths a collection would delete, delete nothing"),
        Flag("--dry-run", "list what a collection would delete and its size, delete nothing"),
        Flag(
            "--max-freed",
            "stop once SIZE bytes are freed: 4096, 500M, 1G",
            "SIZE",
            default="no limit",
        ),
        Flag("--delete", "delete only PATHs, and only if dead (else exit 1, and why)"),
        JSON,
    ),
)


def store_gc(argv: list[str]) -> int:
    opts, paths = GC.parse(argv)
    modes = [m for flag, m in GC_PRINTS.items() if flag in opts]
    if len(modes) > 1:
        raise UsageError("give at most one of " + ", ".join(GC_PRINTS))
    mode = modes[0] if modes else "collect"
    if paths and "--delete" not in opts:
        raise UsageError("paths are taken only with --delete")
    if "--delete" in opts and not paths:
        raise UsageError("--delete needs the paths to delete")
    args: dict[str, object] = {"mode": mode, "paths": [absolute(p) for p in paths]}
    if "--max-freed" in opts:
        args["max_freed"] = parse_size(str(opts["--max-freed"]))
    chunks: list[bytes] = []
    with connect(opts) as client:
        result = client.download("gc", chunks.append, **args)
    listing = b"".join(chunks).decode().splitlines()
    if "--json" in opts:
        listed: list[object] = list(listing)
        if mode == "print-roots":
            listed = [
                dict(zip(("source", "path"), r.rsplit(" -> ", 1), strict=True)) for r in listing
            ]
        print_json(result | {GC_LISTS[mode]: listed})
        return 0
    lines(listing)
    if mode == "collect":
        say(f"{result['deleted']} store paths deleted, {human_size(result['bytes_freed'])} freed")
    elif mode == "dry-run":
        say(f"would delete {result['dead']} store paths ({human_size(result['bytes'])})")
    return 0


OPTIMISE = Command(
    "store-optimise",
    "[--json]",
    "Hard-link identical files across the store; print what it saved.",
    (JSON,),
)


def store_optimise(argv: list[str]) -> int:
    opts, rest = OPTIMISE.parse(argv)
    if rest:
        raise UsageError("store-optimise takes no paths")
    with connect(opts) as client:
        stats = client.call("optimise")
    if "--json" in opts:
        print_json(stats)
    else:
        lines(
            [
                f"{stats['bytes_saved']} bytes saved by hard-linking {stats['files_linked']} "
                f"files in {stats['paths']} paths"
            ]
        )
    return 0

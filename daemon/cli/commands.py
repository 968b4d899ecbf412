"""The store-* commands on store paths (add, query, dump, log, verify, gc, optimise):
thin clients of the daemon, one request each."""

import sys

from daemon.cli.blocking import DaemonError
from daemon.cli.common import UsageError, absolute, connect, lines, parse, print_json, say


def store_add(argv: list[str]) -> int:
    opts, paths = parse(argv, {"--nar": True, "--name": True})
    with connect(opts) as client:
        if "--nar" in opts:
            if paths:
                raise UsageError("--nar reads the archive from stdin and takes no paths")
            stdin = sys.stdin.buffer
            info = client.upload("add", stdin.read, name=opts["--nar"])
            lines([info["path"]])
            return 0
        if not paths:
            raise UsageError("no paths given")
        name = opts.get("--name")
        for p in paths:
            args = {"path": absolute(p)} | ({"name": name} if name else {})
            lines([client.call("add-from-path", **args)["path"]])
    return 0


QUERIES = ("--info", "--references", "--referrers", "--closure", "--valid")


def store_query(argv: list[str]) -> int:
    opts, paths = parse(argv, {q: False for q in QUERIES} | {"--json": False})
    chosen = [q for q in QUERIES if q in opts]
    if len(chosen) != 1:
        raise UsageError("give exactly one of " + ", ".join(QUERIES))
    if not paths:
        raise UsageError("no paths given")
    paths = [absolute(p) for p in paths]
    as_json = "--json" in opts
    query = chosen[0]
    with connect(opts) as client:
        if query == "--valid":
            valid = client.call("is-valid", paths=paths)
            print_json(valid) if as_json else lines(valid)
            return 0 if len(valid) == len(set(paths)) else 1
        if query == "--closure":
            closure = client.call("closure", paths=paths)
            print_json(closure) if as_json else lines(closure)
            return 0
        op = {"--info": "path-info", "--references": "references", "--referrers": "referrers"}
        results = client.call_many([(op[query], {"path": p}) for p in paths])
    for r in results:
        if isinstance(r, DaemonError):
            raise r
    if as_json:
        print_json(results if query == "--info" else dict(zip(paths, results, strict=True)))
    elif query == "--info":
        lines([f"{i['path']}\t{i['nar_hash']}\t{i['nar_size']}" for i in results])
    else:
        lines(list(dict.fromkeys(p for r in results for p in r)))
    return 0


def _download_one(argv: list[str], op: str, what: str) -> int:
    """Stream what the daemon sends for one path (an archive, a log) to stdout."""
    opts, paths = parse(argv, {})
    if len(paths) != 1:
        raise UsageError(f"give exactly one {what}")
    out = sys.stdout.buffer
    with connect(opts) as client:
        client.download(op, out.write, path=absolute(paths[0]))
    out.flush()
    return 0


def store_dump(argv: list[str]) -> int:
    return _download_one(argv, "dump", "path")


def store_log(argv: list[str]) -> int:
    return _download_one(argv, "log", "derivation or output path")


def store_verify(argv: list[str]) -> int:
    opts, paths = parse(argv, {"--json": False, "--check-contents": False, "--repair": False})
    repair = "--repair" in opts
    with connect(opts) as client:
        report = client.call(
            "verify",
            paths=[absolute(p) for p in paths],
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


def store_gc(argv: list[str]) -> int:
    flags = dict.fromkeys(GC_PRINTS, False) | {
        "--max-freed": True,
        "--delete": False,
        "--json": False,
    }
    opts, paths = parse(argv, flags)
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
        say(f"{result['deleted']} store paths deleted, {_mib(result['bytes_freed'])} freed")
    elif mode == "dry-run":
        say(f"would delete {result['dead']} store paths ({_mib(result['bytes'])})")
    return 0


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB"


def store_optimise(argv: list[str]) -> int:
    opts, rest = parse(argv, {"--json": False})
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

"""The store-* commands: thin clients of the daemon.

Results go to stdout, progress and diagnostics to stderr.  Exit codes: 0 success, 1 the
operation failed (or, for `--valid` and `store-verify`, found something invalid), 2 bad
usage.  When no daemon serves the state dir, one is started in the background.

Imports are kept to the protocol and msgpack: every invocation pays for them.
"""

import os
import sys

from daemon.cli.blocking import BlockingClient, DaemonError, NoDaemon
from store.defaults import default_state_dir, socket_path

USAGE = {
    "store-add": "store-add [--name NAME] PATH...  |  store-add --nar NAME < archive",
    "store-query": (
        "store-query (--info|--references|--referrers|--closure|--valid) [--json] PATH..."
    ),
    "store-dump": "store-dump PATH > archive",
    "store-log": "store-log DRV|OUTPUT",
    "store-verify": "store-verify [--check-contents] [--repair] [--json] [PATH...]",
    "store-gc": "store-gc [--print-roots|--print-live|--print-dead|--dry-run] "
    "[--max-freed SIZE] [--json] [--delete PATH...]",
    "store-optimise": "store-optimise [--json]",
    "store-build": "store-build [-j N] [-L] [--keep-going] [-K] [--check] [-o LINK]\n"
    "       [--retries N | --no-retry] TARGET...\n"
    "       (TARGET: a .drv store path, or a recipe file.py[:name])",
    "store-status": "store-status [--json]",
    "store-history": "store-history [--json] (DRV|OUTPUT | --flaky)",
}
COMMON = {"--state-dir": True, "--socket": True, "--help": False}


class UsageError(Exception):
    pass


def parse(argv: list[str], flags: dict[str, bool]) -> tuple[dict[str, str | bool], list[str]]:
    """Flags (`--x`, `-x`, `--x VALUE`, `--x=VALUE`) and positional arguments, in any order."""
    spec = {**COMMON, **flags}
    opts: dict[str, str | bool] = {}
    rest: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--":
            rest.extend(it)
            break
        if not arg.startswith("-") or arg == "-":
            rest.append(arg)
            continue
        name, eq, value = arg.partition("=")
        if name not in spec:
            raise UsageError(f"unknown option {name}")
        if spec[name]:
            if not eq:
                value = next(it, "")
                if not value:
                    raise UsageError(f"{name} needs a value")
            opts[name] = value
        elif eq:
            raise UsageError(f"{name} takes no value")
        else:
            opts[name] = True
    return opts, rest


def _say(message: str) -> None:
    os.write(2, (message + "\n").encode())


def connect(opts: dict[str, str | bool]) -> BlockingClient:
    state = str(opts.get("--state-dir") or default_state_dir())
    path = str(opts.get("--socket") or socket_path(state))
    try:
        return BlockingClient(path)
    except NoDaemon:
        pass
    _say(f"weft: no daemon serves {state}; starting one")
    import subprocess
    import time

    cmd = [sys.executable, "-m", "daemon.main", "--state-dir", state, "--socket", path]
    subprocess.run(cmd, stdin=subprocess.DEVNULL, check=False)
    # Another command may have won the race to start it: wait for whichever daemon is up.
    deadline = time.monotonic() + 10
    while True:
        try:
            return BlockingClient(path)
        except NoDaemon:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _print_json(value: object) -> None:
    import json

    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def _lines(items: list[str]) -> None:
    if items:
        sys.stdout.write("\n".join(items) + "\n")


def _abs(path: str) -> str:
    return os.path.abspath(path)


def store_add(argv: list[str]) -> int:
    opts, paths = parse(argv, {"--nar": True, "--name": True})
    with connect(opts) as client:
        if "--nar" in opts:
            if paths:
                raise UsageError("--nar reads the archive from stdin and takes no paths")
            stdin = sys.stdin.buffer
            info = client.upload("add", stdin.read, name=opts["--nar"])
            _lines([info["path"]])
            return 0
        if not paths:
            raise UsageError("no paths given")
        name = opts.get("--name")
        for p in paths:
            args = {"path": _abs(p)} | ({"name": name} if name else {})
            _lines([client.call("add-from-path", **args)["path"]])
    return 0


QUERIES = ("--info", "--references", "--referrers", "--closure", "--valid")


def store_query(argv: list[str]) -> int:
    opts, paths = parse(argv, {q: False for q in QUERIES} | {"--json": False})
    chosen = [q for q in QUERIES if q in opts]
    if len(chosen) != 1:
        raise UsageError("give exactly one of " + ", ".join(QUERIES))
    if not paths:
        raise UsageError("no paths given")
    paths = [_abs(p) for p in paths]
    as_json = "--json" in opts
    query = chosen[0]
    with connect(opts) as client:
        if query == "--valid":
            valid = client.call("is-valid", paths=paths)
            _print_json(valid) if as_json else _lines(valid)
            return 0 if len(valid) == len(set(paths)) else 1
        if query == "--closure":
            closure = client.call("closure", paths=paths)
            _print_json(closure) if as_json else _lines(closure)
            return 0
        op = {"--info": "path-info", "--references": "references", "--referrers": "referrers"}
        results = client.call_many([(op[query], {"path": p}) for p in paths])
    for r in results:
        if isinstance(r, DaemonError):
            raise r
    if as_json:
        _print_json(results if query == "--info" else dict(zip(paths, results, strict=True)))
    elif query == "--info":
        _lines([f"{i['path']}\t{i['nar_hash']}\t{i['nar_size']}" for i in results])
    else:
        _lines(list(dict.fromkeys(p for r in results for p in r)))
    return 0


def _download_one(argv: list[str], op: str, what: str) -> int:
    """Stream what the daemon sends for one path (an archive, a log) to stdout."""
    opts, paths = parse(argv, {})
    if len(paths) != 1:
        raise UsageError(f"give exactly one {what}")
    out = sys.stdout.buffer
    with connect(opts) as client:
        client.download(op, out.write, path=_abs(paths[0]))
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
            paths=[_abs(p) for p in paths],
            check_contents="--check-contents" in opts,
            repair=repair,
        )
    if "--json" in opts:
        _print_json(report)
    for p in report["missing"]:
        _say(f"missing: {p}")
    for p, want, got in report["mismatched"]:
        _say(f"hash mismatch: {p}: registered {want}, found {got}")
    for p in report.get("repaired", []):
        _say(f"repaired: {p}")
    for p in report.get("removed", []):
        _say(f"removed from the database: {p}")
    for p, why in report.get("unrepairable", []):
        _say(f"cannot repair {p}: {why}")
    _say(f"checked {report['checked']} paths")
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
    args: dict[str, object] = {"mode": mode, "paths": [_abs(p) for p in paths]}
    if "--max-freed" in opts:
        args["max_freed"] = parse_size(str(opts["--max-freed"]))
    chunks: list[bytes] = []
    with connect(opts) as client:
        result = client.download("gc", chunks.append, **args)
    lines = b"".join(chunks).decode().splitlines()
    if "--json" in opts:
        listed: list[object] = list(lines)
        if mode == "print-roots":
            listed = [
                dict(zip(("source", "path"), r.rsplit(" -> ", 1), strict=True)) for r in lines
            ]
        _print_json(result | {GC_LISTS[mode]: listed})
        return 0
    _lines(lines)
    if mode == "collect":
        _say(f"{result['deleted']} store paths deleted, {_mib(result['bytes_freed'])} freed")
    elif mode == "dry-run":
        _say(f"would delete {result['dead']} store paths ({_mib(result['bytes'])})")
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
        _print_json(stats)
    else:
        _lines(
            [
                f"{stats['bytes_saved']} bytes saved by hard-linking {stats['files_linked']} "
                f"files in {stats['paths']} paths"
            ]
        )
    return 0


def store_build(argv: list[str]) -> int:
    # Recipes need the store package and more: only store-build pays for importing them.
    from daemon.cli.build import main

    return main(argv)


def store_status(argv: list[str]) -> int:
    from daemon.cli.sched import store_status

    return store_status(argv)


def store_history(argv: list[str]) -> int:
    from daemon.cli.sched import store_history

    return store_history(argv)


COMMANDS = {
    "store-build": store_build,
    "store-add": store_add,
    "store-query": store_query,
    "store-dump": store_dump,
    "store-log": store_log,
    "store-verify": store_verify,
    "store-gc": store_gc,
    "store-optimise": store_optimise,
    "store-status": store_status,
    "store-history": store_history,
}


def run(name: str) -> int:
    argv = sys.argv[1:]
    if "--help" in argv or "-h" in argv:
        sys.stdout.write(f"usage: {USAGE[name]}\n       [--state-dir DIR] [--socket PATH]\n")
        return 0
    try:
        return COMMANDS[name](argv)
    except UsageError as e:
        _say(f"{name}: {e}\nusage: {USAGE[name]}")
        return 2
    except DaemonError as e:
        _say(f"error: {e.message}")
        return 1
    except (OSError, ConnectionError) as e:
        _say(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        return 130

"""`python -m store`: work on a state dir directly, with no daemon (for admins and tests).

Results go to stdout, errors to stderr.  Exit codes: 0 success, 1 the store refused or
found a problem, 2 bad usage.
"""

import argparse
import json
import sys
from dataclasses import asdict

from store import nar
from store.layout import ConfigError, StateDir
from store.nar import NarError, UnsupportedFileType
from store.paths import InvalidPath
from store.store import Store, StoreError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m store", description=__doc__)
    p.add_argument("--state-dir", help="state dir (default: $WEFT_STATE_DIR or per user)")
    p.add_argument("--init", action="store_true", help="create the store if --state-dir has none")
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="add files or trees as source paths")
    add.add_argument("paths", nargs="+")
    add.add_argument("--name", help="store path name (default: the file's name)")
    add_text = sub.add_parser("add-text", help="add stdin as a text file with references")
    add_text.add_argument("name")
    add_text.add_argument("--ref", action="append", default=[], help="a path it refers to")
    add_nar = sub.add_parser("add-nar", help="add an archive read from stdin")
    add_nar.add_argument("name")
    sub.add_parser("dump", help="write a path's archive to stdout").add_argument("path")
    info = sub.add_parser("info", help="show path info")
    info.add_argument("paths", nargs="+")
    info.add_argument("--json", action="store_true")
    sub.add_parser("references", help="list references").add_argument("path")
    sub.add_parser("referrers", help="list referrers").add_argument("path")
    sub.add_parser("closure", help="list the closure, references first").add_argument(
        "paths", nargs="+"
    )
    verify = sub.add_parser("verify", help="re-hash valid paths")
    verify.add_argument("paths", nargs="*")
    return p


def _run(args: argparse.Namespace, store: Store) -> int:
    out = sys.stdout
    if args.command == "add":
        for path in args.paths:
            print(store.add_path(path, name=args.name).path, file=out)
    elif args.command == "add-text":
        print(store.add_text(args.name, sys.stdin.buffer.read(), args.ref).path, file=out)
    elif args.command == "add-nar":
        print(store.add_nar(sys.stdin.buffer.read, args.name).path, file=out)
    elif args.command == "dump":
        if not store.is_valid(args.path):
            raise StoreError(f"path {args.path!r} is not valid")
        for chunk in nar.dump(args.path):
            sys.stdout.buffer.write(chunk)
    elif args.command == "info":
        infos = []
        for path in args.paths:
            info = store.path_info(path)
            if info is None:
                raise StoreError(f"path {path!r} is not valid")
            infos.append(info)
        if args.json:
            print(json.dumps([asdict(i) for i in infos], indent=2), file=out)
        else:
            for i in infos:
                print(f"{i.path}\t{i.nar_hash}\t{i.nar_size}", file=out)
    elif args.command in ("references", "referrers"):
        for p in getattr(store, args.command)(args.path):
            print(p, file=out)
    elif args.command == "closure":
        for p in store.closure(args.paths):
            print(p, file=out)
    elif args.command == "verify":
        report = store.verify(args.paths or None)
        for p in report.missing:
            print(f"missing: {p}", file=sys.stderr)
        for p, want, got in report.mismatched:
            print(f"hash mismatch: {p}: registered {want}, found {got}", file=sys.stderr)
        print(f"checked {report.checked} paths", file=sys.stderr)
        return 0 if report.ok else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        state = StateDir.at(args.state_dir)
        # As store-daemon: a named state dir is not made by mistake (a typo).
        if args.state_dir and not args.init and not state.has_store():
            raise ConfigError(f"no store at {state.root}; --init creates one")
        with Store(state) as store:
            return _run(args, store)
    except (StoreError, InvalidPath, NarError, UnsupportedFileType, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""`store-export PATH... > FILE` and `store-import < FILE`: closures between stores, as
`nix-store --export` and `--import` move them, in one self-describing stream
(`docs/export.md`).

The daemon writes and checks the stream; these commands only carry it between the socket
and a file or pipe, and refuse a terminal: the stream is binary.
"""

import os
import sys

from daemon.cli.blocking import DaemonError
from daemon.cli.common import Command, UsageError, connect, human_size, lines, say
from daemon.cli.storegraph import fetch_graph, resolve_all

EXPORT = Command(
    "store-export",
    "PATH... > FILE",
    "Write the closure of the paths (contents, references, derivers) as one stream\n"
    "for store-import, references first.  A PATH may be a link to a store path (./result).",
)
IMPORT = Command(
    "store-import",
    "< FILE",
    "Add a stream store-export wrote, all of it or nothing: every archive checked against\n"
    "its hash, every path against its contents, every reference within the stream or this\n"
    "store.  Prints the paths now valid, references first.",
)


def store_export(argv: list[str]) -> int:
    opts, args = EXPORT.parse(argv)
    if not args:
        raise UsageError("no paths given")
    if os.isatty(1):
        raise UsageError("the stream is binary: redirect it to a file or a pipe")
    out = sys.stdout.buffer
    with connect(opts) as client:
        roots = resolve_all(client, args)
        try:
            result = client.download("export", out.write, paths=roots)
        except DaemonError:
            say("store-export: the stream written is incomplete; store-import will refuse it")
            raise
    out.flush()
    say(f"exported {result['paths']} paths ({human_size(result['bytes'])})")
    return 0


def store_import(argv: list[str]) -> int:
    opts, args = IMPORT.parse(argv)
    if args:
        raise UsageError("store-import reads the stream from stdin and takes no paths")
    if os.isatty(0):
        raise UsageError("store-import reads a stream from stdin: redirect a file to it")
    with connect(opts) as client:
        result = client.upload("import", sys.stdin.buffer.read)
        graph = fetch_graph(client, result["roots"])
    lines(graph.paths)
    say(f"imported {result['paths']} paths, {result['added']} of them new")
    return 0

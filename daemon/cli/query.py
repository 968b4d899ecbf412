"""`store-query`: questions about store paths, answered as `nix-store -q` answers them.

Arguments are read as Nix reads them (`./result`, a file inside a store path: see
`storegraph.resolve`).  Per-path questions go to the daemon pipelined (`call_many`: one
round trip however many paths); questions about a closure's shape (`--tree`, `--graph`,
`--closure-size`) take the whole graph in one `closure-info` request.  Sizes are in
human units, bytes with `--json`.
"""

from collections.abc import Callable

from daemon.cli.blocking import BlockingClient, DaemonError
from daemon.cli.common import (
    Command,
    CommandError,
    Flag,
    UsageError,
    connect,
    human_size,
    lines,
    print_json,
)
from daemon.cli.storegraph import (
    ClosureGraph,
    draw_tree,
    fetch_graph,
    resolve_all,
)

QUERY = Command(
    "store-query",
    "(--info|--references|--referrers|--closure|--valid|--tree|--graph|--size|\n"
    "       --closure-size|--deriver|--outputs) [--json] PATH...",
    "Ask the daemon about store paths.  A PATH may be a store path, a link to one\n"
    "(./result), or a file inside one (<store>/abc-x/bin/y means <store>/abc-x).",
    (
        Flag("--info", "each path's archive hash and size, tab-separated"),
        Flag("--references", "the paths each path refers to"),
        Flag("--referrers", "the valid paths that refer to each path"),
        Flag("--closure", "every path the paths need, references first"),
        Flag("--valid", "print the valid paths; exit 1 if any is not"),
        Flag("--tree", "the references as a tree; a path met again is marked [...]"),
        Flag("--graph", "the closure's references as a Graphviz DOT graph"),
        Flag("--size", "each path's archive size"),
        Flag("--closure-size", "the archive sizes of each path's closure, summed"),
        Flag("--deriver", "the derivation that built each path (or unknown-deriver)"),
        Flag("--outputs", "a .drv's output paths (another path: itself)"),
        Flag("--json", "print JSON (sizes in bytes)"),
    ),
)
QUERIES = tuple(f.name for f in QUERY.flags if f.name != "--json")


def store_query(argv: list[str]) -> int:
    opts, args = QUERY.parse(argv)
    chosen = [q for q in QUERIES if q in opts]
    if len(chosen) != 1:
        raise UsageError("give exactly one of " + ", ".join(QUERIES))
    if not args:
        raise UsageError("no paths given")
    with connect(opts) as client:
        paths = resolve_all(client, args)
        return ANSWERS[chosen[0]](client, paths, "--json" in opts)


def _valid(client: BlockingClient, paths: list[str], as_json: bool) -> int:
    # Asked once each: `./result` and the path it leads to are the same path.
    unique = list(dict.fromkeys(paths))
    valid = client.call("is-valid", paths=unique)
    print_json(valid) if as_json else lines(valid)
    return 0 if len(valid) == len(unique) else 1


def _closure(client: BlockingClient, paths: list[str], as_json: bool) -> int:
    closure = client.call("closure", paths=paths)
    print_json(closure) if as_json else lines(closure)
    return 0


def _infos(client: BlockingClient, paths: list[str]) -> list[dict]:
    results = client.call_many([("path-info", {"path": p}) for p in paths])
    for r in results:
        if isinstance(r, DaemonError):
            raise r
    return results


def _info(client: BlockingClient, paths: list[str], as_json: bool) -> int:
    infos = _infos(client, paths)
    if as_json:
        print_json(infos)
    else:
        lines([f"{i['path']}\t{i['nar_hash']}\t{i['nar_size']}" for i in infos])
    return 0


def _related(op: str) -> Callable[[BlockingClient, list[str], bool], int]:
    def answer(client: BlockingClient, paths: list[str], as_json: bool) -> int:
        results = client.call_many([(op, {"path": p}) for p in paths])
        for r in results:
            if isinstance(r, DaemonError):
                raise r
        if as_json:
            print_json(dict(zip(paths, results, strict=True)))
        else:
            lines(list(dict.fromkeys(p for r in results for p in r)))
        return 0

    return answer


def _adjacency(graph: ClosureGraph) -> dict[str, list[str]]:
    return {p: [graph.paths[r] for r in graph.refs[i]] for i, p in enumerate(graph.paths)}


def _tree(client: BlockingClient, paths: list[str], as_json: bool) -> int:
    graph = fetch_graph(client, paths)
    if as_json:
        print_json(_adjacency(graph))
    else:
        roots = [graph.index[p] for p in dict.fromkeys(paths)]
        lines(list(draw_tree(graph, roots, graph.children)))
    return 0


def _dot_quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _graph(client: BlockingClient, paths: list[str], as_json: bool) -> int:
    """Nix's DOT (`nix-store -q --graph`): a box per path, labelled with its name, and an
    edge from each reference to the path that refers to it."""
    graph = fetch_graph(client, paths)
    if as_json:
        print_json(_adjacency(graph))
        return 0
    out = ["digraph G {"]
    for i, path in enumerate(graph.paths):
        name = path.rpartition("/")[2].partition("-")[2]
        out.append(
            f"{_dot_quoted(path)} [label = {_dot_quoted(name)}, shape = box, "
            'style = filled, fillcolor = "#ffffff"];'
        )
        out += [
            f'{_dot_quoted(graph.paths[r])} -> {_dot_quoted(path)} [color = "black"];'
            for r in graph.children(i)
        ]
    out.append("}")
    lines(out)
    return 0


def _sizes(sizes: dict[str, int], as_json: bool) -> int:
    if as_json:
        print_json(sizes)
    else:
        lines([f"{human_size(n)}\t{p}" for p, n in sizes.items()])
    return 0


def _size(client: BlockingClient, paths: list[str], as_json: bool) -> int:
    return _sizes({i["path"]: i["nar_size"] for i in _infos(client, paths)}, as_json)


def _closure_size(client: BlockingClient, paths: list[str], as_json: bool) -> int:
    graph = fetch_graph(client, paths)
    sizes = {
        p: sum(graph.sizes[i] for i in graph.reachable(graph.index[p]))
        for p in dict.fromkeys(paths)
    }
    return _sizes(sizes, as_json)


def _deriver(client: BlockingClient, paths: list[str], as_json: bool) -> int:
    derivers = {i["path"]: i["deriver"] for i in _infos(client, paths)}
    if as_json:
        print_json(derivers)
    else:
        lines([d or "unknown-deriver" for d in derivers.values()])
    return 0


def _outputs(client: BlockingClient, paths: list[str], as_json: bool) -> int:
    """A `.drv`'s outputs, read from the derivation itself (store files are readable by
    all) once the daemon has said it is valid; any other path stands for itself."""
    import json  # only here: it brings `re`, which every other query would pay for

    drvs = [p for p in dict.fromkeys(paths) if p.endswith(".drv")]
    valid = set(client.call("is-valid", paths=drvs)) if drvs else set()
    outputs: dict[str, list[str]] = {}
    for p in paths:
        if not p.endswith(".drv"):
            outputs[p] = [p]
            continue
        if p not in valid:
            raise CommandError(f"error: path {p!r} is not valid")
        try:
            with open(p, "rb") as f:
                doc = json.loads(f.read())
            outputs[p] = [doc["outputs"][k]["path"] for k in sorted(doc["outputs"])]
        except (ValueError, KeyError, TypeError) as e:
            raise CommandError(f"error: {p} is not a derivation weft reads: {e}") from None
    print_json(outputs) if as_json else lines([o for out in outputs.values() for o in out])
    return 0


ANSWERS: dict[str, Callable[[BlockingClient, list[str], bool], int]] = {
    "--info": _info,
    "--references": _related("references"),
    "--referrers": _related("referrers"),
    "--closure": _closure,
    "--valid": _valid,
    "--tree": _tree,
    "--graph": _graph,
    "--size": _size,
    "--closure-size": _closure_size,
    "--deriver": _deriver,
    "--outputs": _outputs,
}

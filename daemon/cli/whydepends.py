"""`store-why-depends PACKAGE DEPENDENCY`: why a closure holds a path, as `nix why-depends`
shows it: a shortest chain of references from PACKAGE to DEPENDENCY drawn as a tree, or with
`--all` every path of PACKAGE's closure that leads to DEPENDENCY.

The whole closure comes in one `closure-info` request; the distances to DEPENDENCY are one
breadth-first walk over the referrers within it, so every answer costs O(closure).
"""

from collections.abc import Callable

from daemon.cli.common import Command, Flag, UsageError, connect, lines, say
from daemon.cli.storegraph import ClosureGraph, draw_tree, fetch_graph, resolve_all

WHY_DEPENDS = Command(
    "store-why-depends",
    "[--all] PACKAGE DEPENDENCY",
    "Show why PACKAGE's closure contains DEPENDENCY: a shortest chain of references\n"
    "from one to the other.  Exit 1 if PACKAGE does not depend on DEPENDENCY.  Either may\n"
    "be a link to a store path (./result) or a file inside one.",
    (
        Flag(
            "--all", "every path of the closure that leads to DEPENDENCY, not one chain", short="-a"
        ),
    ),
)


def store_why_depends(argv: list[str]) -> int:
    opts, args = WHY_DEPENDS.parse(argv)
    if len(args) != 2:
        raise UsageError("give a package and a dependency")
    with connect(opts) as client:
        package, dependency = resolve_all(client, args)
        graph = fetch_graph(client, [package])
    target = graph.index.get(dependency)
    if target is None:
        say(f"'{package}' does not depend on '{dependency}'")
        return 1
    dist = distances(graph, target)
    root = graph.index[package]

    def leading(node: int) -> list[int]:
        """The references of `node` that lead to the dependency, nearest first."""
        near = [r for r in graph.children(node) if r in dist]
        return sorted(near, key=lambda r: (dist[r], r))

    if "--all" in opts:
        lines(list(draw_tree(graph, [root], leading)))
    else:
        chain = {node: [nxt] for node, nxt in _shortest_chain(root, target, leading)}
        lines(list(draw_tree(graph, [root], lambda node: chain.get(node, []))))
    return 0


def distances(graph: ClosureGraph, target: int) -> dict[int, int]:
    """Each path of the graph that reaches `target`, and in how many references at least."""
    referrers: dict[int, list[int]] = {}
    for node, refs in enumerate(graph.refs):
        for r in set(refs) - {node}:
            referrers.setdefault(r, []).append(node)
    dist = {target: 0}
    frontier = [target]
    while frontier:
        nxt = []
        for node in frontier:
            for up in referrers.get(node, ()):
                if up not in dist:
                    dist[up] = dist[node] + 1
                    nxt.append(up)
        frontier = nxt
    return dist


def _shortest_chain(
    root: int, target: int, leading: Callable[[int], list[int]]
) -> list[tuple[int, int]]:
    """The steps (path, next path) of one shortest chain: the nearest reference each time."""
    steps = []
    node = root
    while node != target:
        nxt = leading(node)[0]
        steps.append((node, nxt))
        node = nxt
    return steps

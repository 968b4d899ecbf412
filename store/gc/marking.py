"""Marking: from the roots, through references, every live path; the rest, ordered
referrers first, is the plan a deletion follows.

Everything a root reaches through references is live, with Nix's `keep-derivations` (the
derivation that built a live path) and `keep-outputs` (the outputs of a live derivation).
The graph is read in one snapshot; paths pinned or added after it are dealt with at
deletion (`store.gc.deletion`), so a plan may be stale but never unsafe.
"""

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from store.errors import StoreError
from store.gc.roots import Root, find_roots
from store.store import Store


class StillAlive(StoreError):
    """`--delete` named a path that is still reachable from a root."""


@dataclass(slots=True)
class Graph:
    """Every valid path, its references, deriver and outputs, by row id."""

    paths: dict[int, str]
    ids: dict[str, int]
    refs: dict[int, list[int]]
    derivers: dict[int, int]
    outputs: dict[int, list[int]]
    sizes: dict[int, int]


@dataclass(slots=True)
class Plan:
    roots: list[Root]
    live: set[str]
    dead: list[str]  # referrers before references, wave by wave: the order to delete in
    sizes: dict[str, int] = field(default_factory=dict)
    # Of each dead path, its row id when marked and its wave: no dead path refers to one of
    # its own wave, so a wave's paths go in one statement (`store.gc.deletion`).
    rows: dict[str, tuple[int, int]] = field(default_factory=dict)


# The derivation that built each path, and the outputs of each derivation, both valid:
# joined by the database, so that only row ids cross into Python (a store's derivers are
# as many strings as it has outputs).
_DERIVERS = "SELECT v.id, d.id FROM ValidPaths AS v JOIN ValidPaths AS d ON d.path = v.deriver"
_OUTPUTS = "SELECT o.drv, v.id FROM DerivationOutputs AS o JOIN ValidPaths AS v ON v.path = o.path"
_REFS = "SELECT referrer, reference FROM Refs WHERE referrer != reference"


def load_graph(store: Store) -> Graph:
    with store.db.read() as conn:
        rows = conn.execute("SELECT id, path, nar_size FROM ValidPaths").fetchall()
        derivers: dict[int, int] = dict(conn.execute(_DERIVERS).fetchall())
        ref_rows = conn.execute(_REFS).fetchall()
        out_rows = conn.execute(_OUTPUTS).fetchall()
    paths = {i: p for i, p, _ in rows}
    ids = dict(zip(paths.values(), paths.keys(), strict=True))
    sizes = {i: s for i, _, s in rows}
    refs: dict[int, list[int]] = {}
    for referrer, reference in ref_rows:
        refs.setdefault(referrer, []).append(reference)
    outputs: dict[int, list[int]] = {}
    for drv, out in out_rows:
        outputs.setdefault(drv, []).append(out)
    return Graph(paths, ids, refs, derivers, outputs, sizes)


def mark(
    graph: Graph, roots: Iterable[str], keep_outputs: bool, keep_derivations: bool
) -> set[int]:
    """Row ids of every path the roots reach."""
    live: set[int] = set()
    todo = deque(graph.ids[p] for p in roots if p in graph.ids)
    while todo:
        node = todo.popleft()
        if node in live:
            continue
        live.add(node)
        todo.extend(graph.refs.get(node, ()))
        if keep_derivations and node in graph.derivers:
            todo.append(graph.derivers[node])
        if keep_outputs:
            todo.extend(graph.outputs.get(node, ()))
    return live


def referrers_first(graph: Graph, dead: set[int]) -> list[tuple[int, int]]:
    """Dead paths with their waves, in the order to delete them: wave 0 is what no dead
    path refers to, wave n+1 what only paths of waves up to n refer to; within a wave, by
    row id (neighbours in the table go together)."""
    waiting = dict.fromkeys(dead, 0)
    for node in dead:
        for ref in set(graph.refs.get(node, ())):
            if ref in waiting:
                waiting[ref] += 1
    wave = sorted(n for n, k in waiting.items() if k == 0)
    order: list[tuple[int, int]] = []
    depth = 0
    while wave:
        order += [(node, depth) for node in wave]
        following = []
        for node in wave:
            for ref in set(graph.refs.get(node, ())):
                if ref in waiting:
                    waiting[ref] -= 1
                    if waiting[ref] == 0:
                        following.append(ref)
        wave = sorted(following)
        depth += 1
    return order


def plan(store: Store, keep_outputs: bool = False, keep_derivations: bool = True) -> Plan:
    roots = find_roots(store)
    graph = load_graph(store)
    # Pins taken while the graph loaded count too; later ones are caught at deletion.
    root_paths = {r.path for r in roots} | store.pins.pinned()
    live = mark(graph, root_paths, keep_outputs, keep_derivations)
    dead = referrers_first(graph, set(graph.paths) - live)
    paths = graph.paths
    return Plan(
        roots,
        {paths[i] for i in live},
        [paths[i] for i, _ in dead],
        {paths[i]: graph.sizes[i] for i, _ in dead},
        {paths[i]: (i, wave) for i, wave in dead},
    )


def restrict(full: Plan, paths: Iterable[str], store: Store) -> Plan:
    """The plan for `--delete PATHS`: all of them dead, none needed by a dead path kept."""
    wanted = set(paths)
    for p in sorted(wanted):
        if p in full.live:
            raise StillAlive(f"cannot delete {p}: it is still alive ({_why_alive(full, p, store)})")
        if p not in full.sizes:
            raise StillAlive(f"cannot delete {p}: it is not a valid path")
    for p in sorted(wanted):
        others = [r for r in store.referrers(p) if r not in wanted and r != p]
        if others:
            raise StillAlive(
                f"cannot delete {p}: {others[0]} refers to it (dead too: delete it as well)"
            )
    return Plan(
        full.roots,
        full.live,
        [p for p in full.dead if p in wanted],
        {p: full.sizes[p] for p in wanted},
        {p: full.rows[p] for p in wanted},
    )


def _why_alive(full: Plan, path: str, store: Store) -> str:
    for root in full.roots:
        if root.path == path:
            return f"a root: {root.source}"
    live_referrers = [r for r in store.referrers(path) if r in full.live and r != path]
    if live_referrers:
        return f"referenced by {live_referrers[0]}"
    return "kept by keep-derivations or keep-outputs"


def simulate(gc_plan: Plan, max_freed: int | None) -> list[str]:
    """What `delete` would take, judging sizes by archive size (`--dry-run`)."""
    if max_freed is None:
        return list(gc_plan.dead)
    chosen: list[str] = []
    freed = 0
    for path in gc_plan.dead:
        if freed >= max_freed:
            break
        chosen.append(path)
        freed += gc_plan.sizes.get(path, 0)
    return chosen

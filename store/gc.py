"""Garbage collection: find the roots, mark what they reach, delete the rest.

Roots are symlinks under `var/gcroots/` (a direct root points into the store; an entry of
`auto/` points at a user's link, such as `store-build -o result`, which points into the
store), and the pins of live clients and running builds (`store.pins`).  Everything a
root reaches through references is live, with Nix's `keep-derivations` (the derivation
that built a live path) and `keep-outputs` (the outputs of a live derivation).

Deletion is safe while clients add, pin and build, because the decision for each path is
taken again at the moment it is deleted, in the transaction that unregisters it: a path
pinned since the marking is skipped (`Pins.begin_delete`), and a path that a new path
refers to cannot be unregistered (the database refuses to drop a referenced row), so a
skipped path keeps its whole closure.  Paths go referrers first, in batches of short
transactions; each is renamed out of the store inside its transaction and removed from
disk after the commit.  A crash between rename and commit is undone at the next open
(`Store.recover`).

Every function blocks; the daemon runs them in a worker thread.
"""

import json
import logging
import os
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue

import apsw

from store.paths import StorePath
from store.store import Store, StoreError
from store.tmparea import remove_tree

log = logging.getLogger("weft.gc")


class StillAlive(StoreError):
    """`--delete` named a path that is still reachable from a root."""


@dataclass(frozen=True, slots=True)
class Root:
    source: str  # the link, or "{client pid 12 (alice)}" for a pin
    path: str


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
    dead: list[str]  # referrers before references: the order to delete in
    sizes: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class GCResult:
    deleted: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    kept: list[str] = field(default_factory=list)  # dead when marked, alive when reached
    links_removed: int = 0


def find_roots(store: Store) -> list[Root]:
    """The roots on disk and in memory.  Dangling `auto/` entries are removed."""
    roots: list[Root] = []
    gcroots = store.state.gcroots_dir
    auto = gcroots / "auto"
    for dirpath, dirnames, filenames in os.walk(gcroots):
        for name in [*dirnames, *filenames]:
            entry = os.path.join(dirpath, name)
            if not os.path.islink(entry):
                # A plain file named after a store path roots it, as in Nix.
                if os.path.isfile(entry):
                    path = _store_path_of(store, os.path.join(store.store_dir, name))
                    if path is not None:
                        roots.append(Root(entry, path))
                continue
            target = _readlink_abs(entry)
            path = _store_path_of(store, target)
            if path is not None:
                roots.append(Root(entry, path))
            elif Path(dirpath) == auto:
                _indirect(store, entry, target, roots)
    roots += [
        Root(f"{{{label}}}", p) for label, paths in store.pins.by_owner() for p in sorted(paths)
    ]
    # A pin may name a path not made yet (a build's output): it roots nothing so far.
    valid = store.valid_paths({r.path for r in roots})
    return [r for r in roots if r.path in valid]


def _indirect(store: Store, entry: str, link: str, roots: list[Root]) -> None:
    if not os.path.lexists(link):
        # The user removed their link: the root is gone with it.
        Path(entry).unlink(missing_ok=True)
        return
    if os.path.islink(link):
        path = _store_path_of(store, _readlink_abs(link))
        if path is not None:
            roots.append(Root(link, path))


def _readlink_abs(link: str) -> str:
    try:
        target = os.readlink(link)
    except OSError:
        return ""
    return os.path.normpath(os.path.join(os.path.dirname(link), target))


def _store_path_of(store: Store, target: str) -> str | None:
    """The store path `target` is, or is inside of; None if it is not in the store."""
    prefix = store.store_dir + "/"
    if not target.startswith(prefix):
        return None
    base = target[len(prefix) :].split("/", 1)[0]
    try:
        StorePath.parse(prefix + base, store.store_dir)
    except ValueError:
        return None
    return prefix + base


def load_graph(store: Store) -> Graph:
    with store.db.read() as conn:
        rows = list(conn.execute("SELECT id, path, deriver, nar_size FROM ValidPaths"))
        ref_rows = list(conn.execute("SELECT referrer, reference FROM Refs"))
        out_rows = list(conn.execute("SELECT drv, path FROM DerivationOutputs"))
    paths = {i: p for i, p, _, _ in rows}
    ids = {p: i for i, p in paths.items()}
    sizes = {i: s for i, _, _, s in rows}
    derivers = {i: ids[d] for i, _, d, _ in rows if d is not None and d in ids}
    refs: dict[int, list[int]] = {}
    for referrer, reference in ref_rows:
        if referrer != reference:
            refs.setdefault(referrer, []).append(reference)
    outputs: dict[int, list[int]] = {}
    for drv, path in out_rows:
        if path in ids:
            outputs.setdefault(drv, []).append(ids[path])
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


def referrers_first(graph: Graph, dead: set[int]) -> list[int]:
    """Order dead paths so each comes before everything it references."""
    waiting = dict.fromkeys(dead, 0)
    for node in dead:
        for ref in set(graph.refs.get(node, ())):
            if ref in waiting:
                waiting[ref] += 1
    ready = sorted((n for n, k in waiting.items() if k == 0), reverse=True)
    order: list[int] = []
    while ready:
        node = ready.pop()
        order.append(node)
        for ref in set(graph.refs.get(node, ())):
            if ref in waiting:
                waiting[ref] -= 1
                if waiting[ref] == 0:
                    ready.append(ref)
    return order


def plan(store: Store, keep_outputs: bool = False, keep_derivations: bool = True) -> Plan:
    roots = find_roots(store)
    graph = load_graph(store)
    # Pins taken while the graph loaded count too; later ones are caught at deletion.
    root_paths = {r.path for r in roots} | store.pins.pinned()
    live = mark(graph, root_paths, keep_outputs, keep_derivations)
    dead = referrers_first(graph, set(graph.paths) - live)
    return Plan(
        roots,
        {graph.paths[i] for i in live},
        [graph.paths[i] for i in dead],
        {graph.paths[i]: graph.sizes[i] for i in dead},
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


def delete(
    store: Store,
    gc_plan: Plan,
    max_freed: int | None = None,
    batch_size: int = 256,
) -> GCResult:
    """Delete the plan's dead paths, referrers first, until `max_freed` bytes are freed."""
    result = GCResult()
    queue = deque(gc_plan.dead)
    remover = _Remover()
    # Each batch moves its paths into a directory of its own: renames into it and the
    # removers' unlinks in earlier ones do not wait on one directory's lock.
    batch_dirs: list[str] = []
    try:
        while queue:
            if max_freed is not None and remover.drain() >= max_freed:
                break
            batch: list[str] = []
            estimate = remover.freed
            while queue and len(batch) < batch_size:
                if max_freed is not None and estimate >= max_freed:
                    break
                path = queue.popleft()
                batch.append(path)
                estimate += gc_plan.sizes.get(path, 0)
            into = store.deletion_dir()
            batch_dirs.append(into)
            deleted, kept, aside = _delete_batch(store, batch, into)
            result.deleted += deleted
            result.kept += kept
            for entry in aside:
                remover.put(entry)
    finally:
        result.bytes_freed = remover.close()
        for into in batch_dirs:
            remove_tree(into)
    removed, links_freed = remove_unused_links(store)
    result.links_removed = removed
    result.bytes_freed += links_freed
    return result


class _Remover:
    """Removes moved-out paths in threads of their own, counting the bytes freed: unlinking
    waits on the disk (several unlinks at once go faster), and meanwhile the next batch is
    prepared."""

    THREADS = 4

    def __init__(self) -> None:
        self.freed = 0
        self._lock = threading.Lock()
        self._queue: Queue[str | None] = Queue()
        self._threads = [
            threading.Thread(target=self._run, name="gc-remover") for _ in range(self.THREADS)
        ]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while True:
            entry = self._queue.get()
            try:
                if entry is None:
                    return
                freed = remove_tree(entry)
                with self._lock:
                    self.freed += freed
            except OSError as e:
                # Unregistered already: what is left is removed when the store next opens.
                log.warning("could not remove %s: %s", entry, e)
            finally:
                self._queue.task_done()

    def put(self, entry: str) -> None:
        self._queue.put(entry)

    def drain(self) -> int:
        self._queue.join()
        return self.freed

    def close(self) -> int:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        return self.freed


def _delete_batch(
    store: Store, batch: list[str], into: str
) -> tuple[list[str], list[str], list[str]]:
    claimed: list[str] = []
    moved: list[tuple[str, str]] = []
    deleted: list[str] = []
    kept: list[str] = []

    def body(conn: apsw.Connection) -> None:
        for path in batch:
            if store.pins.begin_delete(path):
                claimed.append(path)
            else:
                kept.append(path)
        present = {
            r[0]
            for r in conn.execute(
                "SELECT path FROM ValidPaths WHERE path IN (SELECT value FROM json_each(?))",
                (json.dumps(claimed),),
            )
        }
        gone = [p for p in claimed if p in present]
        try:
            conn.execute(
                "DELETE FROM ValidPaths WHERE path IN (SELECT value FROM json_each(?))",
                (json.dumps(gone),),
            )
            deleted.extend(gone)
        except apsw.ConstraintError:
            # One of them is still referred to: by a path added since the marking, or by
            # one of the batch the statement had not reached.  One by one, in order.
            for path in gone:
                try:
                    conn.execute("DELETE FROM ValidPaths WHERE path = ?", (path,))
                    deleted.append(path)
                except apsw.ConstraintError:
                    kept.append(path)
        try:
            for path in deleted:
                aside = store.move_out(path, into)
                if aside is not None:
                    moved.append((path, aside))
        except BaseException:
            for final, aside in reversed(moved):
                store.move_back(aside, final)
            raise

    try:
        store.db.write(body)
    finally:
        store.pins.end_delete(claimed)
    return deleted, kept, [aside for _, aside in moved]


def remove_unused_links(store: Store) -> tuple[int, int]:
    """Remove `.links` entries no store file shares any more: (entries, bytes)."""
    removed = freed = 0
    links = store.state.links_dir
    with os.scandir(links) as it:
        for entry in it:
            try:
                st = entry.stat(follow_symlinks=False)
                if st.st_nlink != 1:
                    continue
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed += 1
            freed += st.st_size
    return removed, freed

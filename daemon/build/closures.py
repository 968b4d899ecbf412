"""What a build request knows of its paths' closures, so that a build whose inputs were
built or looked at before need not ask the database again before it starts."""

from collections.abc import Iterable, Sequence

from store.records import PathInfo
from store.store import Store


class Closures:
    """The closures of store paths, as far as one request has needed them.

    A valid path's closure never changes, and the request's pins keep its paths valid, so
    nothing here goes stale while the request lasts; it holds no more than the closures
    of the request's own graph.  Filled in worker threads, read on the loop."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._known: dict[str, frozenset[str]] = {}

    def known(self, paths: Iterable[str]) -> list[str] | None:
        """The closure of `paths` if each one's is known, else None; no I/O."""
        union: set[str] = set()
        for path in paths:
            closure = self._known.get(path)
            if closure is None:
                return None
            union |= closure
        return sorted(union)

    def compute(self, paths: Sequence[str]) -> list[str]:
        """The closure of `paths`, asking the database for those not known (in a worker
        thread)."""
        for path in paths:
            if path not in self._known:
                self._known[path] = frozenset(self._store.closure([path]))
        closure = self.known(paths)
        assert closure is not None
        return closure

    def add_outputs(self, infos: Sequence[PathInfo]) -> None:
        """Remember the closures of a build's outputs, just registered: their references
        are the build's inputs, whose closures are mostly known, and each other."""
        own = {info.path: info for info in infos}
        for info in infos:
            reached = {info.path}
            outside: set[str] = set()
            todo = [info]
            while todo:
                for ref in todo.pop().references:
                    if ref not in own:
                        outside.add(ref)
                    elif ref not in reached:
                        reached.add(ref)
                        todo.append(own[ref])
            closure = self.known(outside)
            self._known[info.path] = frozenset(
                reached.union(closure) if closure is not None else self._store.closure([info.path])
            )

"""Temporary GC roots ("pins") held in memory, and the paths the collector is deleting.

A client that adds a path, or a build that needs one, pins it for as long as it needs
it.  The collector deletes a path only after `begin_delete` said it is not pinned, and
anyone who pins a path the collector is deleting waits until the deletion is over; so
whoever pins first and then checks validity can rely on the answer.  Every method is
thread-safe: adds and the collector run in worker threads.  Only `pin` can wait.

A pin handed over to a root on disk (store-run's runtimes, `store-build -o`: pin, write
the root, unpin) could fall between a collection's two looks, at the roots before its
walk passed and at the pins when it deletes; so while a collection runs
(`collecting()`), a path pinned at any moment since it began is not deleted by it.
"""

import threading
from collections import Counter
from collections.abc import Hashable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(eq=False)
class PinOwner:
    """An owner of pins other than a client connection, named for `--print-roots`."""

    label: str

    def __str__(self) -> str:
        return self.label


class Pins:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._count: Counter[str] = Counter()
        self._by_owner: dict[Hashable, Counter[str]] = {}
        self._labels: dict[Hashable, str] = {}
        self._deleting: set[str] = set()
        # Paths pinned since the running collection began; None when none runs.
        self._since: set[str] | None = None

    def pin(self, owner: Hashable, paths: Iterable[str], label: str = "") -> None:
        """Pin `paths` for `owner`, waiting while any of them is being deleted."""
        paths = list(paths)
        with self._cond:
            self._cond.wait_for(lambda: self._deleting.isdisjoint(paths))
            mine = self._by_owner.setdefault(owner, Counter())
            if label:
                self._labels[owner] = label
            mine.update(paths)
            self._count.update(paths)
            if self._since is not None:
                self._since.update(paths)

    def release(self, owner: Hashable) -> None:
        """Drop every pin of `owner` (a closed connection, a finished build)."""
        with self._cond:
            mine = self._by_owner.pop(owner, None)
            self._labels.pop(owner, None)
            # One pass, not Counter.subtract and a second: a no-op build of 200
            # derivations releases 600 paths here.
            count = self._count
            for path, n in (mine or {}).items():
                left = count[path] - n
                if left > 0:
                    count[path] = left
                else:
                    del count[path]

    def pinned(self) -> set[str]:
        with self._cond:
            return set(self._count)

    def by_owner(self) -> list[tuple[str, set[str]]]:
        """(label, paths) of each owner that has pins, for `store-gc --print-roots`."""
        with self._cond:
            return [
                (self._labels.get(owner) or str(owner), set(paths))
                for owner, paths in self._by_owner.items()
                if paths
            ]

    def begin_delete(self, path: str) -> bool:
        """Claim `path` for deletion; False if it is pinned and must stay."""
        with self._cond:
            if path in self._count or (self._since is not None and path in self._since):
                return False
            self._deleting.add(path)
            return True

    @contextmanager
    def collecting(self) -> Iterator[None]:
        """A collection (marking, then deleting) runs in the block; one at a time."""
        with self._cond:
            self._since = set()
        try:
            yield
        finally:
            with self._cond:
                self._since = None

    def end_delete(self, paths: Iterable[str]) -> None:
        with self._cond:
            self._deleting.difference_update(paths)
            self._cond.notify_all()

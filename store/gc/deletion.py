"""Deletion: the plan's dead paths go referrers first, in batches of short transactions.

Deletion is safe while clients add, pin and build, because the decision for each path is
taken again at the moment it is deleted, in the transaction that unregisters it: a path
pinned since the marking is skipped (`Pins.begin_delete`), and a path that a new path
refers to cannot be unregistered (the database refuses to drop a referenced row), so a
skipped path keeps its whole closure.  Each path is renamed out of the store inside its
transaction and removed from disk after the commit.  A crash between rename and commit is
undone at the next open (`Store.recover`).
"""

import json
import logging
import os
import threading
from collections import deque
from dataclasses import dataclass, field
from queue import Queue

import apsw

from store.gc.marking import Plan
from store.store import Store
from store.tmparea import remove_tree

log = logging.getLogger("weft.gc")

# Paths unregistered in one write transaction: short enough that queries waiting on the
# write lock keep their latency (bench/RESULTS.md: p99 under 10 ms while 100,000 paths go).
BATCH_SIZE = 256


@dataclass(slots=True)
class GCResult:
    deleted: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    kept: list[str] = field(default_factory=list)  # dead when marked, alive when reached
    links_removed: int = 0


def delete(
    store: Store,
    gc_plan: Plan,
    max_freed: int | None = None,
    batch_size: int = BATCH_SIZE,
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

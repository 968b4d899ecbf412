"""Deletion: the plan's dead paths go referrers first, in batches of short transactions.

Deletion is safe while clients add, pin and build, because the decision for each path is
taken again at the moment it is deleted: a path pinned since the marking is skipped
(`Pins.begin_delete`), and a path that a new path refers to cannot be unregistered (the
database refuses to drop a referenced row), so a skipped path keeps its whole closure.

A batch goes in two stages.  The mover (`store.gc.moving`, a thread of its own) claims its
paths and renames them out of the store into the batch's deletion directory; then the
batch's transaction unregisters them and renames back any the database refused, so that
whenever the write lock is free every path on disk is registered (`store.install` relies
on it).  While one batch's transaction runs, the next batch is moved out.  A crash before
the commit is undone at the next open (`Store.recover`).

After the commit the paths are gone for everyone; giving their space back is the disk's
slow part (`store.gc.reclaim`), which a caller may leave to go on in the background.  The
bytes a collection frees are counted as its paths leave: the files whose last link goes.

Where the time went (100,000 small paths beside 100,000 live, docs/gc.md): the statements
that unregister (their statement journal, their foreign-key checks), the commits, the
renames, and the removal competing with all of them.  So a wave's paths (which refer to
none of each other) go in one statement, by row id, with the foreign-key checks done for
the wave at once (`store.gc.unregister`); transactions are paced to a time rather than a
count, on a connection of their own with room for the pages they touch and its statement
journal in memory; the renames run beside the transactions rather than inside them; and
the removal waits until the transactions are over.
"""

import json
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import apsw

from store.gc.marking import Plan
from store.gc.moving import DIR_FLAGS, Moved, Mover, move_back
from store.gc.reclaim import Reclaimer
from store.gc.unregister import checks_here, unregister
from store.store import Store

T = TypeVar("T")

# Paths the first transaction takes; later ones take as many as fit in TXN_SECONDS at the
# pace of the one before, within [MIN_BATCH, MAX_BATCH].  A transaction holds the write
# lock, so adds and builds that register paths wait for it (queries do not: WAL readers
# never wait): TXN_SECONDS is what a registration waits at worst.  The larger a batch, the
# fewer pages each path costs its commit and the checkpoints after it (each deleted row
# dirties a page of two indexes ordered by hash): 0.6 pages a path at 8,192 and more, 2 at
# 512, and commits and checkpoints were a third of the transactions' time at 4,096 (100,000
# dead paths beside 100,000 live).
BATCH_SIZE = 256
MIN_BATCH = 32
MAX_BATCH = 16384
TXN_SECONDS = 0.25
# The page cache of the collection's connection while it deletes (the pool's default is
# 2 MiB): a batch touches a page of each index per path, a transaction whose pages do not
# fit writes them twice, and pages kept from one batch to the next are not read again.
CACHE_KIB = 65536
# While it deletes, the connection keeps its statement journal (the pages a statement
# changed, kept to undo it if a row is refused: up to two a path, MAX_BATCH paths) in
# memory: in a file it was the largest single cost of a collection, 18 µs of system time
# a path (py-spy, 100,000 dead paths).
_TEMP_STORE = "MEMORY"
# As `Database.write`: a busy write lock is waited for (the busy timeout), then tried again.
_BUSY_RETRIES = 100


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
    batch_size: int | None = None,
    reclaimer: Reclaimer | None = None,
    wait: bool = True,
) -> GCResult:
    """Delete the plan's dead paths, referrers first, until `max_freed` bytes are freed.

    `batch_size` fixes the paths per transaction (default: paced by TXN_SECONDS).  The
    space is given back by `reclaimer` (default: one of this call's own); with `wait`
    false, the call returns once the paths are out of the store, and the removal (and the
    `.links` entries it leaves unused, which are then not counted) goes on after it.
    """
    own = reclaimer is None
    if reclaimer is None:
        reclaimer = Reclaimer(lambda: remove_unused_links(store))
    links_before = (reclaimer.totals.links_removed, reclaimer.totals.links_bytes)
    result = GCResult()
    try:
        with store.db.connection() as conn:
            cache = conn.execute("PRAGMA cache_size").fetchone()[0]
            temp = conn.execute("PRAGMA temp_store").fetchone()[0]
            conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
            conn.execute(f"PRAGMA temp_store = {_TEMP_STORE}")
            try:
                with checks_here(conn) as here:
                    stages = _Stages(store, conn, gc_plan, here)
                    stages.run(max_freed, batch_size, reclaimer, result)
            finally:
                conn.execute(f"PRAGMA cache_size = {cache}")
                conn.execute(f"PRAGMA temp_store = {temp}")
    finally:
        if wait or own:
            reclaimer.wait()
    if wait or own:
        result.links_removed = reclaimer.totals.links_removed - links_before[0]
        result.bytes_freed += reclaimer.totals.links_bytes - links_before[1]
    return result


def _paced(paths: int, seconds: float) -> int:
    per_path = seconds / max(1, paths)
    return max(MIN_BATCH, min(MAX_BATCH, int(TXN_SECONDS / max(per_path, 1e-6))))


@dataclass(slots=True)
class _Stages:
    """One collection's deletion: the mover's stage in its thread, the transactions in
    the calling one."""

    store: Store
    conn: apsw.Connection
    plan: Plan
    here: bool  # foreign-key checks done by `store.gc.unregister` (`checks_here`)

    def run(
        self,
        max_freed: int | None,
        batch_size: int | None,
        reclaimer: Reclaimer,
        result: GCResult,
    ) -> None:
        store_fd = os.open(self.store.store_dir, DIR_FLAGS)
        try:
            mover = Mover(self.store, store_fd, self.plan, batch_size or BATCH_SIZE, max_freed)
            mover.start()
            try:
                # The removal starts once the transactions are over (`Reclaimer.paused`).
                with reclaimer.paused():
                    while (batch := mover.next()) is not None:
                        started = time.perf_counter()
                        deleted, refused = self._finish(store_fd, batch)
                        if batch_size is None:
                            took = time.perf_counter() - started
                            mover.size = _paced(len(batch.claimed), took)
                        # What stayed out (deleted, or no longer registered) is removed.
                        reclaimer.put(batch.into, list(batch.names.values()))
                        result.deleted += deleted
                        result.kept += batch.pinned + sorted(refused)
                        result.bytes_freed += sum(batch.sizes.values())
            finally:
                mover.stop()
        finally:
            os.close(store_fd)

    def _finish(self, store_fd: int, batch: Moved) -> tuple[list[str], set[str]]:
        """A moved-out batch's transaction: (deleted, refused and renamed back)."""
        try:
            return _transaction(self.conn, lambda: self._unregister(store_fd, batch))
        except BaseException:
            # Rolled back: every path of the batch is registered still.
            for name in reversed(batch.names.values()):
                move_back(batch.into_fd, store_fd, name)
            batch.names.clear()
            os.rmdir(batch.into)
            raise
        finally:
            self.store.pins.end_delete(batch.claimed)
            batch.close()

    def _unregister(self, store_fd: int, batch: Moved) -> tuple[list[str], set[str]]:
        """Unregister what the database lets go, a wave per statement, and rename back
        what it refused: (deleted, refused)."""
        deleted: list[str] = []
        for wave, ids in _waves(batch.claimed, self.plan):
            gone = unregister(self.conn, ids, self.here)
            if len(gone) == len(ids):
                deleted += wave
            else:
                deleted += [p for p, row in zip(wave, ids, strict=True) if row in gone]
        # Claimed and not unregistered: refused, or registered again since the marking
        # (under a new row id).  Those are kept, and go back if they were moved; what is
        # no longer registered at all stays out.
        done = set(deleted)
        left = [p for p in batch.claimed if p not in done]
        refused: set[str] = set()
        if left:
            refused = {
                r[0]
                for r in self.conn.execute(
                    "SELECT path FROM ValidPaths WHERE path IN (SELECT value FROM json_each(?))",
                    (json.dumps(left),),
                )
            }
        for path in refused & batch.names.keys():
            move_back(batch.into_fd, store_fd, batch.names.pop(path))
            del batch.sizes[path]
        return deleted, refused


def _waves(paths: list[str], gc_plan: Plan) -> Iterator[tuple[list[str], list[int]]]:
    """`paths` (in plan order) cut where their wave changes, each with its row ids."""
    rows = gc_plan.rows
    wave: list[str] = []
    ids: list[int] = []
    current = None
    for path in paths:
        row, n = rows[path]
        if n != current and wave:
            yield wave, ids
            wave, ids = [], []
        current = n
        wave.append(path)
        ids.append(row)
    if wave:
        yield wave, ids


def _transaction(conn: apsw.Connection, body: Callable[[], T]) -> T:
    """`body` in a `BEGIN IMMEDIATE` transaction on the collection's own connection, as
    `Database.write` runs one on a pooled connection."""
    for attempt in range(_BUSY_RETRIES):
        try:
            conn.execute("BEGIN IMMEDIATE")
        except apsw.BusyError:
            time.sleep(random.uniform(0, 0.1 * min(attempt + 1, 10)))
            continue
        try:
            result = body()
            conn.execute("COMMIT")
            return result
        except BaseException:
            if not conn.getautocommit():
                conn.execute("ROLLBACK")
            raise
    raise apsw.BusyError("the store database stayed busy")


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

"""The records of build snapshots: what makes a store path a snapshot, and keeps it alive.

A snapshot is a store path holding what a stopped build wrote (`store.snapshotfs` makes and
restores them; docs/snapshots.md).  The path alone proves nothing: anyone may add a tree
that looks like one (`store-add`).  The authority is its row in `Snapshots`, written only
by the daemon as it captures a build, and saying which derivation and attempt it is of,
its scope, and whether it is a committed snapshot (resumable by request) or a paused
build's own (consumed by that build's next attempt, never resumable by request).

Every row is a GC root (`store.gc.roots`), so recording a snapshot roots it in the same
transaction, and forgetting one is deleting its row: the path is then garbage.  The rows
are bounded per derivation: `MAX_SNAPSHOTS_PER_DRV` committed ones (recording another
drops the oldest, in the same transaction) and one paused one (a new one replaces it).
Blocking calls: the daemon runs them in worker threads.
"""

import json
from dataclasses import dataclass
from enum import StrEnum

import apsw

from store.db import Database
from store.derivation import DRV_SUFFIX, drv_name
from store.durabledirs import Scope
from store.errors import StoreError

# A derivation that fails again and again (a flaky test, a retry loop, a user committing
# by hand) keeps its latest 16: enough to go back several attempts, while a loop cannot
# fill the disk with snapshots of one derivation.
MAX_SNAPSHOTS_PER_DRV = 16
# A size (8 GiB of archive) that takes minutes, not hours, to copy on one disk, and that
# most builds' trees stay well under; a build that writes more is not worth keeping whole
# (a `data` scope keeps only what it names).
MAX_SNAPSHOT_SIZE = 8 << 30


class NotASnapshot(StoreError):
    """A path with no snapshot record: not made by a build (or forgotten since)."""


class SnapshotTooLarge(StoreError):
    """What a build wrote is over the size a snapshot may have; none was made."""


class SnapshotState(StrEnum):
    COMMITTED = "committed"  # resumable by request until forgotten
    PAUSED = "paused"  # an evicted build's own: consumed by its next attempt


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    path: str
    drv: str
    attempt: int
    scope: Scope
    state: SnapshotState
    reason: str  # "failed", "commit" or "evicted"
    created: float  # seconds since the epoch
    owner: int  # the uid it belongs to (who may forget it)
    durable_dirs: dict[str, str]  # the derivation's declaration, name -> path under /build
    nar_size: int

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "drv": self.drv,
            "attempt": self.attempt,
            "scope": self.scope.value,
            "state": self.state.value,
            "reason": self.reason,
            "created": self.created,
            "owner": self.owner,
            "durable_dirs": dict(self.durable_dirs),
            "nar_size": self.nar_size,
        }


_COLUMNS = "path, drv, attempt, scope, state, reason, created, owner, durable, nar_size"
_MARKS = ",".join("?" * len(_COLUMNS.split(",")))
# Newest first; the rowid breaks ties between records made in the same clock tick.
_NEWEST_FIRST = "ORDER BY created DESC, rowid DESC"


def _record(row: tuple) -> SnapshotRecord:
    path, drv, attempt, scope, state, reason, created, owner, durable, nar_size = row
    return SnapshotRecord(
        path,
        drv,
        attempt,
        Scope(scope),
        SnapshotState(state),
        reason,
        created,
        owner,
        json.loads(durable),
        nar_size,
    )


def _row(r: SnapshotRecord) -> tuple:
    return (
        r.path,
        r.drv,
        r.attempt,
        r.scope.value,
        r.state.value,
        r.reason,
        r.created,
        r.owner,
        json.dumps(r.durable_dirs, sort_keys=True),
        r.nar_size,
    )


class Snapshots:
    def __init__(self, db: Database) -> None:
        self.db = db

    def record(self, new: SnapshotRecord) -> list[SnapshotRecord]:
        """Record `new` (rooting its path), dropping in the same transaction the records
        it puts past the bounds: the derivation's paused one if `new` is paused, its oldest
        committed ones past `MAX_SNAPSHOTS_PER_DRV` if not.  The records dropped."""

        def body(conn: apsw.Connection) -> list[SnapshotRecord]:
            conn.execute(
                f"INSERT OR REPLACE INTO Snapshots ({_COLUMNS}) VALUES ({_MARKS})", _row(new)
            )
            keep = 1 if new.state is SnapshotState.PAUSED else MAX_SNAPSHOTS_PER_DRV
            # In the order recorded (a new row's rowid is the largest), not by `created`:
            # a clock set back must not make the record just written the one dropped.
            dropped = [
                _record(r)
                for r in conn.execute(
                    f"SELECT {_COLUMNS} FROM Snapshots WHERE drv = ? AND state = ?"
                    " ORDER BY rowid DESC LIMIT -1 OFFSET ?",
                    (new.drv, new.state.value, keep),
                )
            ]
            conn.executemany("DELETE FROM Snapshots WHERE path = ?", [(d.path,) for d in dropped])
            return dropped

        return self.db.write(body)

    def get(self, path: str) -> SnapshotRecord | None:
        with self.db.connection() as conn:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM Snapshots WHERE path = ?", (path,)
            ).fetchone()
        return None if row is None else _record(row)

    def of_drv(self, drv: str) -> list[SnapshotRecord]:
        """The snapshots of a derivation, newest first."""
        with self.db.connection() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM Snapshots WHERE drv = ? {_NEWEST_FIRST}", (drv,)
            ).fetchall()
        return [_record(r) for r in rows]

    def for_target(self, path: str) -> list[SnapshotRecord]:
        """The snapshots a user means by `path`: a derivation's; an output's derivations'
        (every valid derivation registered with that output); a snapshot itself."""
        if path.endswith(DRV_SUFFIX):
            return self.of_drv(path)
        own = self.get(path)
        if own is not None:
            return [own]
        with self.db.connection() as conn:
            drvs = [
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT v.path FROM DerivationOutputs o"
                    " JOIN ValidPaths v ON v.id = o.drv WHERE o.path = ? ORDER BY v.path",
                    (path,),
                )
            ]
        return [r for drv in drvs for r in self.of_drv(drv)]

    def paused(self, drv: str) -> SnapshotRecord | None:
        """The derivation's paused (evicted) build's snapshot, if it has one."""
        with self.db.connection() as conn:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM Snapshots WHERE drv = ? AND state = ?",
                (drv, SnapshotState.PAUSED.value),
            ).fetchone()
        return None if row is None else _record(row)

    def forget(self, path: str) -> SnapshotRecord | None:
        """Drop a record (its path is garbage from then on); the record, if there was one."""

        def body(conn: apsw.Connection) -> SnapshotRecord | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM Snapshots WHERE path = ?", (path,)
            ).fetchone()
            conn.execute("DELETE FROM Snapshots WHERE path = ?", (path,))
            return None if row is None else _record(row)

        return self.db.write(body)

    def roots(self) -> list[tuple[str, str]]:
        """(label, path) of every record, for the collector's roots."""
        with self.db.connection() as conn:
            rows = conn.execute("SELECT drv, path FROM Snapshots ORDER BY path").fetchall()
        return [(f"snapshot of {drv_name(drv)}", path) for drv, path in rows]

"""Build history in the store database: every attempt, and the derivations marked flaky.

A derivation is marked flaky when an attempt of it succeeds after one failed in the same
run; the mark is what lets the retry policy give it another chance when it fails at low
load.  `forget` drops a derivation's record and its mark (`store-history --forget`).
Blocking calls: the daemon runs them in worker threads.
"""

import json
import time
from dataclasses import dataclass

import apsw

from store.db import Database

# Failures that may come from the machine rather than the derivation (retry.Cause values):
# one of these followed by a success marks the derivation flaky.
LOAD_SENSITIVE = ("exit", "signal", "oom", "timeout", "silent")
# Exit codes that no load causes: POSIX shells exit 126 when a command cannot be run and
# 127 when there is none (a builder missing a tool, a typo).  Such a failure is the
# derivation's: it is not retried (`daemon/sched/retry.py`) and never makes it flaky.
DETERMINISTIC_EXITS = {126: "could not run a command", 127: "found no such command"}


@dataclass(frozen=True)
class AttemptRecord:
    drv: str
    attempt: int
    start_time: float  # seconds since the epoch
    end_time: float
    outcome: str  # "built", or the cause of the failure (retry.Cause)
    exit_code: int | None
    load_start: dict[str, object]
    load_peak: dict[str, object]
    parallelism: int  # the most builds running at once during the attempt
    paused: float  # seconds the build spent paused
    snapshot: str | None = None  # the snapshot the attempt left (store/snapshots.py), if any

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


_COLUMNS = (
    "drv, attempt, start_time, end_time, outcome, exit_code, load_start, load_peak, "
    "parallelism, paused, snapshot"
)


def _record(row: tuple) -> AttemptRecord:
    drv, attempt, start, end, outcome, code, load_start, load_peak, par, paused, snap = row
    return AttemptRecord(
        drv,
        attempt,
        start,
        end,
        outcome,
        code,
        json.loads(load_start),
        json.loads(load_peak),
        par,
        paused,
        snap,
    )


class History:
    def __init__(self, db: Database) -> None:
        self.db = db

    def record(self, attempt: AttemptRecord) -> bool:
        """Record an attempt; a success after a failure of the same derivation (in this run or
        an earlier one) marks it flaky.  Whether it is marked now."""
        return self.record_many([attempt])[0]

    def record_many(self, attempts: list[AttemptRecord]) -> list[bool]:
        """`record` for each attempt, in order, in one transaction: one write of the
        database for the attempts of several builds."""
        return self.db.write(lambda conn: [_insert(conn, a) for a in attempts])

    def forget(self, drv: str) -> tuple[int, bool]:
        """Drop every attempt at `drv` and its flaky mark: how many attempts there were,
        and whether it was marked."""

        def body(conn) -> tuple[int, bool]:  # type: ignore[no-untyped-def]
            (n,) = conn.execute(
                "SELECT count(*) FROM BuildAttempts WHERE drv = ?", (drv,)
            ).fetchone()
            marked = conn.execute("SELECT 1 FROM Flaky WHERE drv = ?", (drv,)).fetchone()
            conn.execute("DELETE FROM BuildAttempts WHERE drv = ?", (drv,))
            conn.execute("DELETE FROM Flaky WHERE drv = ?", (drv,))
            return n, marked is not None

        return self.db.write(body)

    def attempts(self, drv: str, limit: int = 100) -> list[AttemptRecord]:
        """The latest `limit` attempts at `drv`, oldest first."""
        with self.db.connection() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM BuildAttempts WHERE drv = ? ORDER BY id DESC LIMIT ?",
                (drv, limit),
            ).fetchall()
        return [_record(r) for r in reversed(rows)]

    def is_flaky(self, drv: str) -> bool:
        with self.db.connection() as conn:
            return conn.execute("SELECT 1 FROM Flaky WHERE drv = ?", (drv,)).fetchone() is not None

    def flaky(self) -> list[dict[str, object]]:
        """Every derivation marked flaky, with its counts of failed and built attempts."""
        with self.db.connection() as conn:
            rows = conn.execute(
                "SELECT f.drv, f.marked,"
                " (SELECT count(*) FROM BuildAttempts a WHERE a.drv = f.drv"
                "  AND a.outcome != 'built'),"
                " (SELECT count(*) FROM BuildAttempts a WHERE a.drv = f.drv"
                "  AND a.outcome = 'built')"
                " FROM Flaky f ORDER BY f.marked, f.drv"
            ).fetchall()
        return [{"drv": d, "marked": m, "failed": f, "built": b} for d, m, f, b in rows]


def _insert(conn: apsw.Connection, attempt: AttemptRecord) -> bool:
    """One attempt's row, and the flaky mark it earns (whether it did), in `conn`'s
    transaction."""
    conn.execute(
        f"INSERT INTO BuildAttempts ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        (
            attempt.drv,
            attempt.attempt,
            attempt.start_time,
            attempt.end_time,
            attempt.outcome,
            attempt.exit_code,
            json.dumps(attempt.load_start),
            json.dumps(attempt.load_peak),
            attempt.parallelism,
            attempt.paused,
            attempt.snapshot,
        ),
    )
    if attempt.outcome != "built":
        return False
    failed_before = conn.execute(
        "SELECT 1 FROM BuildAttempts WHERE drv = ? AND outcome IN"
        f" ({','.join('?' * len(LOAD_SENSITIVE))})"
        " AND coalesce(exit_code, 0) NOT IN"
        f" ({','.join('?' * len(DETERMINISTIC_EXITS))}) LIMIT 1",
        (attempt.drv, *LOAD_SENSITIVE, *DETERMINISTIC_EXITS),
    ).fetchone()
    if failed_before:
        conn.execute(
            "INSERT OR IGNORE INTO Flaky (drv, marked) VALUES (?, ?)",
            (attempt.drv, int(time.time())),
        )
    return bool(failed_before)

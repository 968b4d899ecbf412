"""The store database: schema, migrations, and short transactions over a connection pool.

SQLite in WAL mode: readers never block the writer and the writer never blocks readers.
Write transactions start with `BEGIN IMMEDIATE`, because in WAL mode a read transaction
that later tries to write gets SQLITE_BUSY at once, ignoring the busy timeout (Guix
`guix/store/database.scm`).  Busy errors past the timeout are retried with a random
back-off, as Nix does.

Connections are pooled rather than per thread: a trio daemon runs blocking calls on a
changing set of worker threads, and the pool keeps at most `max_idle` open.
"""

import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

import apsw

SCHEMA_VERSION = 5
T = TypeVar("T")

_V1 = """
CREATE TABLE ValidPaths (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    path              TEXT UNIQUE NOT NULL,
    hash              TEXT NOT NULL,
    nar_size          INTEGER NOT NULL,
    registration_time INTEGER NOT NULL,
    deriver           TEXT,
    ca                TEXT,
    sigs              TEXT NOT NULL DEFAULT ''
);
CREATE TABLE Refs (
    referrer  INTEGER NOT NULL REFERENCES ValidPaths(id) ON DELETE CASCADE,
    reference INTEGER NOT NULL REFERENCES ValidPaths(id) ON DELETE RESTRICT,
    PRIMARY KEY (referrer, reference)
) WITHOUT ROWID;
CREATE INDEX IndexReference ON Refs(reference);
-- Without this a self-referencing path could never be deleted: the RESTRICT rule would
-- see its own reference.
CREATE TRIGGER DeleteSelfRefs BEFORE DELETE ON ValidPaths BEGIN
    DELETE FROM Refs WHERE referrer = old.id AND reference = old.id;
END;
CREATE TABLE DerivationOutputs (
    drv  INTEGER NOT NULL REFERENCES ValidPaths(id) ON DELETE CASCADE,
    id   TEXT NOT NULL,
    path TEXT NOT NULL,
    PRIMARY KEY (drv, id)
) WITHOUT ROWID;
CREATE INDEX IndexDerivationOutputs ON DerivationOutputs(path);
-- Adds between their journal entry and their commit: `entry` is the add's scratch name
-- in <store>/.tmp, which names its owner process.
CREATE TABLE PendingAdds (
    entry TEXT PRIMARY KEY,
    path  TEXT NOT NULL
);
"""

# Version 2: find paths by content, for fixed-output derivations whose content is present.
_V2 = "CREATE INDEX IndexHash ON ValidPaths(hash);"

# Version 3: every build attempt, and derivations seen to fail and then pass
# (store/history.py).  Keyed by .drv path, not ValidPaths: history outlives the .drv.
_V3 = """
CREATE TABLE BuildAttempts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    drv         TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    start_time  REAL NOT NULL,
    end_time    REAL NOT NULL,
    outcome     TEXT NOT NULL,
    exit_code   INTEGER,
    load_start  TEXT NOT NULL,
    load_peak   TEXT NOT NULL,
    parallelism INTEGER NOT NULL,
    paused      REAL NOT NULL DEFAULT 0
);
CREATE INDEX IndexBuildAttempts ON BuildAttempts(drv);
CREATE TABLE Flaky (
    drv    TEXT PRIMARY KEY,
    marked INTEGER NOT NULL
);
"""

# Version 4: the snapshots of stopped builds (store/snapshots.py), each row a GC root, and
# the snapshot each attempt left.  The path is not a foreign key into ValidPaths: the row
# is what keeps its path valid (a root), and a row outlives nothing it names.
_V4 = """
CREATE TABLE Snapshots (
    path     TEXT PRIMARY KEY,
    drv      TEXT NOT NULL,
    attempt  INTEGER NOT NULL,
    scope    TEXT NOT NULL,
    state    TEXT NOT NULL,
    reason   TEXT NOT NULL,
    created  REAL NOT NULL,
    owner    INTEGER NOT NULL,
    durable  TEXT NOT NULL,
    nar_size INTEGER NOT NULL
);
CREATE INDEX IndexSnapshots ON Snapshots(drv);
ALTER TABLE BuildAttempts ADD COLUMN snapshot TEXT;
"""

# Version 5: each path's REAPI node (store/remotedigests.py), computed on its first remote
# build and kept for good: a path is hashed for the remote engine once per store, ever.
# Keyed by the path's row: it goes with the path (the collector deletes these rows with
# its waves, store/gc/unregister.py; the foreign key covers every other deletion).
_V5 = """
CREATE TABLE RemoteDigests (
    path       INTEGER PRIMARY KEY REFERENCES ValidPaths(id) ON DELETE CASCADE,
    kind       TEXT NOT NULL,
    hash       TEXT NOT NULL,
    size       INTEGER NOT NULL,
    executable INTEGER NOT NULL,
    target     TEXT NOT NULL,
    tree       BLOB NOT NULL
);
"""

# MIGRATIONS[n] takes a database at version n to n + 1.
MIGRATIONS: list[str] = [_V1, _V2, _V3, _V4, _V5]
assert len(MIGRATIONS) == SCHEMA_VERSION

BUSY_TIMEOUT_MS = 60_000
_BUSY_RETRIES = 100
# The database is the daemon's (docs/store-paths.md, "Who may read what"); SQLite gives its
# WAL and shared-memory files the database file's mode.
DB_MODE = 0o600
_DB_FILES = ("", "-wal", "-shm")


class SchemaTooNew(RuntimeError):
    """The database was written by a newer weft."""


class Database:
    def __init__(self, path: Path, max_idle: int = 8) -> None:
        self.path = path
        self._max_idle = max_idle
        self._idle: list[apsw.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        _private(path)
        with self.connection() as conn:
            _migrate(conn, str(path))

    def _open(self) -> apsw.Connection:
        conn = apsw.Connection(str(self.path))
        conn.setbusytimeout(BUSY_TIMEOUT_MS)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA wal_autocheckpoint = 40000")
        return conn

    @contextmanager
    def connection(self) -> Iterator[apsw.Connection]:
        with self._lock:
            if self._closed:
                raise RuntimeError("database is closed")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._open()
        try:
            yield conn
        finally:
            with self._lock:
                keep = not self._closed and len(self._idle) < self._max_idle
                if keep:
                    self._idle.append(conn)
            if not keep:
                conn.close()

    @contextmanager
    def read(self) -> Iterator[apsw.Connection]:
        """A consistent snapshot for several queries."""
        with self.connection() as conn:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    def write(self, body: Callable[[apsw.Connection], T]) -> T:
        """Run `body` in a `BEGIN IMMEDIATE` transaction, retrying it when the db is busy.

        `body` may run more than once, so it must not have effects outside the
        transaction before its last statement that can be busy.
        """
        with self.connection() as conn:
            for attempt in range(_BUSY_RETRIES):
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except apsw.BusyError:
                    time.sleep(random.uniform(0, 0.1 * min(attempt + 1, 10)))
                    continue
                try:
                    result = body(conn)
                    conn.execute("COMMIT")
                    return result
                except BaseException:
                    if not conn.getautocommit():
                        conn.execute("ROLLBACK")
                    raise
            raise apsw.BusyError(f"{self.path}: database stayed busy")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _private(path: Path) -> None:
    """Create the database file with `DB_MODE` (SQLite would follow the umask), and put an
    older one's files right."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, DB_MODE))
    for suffix in _DB_FILES:
        with suppress(FileNotFoundError):
            os.chmod(f"{path}{suffix}", DB_MODE)


def _migrate(conn: apsw.Connection, where: str) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"{where}: database schema version {version} is newer than this weft supports "
            f"({SCHEMA_VERSION}); use a newer weft"
        )
    if version == SCHEMA_VERSION:
        return
    conn.execute("BEGIN EXCLUSIVE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for step in range(version, SCHEMA_VERSION):
            conn.execute(MIGRATIONS[step])
            conn.execute(f"PRAGMA user_version = {step + 1}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise

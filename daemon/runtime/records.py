"""Runtimes' records and environments: an SQLite file in `var/runtimes/` (0700, its files
0600), never in the store or its database, which other users may read or copy.

A captured environment holds whatever its user had exported: tokens, passwords.  So it
lives only here, with the names `runtime-redact` matches already dropped, stored by a
keyed hash of its user and its bytes (`envs.py`).  SQLite's secure-delete zeroes what
`forget` drops.

Every method blocks: the service calls them from worker threads, one at a time (a lock;
the daemon is the file's only user).
"""

import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import apsw
import msgpack

from daemon.runtime.envplan import Dangling, Env, Linked, Parent, UnknownRuntime
from daemon.runtime.envs import KEY_FILE, SealedEnvs

T = TypeVar("T")
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE Runtimes (
    id         TEXT PRIMARY KEY,
    uid        INTEGER NOT NULL,
    name       TEXT,
    parent     TEXT,
    started    REAL NOT NULL,
    ended      REAL,
    durable    INTEGER NOT NULL,
    -- Forgotten while its process lives: hidden, but its roots stay until it exits.
    forgotten  INTEGER NOT NULL DEFAULT 0,
    pid        INTEGER NOT NULL,
    start_time INTEGER NOT NULL,
    boot_id    TEXT NOT NULL,
    profiles   BLOB NOT NULL,
    argv       BLOB NOT NULL,
    cwd        BLOB NOT NULL,
    captured   BLOB,
    applied    BLOB
);
CREATE INDEX RuntimesOfUser ON Runtimes(uid, started);
CREATE INDEX RuntimesByParent ON Runtimes(parent);
CREATE INDEX RuntimesByCaptured ON Runtimes(captured);
CREATE INDEX RuntimesByApplied ON Runtimes(applied);
CREATE TABLE Envs (
    hash BLOB PRIMARY KEY,
    data BLOB NOT NULL
) WITHOUT ROWID;
"""
_COLUMNS = (
    "id, uid, name, parent, started, ended, durable, pid, start_time, boot_id, profiles, argv, cwd"
)
# Runtimes of one user whose processes live at once.  Each is watched by a task holding a
# pidfd (daemon/runtime/watcher.py), so this, times the users allowed to connect, bounds
# the daemon's tasks and descriptors; 256 is more shells and services than one person
# runs under store-run.
MAX_LIVE_PER_USER = 256
# Records kept of one user's runtimes: past this the oldest ended non-durable ones are
# dropped; live and durable ones are never dropped, so when those alone fill it a new one
# is refused.  512 summaries fit a reply frame (`runtimes` clips their argv), and their
# environments, at most 2 MiB each, bound what one user's records hold on disk.
MAX_RECORDS_PER_USER = 512
DB_FILE = "runtimes.sqlite"
# The daemon's alone: users see their runtimes through it.
FILE_MODE = 0o600
DIR_MODE = 0o700
# Only the daemon opens the file, one connection under a lock: busy means another
# process (an admin's sqlite3) holds it, and a request may wait that long for it.
BUSY_TIMEOUT_MS = 10_000


class TooManyRuntimes(PermissionError):
    """A user at a limit (`permission-denied`: the request is refused as theirs)."""


class ParentStatus(StrEnum):
    NONE = "none"
    LINKED = "linked"
    DANGLING = "dangling"


@dataclass(frozen=True, slots=True)
class Record:
    id: str
    uid: int
    name: str | None
    parent: str | None  # as the caller gave it: it may never have been, or be gone
    started: float
    ended: float | None
    durable: bool
    pid: int
    start_time: int  # /proc/PID/stat field 22: with boot_id, which process it was
    boot_id: str
    profiles: tuple[str, ...]
    argv: tuple[bytes, ...]
    cwd: bytes

    @property
    def alive(self) -> bool:
        return self.ended is None


@dataclass(frozen=True, slots=True)
class Summary:
    record: Record
    parent_status: ParentStatus


class Records:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(mode=DIR_MODE, exist_ok=True)
        os.chmod(directory, DIR_MODE)
        self._envs = SealedEnvs(directory / KEY_FILE)
        path = directory / DB_FILE
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE))
        os.chmod(path, FILE_MODE)
        self._db = apsw.Connection(str(path))
        self._db.setbusytimeout(BUSY_TIMEOUT_MS)
        self._db.execute("PRAGMA secure_delete = ON")
        # A commit with no fsync (WAL, synchronous NORMAL): registering a runtime took
        # 7.8 ms of a 36 ms `store-run` with the rollback journal's fsyncs, 2 ms without.
        # A power cut may lose the last records, never corrupt the file; their runtimes'
        # processes are gone with the machine, and their roots go at the next start.
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._lock = threading.Lock()
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            schema = _SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};"
            self._write(lambda: self._db.execute(schema))
        elif version != SCHEMA_VERSION:
            raise RuntimeError(f"{path}: schema version {version}, not {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writing --

    def register(
        self, rec: Record, captured: Env, applied: Env, write_roots: Callable[[], None]
    ) -> None:
        """Store a new runtime, within its user's limits, calling `write_roots` last
        before the commit: a refused runtime gets no roots, and roots a daemon that died
        before the commit left are removed at its next start (`RuntimeRoots`)."""

        def body() -> None:
            self._admit(rec.uid)
            envs = [self._envs.put(self._db, rec.uid, e) for e in (captured, applied)]
            self._db.execute(
                f"INSERT INTO Runtimes ({_COLUMNS}, captured, applied) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rec.id,
                    rec.uid,
                    rec.name,
                    rec.parent,
                    rec.started,
                    rec.ended,
                    int(rec.durable),
                    rec.pid,
                    rec.start_time,
                    rec.boot_id,
                    msgpack.packb(list(rec.profiles)),
                    msgpack.packb(list(rec.argv), use_bin_type=True),
                    rec.cwd,
                    *envs,
                ),
            )
            write_roots()

        with self._lock:
            self._write(body)

    def end(self, runtime_id: str, when: float) -> bool:
        """The runtime's process has exited: whether its roots stay (it is durable)."""

        def body() -> bool:
            row = self._db.execute(
                "SELECT durable, forgotten FROM Runtimes WHERE id = ?", (runtime_id,)
            ).fetchone()
            if row is None:
                return False
            if row[1]:
                self._delete([runtime_id])
                return False
            self._db.execute(
                "UPDATE Runtimes SET ended = ? WHERE id = ? AND ended IS NULL", (when, runtime_id)
            )
            return bool(row[0])

        with self._lock:
            return self._write(body)

    def forget(self, uid: int, runtime_id: str) -> bool:
        """Drop a runtime's record; True if its process lives (its roots stay until it
        exits)."""

        def body() -> bool:
            rec = self._get(uid, runtime_id)
            if rec.alive:
                hashes = self._env_hashes([runtime_id])
                self._db.execute(
                    "UPDATE Runtimes SET forgotten = 1, captured = NULL, applied = NULL "
                    "WHERE id = ?",
                    (runtime_id,),
                )
                self._envs.prune(self._db, hashes)
            else:
                self._delete([runtime_id])
            return rec.alive

        with self._lock:
            return self._write(body)

    # -- reading --

    def summaries(self, uid: int) -> list[Summary]:
        """The user's runtimes, newest first."""
        with self._lock:
            records = self._select("uid = ? ORDER BY started DESC, rowid DESC", (uid,))
            ids = {r.id for r in records}
            return [Summary(r, _status(r, ids)) for r in records]

    def summary(self, uid: int, runtime_id: str) -> tuple[Summary, list[str]]:
        """A runtime, and its children's ids (oldest first)."""
        with self._lock:
            rec = self._get(uid, runtime_id)
            children = [
                row[0]
                for row in self._db.execute(
                    "SELECT id FROM Runtimes WHERE uid = ? AND parent = ? AND forgotten = 0 "
                    "ORDER BY started, rowid",
                    (uid, runtime_id),
                )
            ]
            return Summary(rec, self._status_of(rec)), children

    def lineage(self, uid: int, runtime_id: str) -> list[Summary]:
        """From the runtime up to its outermost linked ancestor."""
        with self._lock:
            return [Summary(r, self._status_of(r)) for r in self._chain(uid, runtime_id)]

    def parent(self, uid: int, parent_id: str | None) -> Parent:
        """What the environment computation needs of a caller's parent."""
        if parent_id is None:
            return None
        with self._lock:
            try:
                chain = self._chain(uid, parent_id)
            except UnknownRuntime:
                return Dangling(parent_id)
            applied = self._envs.get(self._db, self._hash_of(chain[0].id, "applied"))
            pristine = self._envs.get(self._db, self._hash_of(chain[-1].id, "captured"))
            return Linked(parent_id, applied, pristine)

    def captured(self, uid: int, runtime_id: str, pristine: bool) -> Env:
        """The environment a runtime's caller had; `pristine`: its outermost linked
        ancestor's."""
        with self._lock:
            chain = self._chain(uid, runtime_id)
            whose = chain[-1 if pristine else 0]
            return self._envs.get(self._db, self._hash_of(whose.id, "captured"))

    def live(self) -> list[Record]:
        """Every runtime whose process was alive when last seen, of all users, forgotten
        ones too (their roots stay until they exit)."""
        with self._lock:
            return self._select("ended IS NULL", (), visible_only=False)

    def rooted(self) -> dict[str, int]:
        """The runtimes whose roots should exist (live, or durable and not forgotten),
        with their users' uids."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, uid FROM Runtimes WHERE ended IS NULL OR (durable AND NOT forgotten)"
            )
            return {row[0]: row[1] for row in rows}

    # -- inside the lock --

    def _write(self, body: Callable[[], T]) -> T:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            result = body()
            self._db.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (a full disk, say); a COMMIT that
            # failed (busy) leaves the transaction open, and every later BEGIN would fail.
            if not self._db.getautocommit():
                self._db.execute("ROLLBACK")
            raise
        return result

    def _admit(self, uid: int) -> None:
        """Refuse past the live limit; drop the oldest ended non-durable records past the
        records limit, refusing if no such record is left to drop."""
        (live,) = self._db.execute(
            "SELECT count(*) FROM Runtimes WHERE uid = ? AND ended IS NULL", (uid,)
        ).fetchone()
        if live >= MAX_LIVE_PER_USER:
            raise TooManyRuntimes(
                f"you have {live} runtimes running, the most one user may "
                f"({MAX_LIVE_PER_USER}); end some first"
            )
        (kept,) = self._db.execute(
            "SELECT count(*) FROM Runtimes WHERE uid = ? AND NOT forgotten", (uid,)
        ).fetchone()
        if kept < MAX_RECORDS_PER_USER:
            return
        dropped = [
            row[0]
            for row in self._db.execute(
                "SELECT id FROM Runtimes WHERE uid = ? AND ended IS NOT NULL AND NOT durable "
                "AND NOT forgotten ORDER BY started, rowid LIMIT ?",
                (uid, kept - MAX_RECORDS_PER_USER + 1),
            )
        ]
        if kept - len(dropped) >= MAX_RECORDS_PER_USER:
            raise TooManyRuntimes(
                f"you have {kept} runtimes recorded, running or durable, the most one user "
                f"may ({MAX_RECORDS_PER_USER}); forget some first (store-runtime --forget)"
            )
        self._delete(dropped)

    def _delete(self, ids: list[str]) -> None:
        hashes = self._env_hashes(ids)
        self._db.executemany("DELETE FROM Runtimes WHERE id = ?", [(i,) for i in ids])
        self._envs.prune(self._db, hashes)

    def _env_hashes(self, ids: Iterable[str]) -> set[bytes]:
        hashes: set[bytes] = set()
        for runtime_id in ids:
            row = self._db.execute(
                "SELECT captured, applied FROM Runtimes WHERE id = ?", (runtime_id,)
            ).fetchone()
            hashes.update(h for h in row or () if h is not None)
        return hashes

    def _hash_of(self, runtime_id: str, column: str) -> bytes | None:
        row = self._db.execute(
            f"SELECT {column} FROM Runtimes WHERE id = ?", (runtime_id,)
        ).fetchone()
        return row[0] if row else None

    def _select(
        self, where: str, args: tuple[object, ...], visible_only: bool = True
    ) -> list[Record]:
        hidden = "NOT forgotten AND " if visible_only else ""
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM Runtimes WHERE {hidden}{where}", args)
        return [_record(row) for row in rows]

    def _get(self, uid: int, runtime_id: str) -> Record:
        """The user's runtime; another user's is answered as an unknown one."""
        found = self._select("uid = ? AND id = ?", (uid, runtime_id))
        if not found:
            raise UnknownRuntime(runtime_id)
        return found[0]

    def _chain(self, uid: int, runtime_id: str) -> list[Record]:
        """The runtime and its linked ancestors, outermost last."""
        chain = [self._get(uid, runtime_id)]
        seen = {runtime_id}
        while (up := chain[-1].parent) is not None and up not in seen:
            found = self._select("uid = ? AND id = ?", (uid, up))
            if not found:
                break
            seen.add(up)
            chain.append(found[0])
        return chain

    def _status_of(self, rec: Record) -> ParentStatus:
        if rec.parent is None:
            return ParentStatus.NONE
        linked = self._select("uid = ? AND id = ?", (rec.uid, rec.parent))
        return ParentStatus.LINKED if linked else ParentStatus.DANGLING


def _status(rec: Record, ids: set[str]) -> ParentStatus:
    if rec.parent is None:
        return ParentStatus.NONE
    return ParentStatus.LINKED if rec.parent in ids else ParentStatus.DANGLING


def _record(row: tuple[Any, ...]) -> Record:
    """A row of `_COLUMNS`: SQLite gives back the types it was given, but for the lists
    (msgpack) and the flag."""
    *head, durable, pid, start, boot, profiles, argv, cwd = row
    unpack = msgpack.unpackb
    return Record(
        *head, bool(durable), pid, start, boot, tuple(unpack(profiles)), tuple(unpack(argv)), cwd
    )

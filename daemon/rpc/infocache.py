"""Path-info answers kept between requests, forgotten whenever the database changes.

With a thousand clients asking about the paths of their builds, most path-info requests
ask what was asked a moment ago, and the lookup (parsing the path, the query, the info's
record, its encoding) cost the query worker 12 us a request, held the GIL the event loop
needs for most of them, and set the row's throughput.  Nix's workers keep such a cache too,
per process.

What may change a path's info (its deletion, its signatures, a repair) is a committed
write to the database, by this daemon or any other process; SQLite counts those for a
connection that makes none of its own (`PRAGMA data_version`).  So the cache holds such a
connection, and each batch of requests first asks it whether anything was committed since
the last batch: if so, everything is forgotten.  A write committed while a batch is read
is seen by the next batch's check, and a client that made the write had its reply only
after the commit, so no client is answered from before a write it knows of.  Only valid
paths' infos are kept: a path not yet valid is asked of the database every time.

A daemon service, not the store's: the composition root (`daemon/compose.py`) makes the
one of the daemon's store, `Services.infos` holds it for the path-info queries, and
`daemon/main.py` closes it (`forget`) with the store.
"""

import threading
from collections.abc import Callable
from typing import Any

import apsw

# Paths whose infos are kept: a few closures' worth (1,000 clients asking about a path of
# their own fit four times over), each entry a few hundred bytes of encoded info, so the
# whole cache stays under a few MiB.
MAX_ENTRIES = 4096
# How long the version check waits for a writer's lock, in the rare moments SQLite takes
# one to read the write-ahead log's index: far less than a batch's time; past it, the
# batch goes to the database uncached.
BUSY_TIMEOUT_MS = 100

Lookup = Callable[[list[str]], list[Any]]


class InfoCache:
    """Encoded path infos of one store, each batch of lookups checked against the
    database's count of commits first.  Safe across threads: batches take turns."""

    def __init__(self, db_path: str) -> None:
        self._db_path = db_path
        self._conn: apsw.Connection | None = None
        self._version: int | None = None
        self._infos: dict[str, Any] = {}
        self._lock = threading.Lock()

    def lookup(self, paths: list[str], fetch: Lookup) -> list[Any]:
        """What `fetch` answers for each path: its encoded info, or an exception for a
        path that is not valid (which is not kept); `fetch` is asked only about those not
        kept, once each, in order."""
        with self._lock:
            fresh = self._check()
            infos = self._infos if fresh else {}
            missing = list(dict.fromkeys(path for path in paths if path not in infos))
            fetched = dict(zip(missing, fetch(missing), strict=True)) if missing else {}
            # Answered before keeping: what is kept now may push out what was just found.
            answers = [infos[path] if path in infos else fetched[path] for path in paths]
            if fresh:
                self._keep(fetched)
            return answers

    def _keep(self, fetched: dict[str, Any]) -> None:
        for path, info in fetched.items():
            if not isinstance(info, Exception):
                self._infos[path] = info
        while len(self._infos) > MAX_ENTRIES:
            # The oldest kept first: dicts keep their insertion order.
            del self._infos[next(iter(self._infos))]

    def _check(self) -> bool:
        """Whether what is kept is still the database's: forgotten if anything was
        committed since the last check.  False when the check itself failed: nothing
        is kept or answered from the cache until one succeeds."""
        try:
            if self._conn is None:
                self._conn = apsw.Connection(self._db_path, flags=apsw.SQLITE_OPEN_READONLY)
                self._conn.setbusytimeout(BUSY_TIMEOUT_MS)
            # Read to its end: a statement left open would hold a read transaction, and
            # with it every checkpoint of the write-ahead log.
            version = self._conn.execute("PRAGMA data_version").fetchall()[0][0]
        except apsw.Error:
            self.forget()
            return False
        if version != self._version:
            self._infos.clear()
            self._version = version
        return True

    def forget(self) -> None:
        """Keep nothing, and close the connection (a store being closed, say)."""
        self._infos.clear()
        self._version = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

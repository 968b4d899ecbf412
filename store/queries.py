"""Read-only questions about valid paths, each one short read of the database.

Every query uses the indexes (and, for closures, a recursive CTE): each costs O(closure),
never O(store).  Paths named in a question are checked to be store paths of this store
first, so a malformed one is refused (`InvalidPath`) rather than answered "not valid".
"""

import json
from collections.abc import Iterable

from store.db import Database
from store.errors import NotValid, StoreError
from store.paths import StorePath
from store.records import ByDeriver, PathInfo

_INFO_SQL = """
SELECT v.hash, v.nar_size, v.registration_time, v.deriver, v.ca, v.sigs, rv.path
FROM ValidPaths v
LEFT JOIN Refs r ON r.referrer = v.id
LEFT JOIN ValidPaths rv ON rv.id = r.reference
WHERE v.path = ?
"""
# `_INFO_SQL` for many paths at once, each row naming its path.
_INFOS_SQL = """
SELECT v.path, v.hash, v.nar_size, v.registration_time, v.deriver, v.ca, v.sigs, rv.path
FROM ValidPaths v
LEFT JOIN Refs r ON r.referrer = v.id
LEFT JOIN ValidPaths rv ON rv.id = r.reference
WHERE v.path IN (SELECT value FROM json_each(?))
"""
_REFERRERS_SQL = (
    "SELECT v.path FROM Refs r JOIN ValidPaths v ON v.id = r.referrer "
    "WHERE r.reference = (SELECT id FROM ValidPaths WHERE path = ?) ORDER BY v.path"
)
_CLOSURE_SQL = """
WITH RECURSIVE c(id) AS (
    SELECT id FROM ValidPaths WHERE path IN (SELECT value FROM json_each(?))
    UNION
    SELECT r.reference FROM Refs r JOIN c ON r.referrer = c.id
)
SELECT c.id, v.path, r.reference
FROM c JOIN ValidPaths v ON v.id = c.id LEFT JOIN Refs r ON r.referrer = c.id
"""
# Each asked-about valid path with its deriver, when that deriver is valid too.
_DERIVERS_SQL = """
SELECT v.path, d.path
FROM ValidPaths v LEFT JOIN ValidPaths d ON d.path = v.deriver
WHERE v.path IN (SELECT value FROM json_each(?))
"""


class Queries:
    def __init__(self, db: Database, store_dir: str) -> None:
        self.db = db
        self.store_dir = store_dir

    def parse(self, path: str) -> StorePath:
        return StorePath.parse(path, self.store_dir)

    def is_valid(self, path: str) -> bool:
        self.parse(path)
        with self.db.connection() as conn:
            return (
                conn.execute("SELECT 1 FROM ValidPaths WHERE path = ?", (path,)).fetchone()
                is not None
            )

    def valid_paths(self, paths: Iterable[str]) -> set[str]:
        """The subset of `paths` that is valid, in one query."""
        wanted = list(paths)
        for p in wanted:
            self.parse(p)
        with self.db.connection() as conn:
            # A join rather than `IN (SELECT ...)`: the same plan, each value looked up in
            # the unique index, a third cheaper (0.58 ms against 0.89 for 402 paths).
            rows = conn.execute(
                "SELECT v.path FROM json_each(?) j JOIN ValidPaths v ON v.path = j.value",
                (json.dumps(wanted),),
            )
            return {r[0] for r in rows}

    def path_info(self, path: str) -> PathInfo | None:
        self.parse(path)
        with self.db.connection() as conn:
            rows = list(conn.execute(_INFO_SQL, (path,)))
        return _info(path, rows) if rows else None

    def path_infos(self, paths: list[str]) -> dict[str, PathInfo]:
        """The infos of those of `paths` that are valid, in one read of the database: the
        daemon asks this for many clients' requests at once."""
        for p in paths:
            self.parse(p)
        with self.db.connection() as conn:
            rows = list(conn.execute(_INFOS_SQL, (json.dumps(paths),)))
        found: dict[str, list[tuple]] = {}
        for row in rows:
            found.setdefault(row[0], []).append(row[1:])
        return {path: _info(path, rows) for path, rows in found.items()}

    def info_or_raise(self, path: str) -> PathInfo:
        info = self.path_info(path)
        if info is None:
            raise NotValid(f"path {path!r} is not valid")
        return info

    def resolve_deriver(self, path: str) -> str | None:
        """The derivation a path stands for: a `.drv` path is its own; an output's is the
        deriver it was registered with, if it is valid and has one; else None."""
        if path.endswith(".drv"):
            self.parse(path)
            return path
        info = self.path_info(path)
        return info.deriver if info is not None else None

    def by_deriver(self, paths: Iterable[str]) -> ByDeriver:
        """Group paths by the valid derivation that built them; the rest are orphans."""
        wanted = list(paths)
        for p in wanted:
            self.parse(p)
        with self.db.connection() as conn:
            derivers = dict(conn.execute(_DERIVERS_SQL, (json.dumps(wanted),)))
        groups = ByDeriver()
        for path in wanted:
            drv = derivers.get(path)
            if drv is None:
                groups.orphans.append(path)
            else:
                groups.rebuildable.setdefault(drv, []).append(path)
        return groups

    def path_with_hash(self, nar_hash: str) -> str | None:
        """A valid path whose archive has this hash, if any."""
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT path FROM ValidPaths WHERE hash = ? LIMIT 1", (nar_hash,)
            ).fetchone()
        return row[0] if row else None

    def references(self, path: str) -> list[str]:
        return list(self.info_or_raise(path).references)

    def referrers(self, path: str) -> list[str]:
        self.info_or_raise(path)
        with self.db.connection() as conn:
            return [r[0] for r in conn.execute(_REFERRERS_SQL, (path,))]

    def closure(self, paths: Iterable[str]) -> list[str]:
        """Every path reachable from `paths`, each after all of its references."""
        roots = sorted(set(paths))
        for p in roots:
            self.parse(p)
        with self.db.read() as conn:
            rows = list(conn.execute(_CLOSURE_SQL, (json.dumps(roots),)))
        names: dict[int, str] = {}
        refs: dict[int, list[int]] = {}
        for pid, p, ref in rows:
            names[pid] = p
            out = refs.setdefault(pid, [])
            if ref is not None and ref != pid:
                out.append(ref)
        missing = set(roots) - set(names.values())
        if missing:
            raise NotValid(f"path {min(missing)!r} is not valid")
        return [names[i] for i in references_first(refs)]


def references_first(refs: dict[int, list[int]]) -> list[int]:
    """Order nodes so each comes after everything it references (Kahn, iterative)."""
    waiting = {n: len(set(out)) for n, out in refs.items()}
    referrers: dict[int, list[int]] = {}
    for n, out in refs.items():
        for r in set(out):
            referrers.setdefault(r, []).append(n)
    ready = sorted((n for n, k in waiting.items() if k == 0), reverse=True)
    order: list[int] = []
    while ready:
        n = ready.pop()
        order.append(n)
        for m in referrers.get(n, ()):
            waiting[m] -= 1
            if waiting[m] == 0:
                ready.append(m)
    if len(order) != len(refs):
        raise StoreError("reference cycle in the store database")
    return order


def _info(path: str, rows: list[tuple]) -> PathInfo:
    """A path's info from its `_INFO_SQL` rows, one a reference (or one, with none)."""
    nar_hash, nar_size, reg_time, deriver, ca, sigs, _ = rows[0]
    refs = tuple(sorted(r[6] for r in rows if r[6] is not None))
    return PathInfo(path, nar_hash, nar_size, refs, reg_time, deriver, ca, tuple(sigs.split()))

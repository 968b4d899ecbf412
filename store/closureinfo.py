"""A closure with everything known of each of its paths, read in one snapshot.

`store-query --tree`, `--graph` and `--closure-size`, `store-why-depends` and
`store-export` all need every path of a closure with its references (and size, hash,
deriver).  Asking path by path is one query per path and may see the store change in
between; this is one recursive query in one read transaction, O(closure).
"""

import json
from collections.abc import Iterable

from store.db import Database
from store.errors import NotValid
from store.paths import StorePath
from store.queries import references_first
from store.records import PathInfo

# One row per (path, reference): a path's own columns repeat on each of its rows.
_CLOSURE_INFO_SQL = """
WITH RECURSIVE c(id) AS (
    SELECT id FROM ValidPaths WHERE path IN (SELECT value FROM json_each(?))
    UNION
    SELECT r.reference FROM Refs r JOIN c ON r.referrer = c.id
)
SELECT v.id, v.path, v.hash, v.nar_size, v.registration_time, v.deriver, v.ca, v.sigs,
       r.reference
FROM c JOIN ValidPaths v ON v.id = c.id LEFT JOIN Refs r ON r.referrer = c.id
"""


def closure_infos(db: Database, store_dir: str, roots: Iterable[str]) -> list[PathInfo]:
    """Every path reachable from `roots` with its info, each after all of its references
    (a self-reference stays in `references` but does not count for the order)."""
    wanted = sorted(set(roots))
    for p in wanted:
        StorePath.parse(p, store_dir)
    with db.read() as conn:
        rows = list(conn.execute(_CLOSURE_INFO_SQL, (json.dumps(wanted),)))
    columns: dict[int, tuple] = {}
    refs: dict[int, list[int]] = {}
    for pid, *info, ref in rows:
        columns[pid] = tuple(info)
        out = refs.setdefault(pid, [])
        if ref is not None:
            out.append(ref)
    paths = {pid: info[0] for pid, info in columns.items()}
    missing = set(wanted) - set(paths.values())
    if missing:
        raise NotValid(f"path {min(missing)!r} is not valid")
    order = references_first({pid: [r for r in out if r != pid] for pid, out in refs.items()})
    infos = []
    for pid in order:
        path, nar_hash, nar_size, reg_time, deriver, ca, sigs = columns[pid]
        references = tuple(sorted(paths[r] for r in refs[pid]))
        infos.append(
            PathInfo(
                path, nar_hash, nar_size, references, reg_time, deriver, ca, tuple(sigs.split())
            )
        )
    return infos

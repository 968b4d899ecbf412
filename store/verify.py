"""Verification: do the valid paths exist, and do they still hash to what was registered?

It reads the registered hashes in one query and then the disk, path by path, outside any
transaction: a long check never holds up writers.
"""

import json
import os
from collections.abc import Iterable

from store.db import Database
from store.errors import NotValid
from store.hashing import hash_path
from store.records import VerifyReport


def verify(
    db: Database, paths: Iterable[str] | None = None, check_contents: bool = True
) -> VerifyReport:
    """Check that valid paths (all, or those given) exist and, with `check_contents`,
    re-hash them against what was registered."""
    with db.connection() as conn:
        if paths is None:
            rows = list(conn.execute("SELECT path, hash, nar_size FROM ValidPaths ORDER BY path"))
        else:
            wanted = list(paths)
            rows = list(
                conn.execute(
                    "SELECT path, hash, nar_size FROM ValidPaths "
                    "WHERE path IN (SELECT value FROM json_each(?)) ORDER BY path",
                    (json.dumps(wanted),),
                )
            )
            unknown = set(wanted) - {r[0] for r in rows}
            if unknown:
                raise NotValid(f"path {min(unknown)!r} is not valid")
    report = VerifyReport()
    for path, want_hash, _size in rows:
        report.checked += 1
        if not os.path.lexists(path):
            report.missing.append(path)
            continue
        if not check_contents:
            continue
        try:
            got, _ = hash_path(path)
        except (OSError, ValueError) as e:
            got = f"unreadable: {e}"
        if got != want_hash:
            report.mismatched.append((path, want_hash, got))
    return report

"""The statements that unregister a wave of dead paths (`store.gc.deletion`), with the
database's foreign-key checks done for the whole wave at once.

SQLite checks foreign keys row by row: for each deleted path, a search of `Refs` for a
referrer (`ON DELETE RESTRICT`), and the deletion of its own `Refs`, `DerivationOutputs`
and `RemoteDigests` rows (`CASCADE`), each as a small sub-program.  That was 40% of the
CPU a collection's transactions use (27 against 15 µs a path of user time, 100,000 dead
beside 100,000 live).  So while it deletes, the collection's own connection (no other
code uses it meanwhile) turns enforcement off and runs the same checks as one
statement each for a wave, inside the same transaction: nothing else writes between the
check and the deletion.  It does so only for the schema it knows: if the foreign keys
into `ValidPaths` are any others (a newer schema), enforcement stays on and each wave goes
by the database's own checks, as the slower path the tests also run.
"""

import json
from collections.abc import Iterator
from contextlib import contextmanager

import apsw

# (table, column, on delete) of every foreign key into ValidPaths(id) that the statements
# below stand in for.
KNOWN_FOREIGN_KEYS = frozenset(
    {
        ("Refs", "referrer", "CASCADE"),
        ("Refs", "reference", "RESTRICT"),
        ("DerivationOutputs", "drv", "CASCADE"),
        ("RemoteDigests", "path", "CASCADE"),
    }
)
_FOREIGN_KEYS = """
SELECT m.name, f."from", f.on_delete, f."table", f."to"
FROM sqlite_master AS m, pragma_foreign_key_list(m.name) AS f
WHERE m.type = 'table'
"""
_IDS = "(SELECT value FROM json_each(?))"
# RESTRICT: what another path still refers to (a self-reference does not count: the
# `DeleteSelfRefs` trigger lets such a path go).  A wave's paths refer to none of each
# other, and the referrers of earlier waves are gone, so any referrer left keeps it.
_REFERRED = (
    f"SELECT DISTINCT reference FROM Refs WHERE reference IN {_IDS} AND referrer != reference"
)
_CASCADES = (
    f"DELETE FROM Refs WHERE referrer IN {_IDS}",
    f"DELETE FROM DerivationOutputs WHERE drv IN {_IDS}",
    f"DELETE FROM RemoteDigests WHERE path IN {_IDS}",
)
_DELETE = f"DELETE FROM ValidPaths WHERE id IN {_IDS} RETURNING id"


def checks_known(conn: apsw.Connection) -> bool:
    """Whether the foreign keys into ValidPaths are exactly those stood in for here."""
    keys = conn.execute(_FOREIGN_KEYS).fetchall()
    into = {
        (table, column, action)
        for table, column, action, parent, _ in keys
        if parent == "ValidPaths"
    }
    return into == KNOWN_FOREIGN_KEYS


@contextmanager
def checks_here(conn: apsw.Connection) -> Iterator[bool]:
    """Foreign-key enforcement off on `conn` for the block, if the schema is the one known;
    yields whether it is (then `unregister` must be told so).  `conn` is in no transaction
    on entry and leaves none open."""
    if not checks_known(conn):
        yield False
        return
    conn.execute("PRAGMA foreign_keys = OFF")
    try:
        yield True
    finally:
        if not conn.getautocommit():
            conn.execute("ROLLBACK")
        conn.execute("PRAGMA foreign_keys = ON")
        if conn.execute("PRAGMA foreign_keys").fetchone()[0] != 1:
            raise RuntimeError("could not turn foreign-key enforcement back on")


def unregister(conn: apsw.Connection, ids: list[int], here: bool) -> set[int]:
    """Delete the rows of a wave (paths none of which refers to another) that nothing
    else refers to, in the transaction under way; the row ids deleted.  `here`: inside
    `checks_here`, which yielded True."""
    if here:
        blocked = {r[0] for r in conn.execute(_REFERRED, (json.dumps(ids),))}
        wave = json.dumps([i for i in ids if i not in blocked] if blocked else ids)
        for cascade in _CASCADES:
            conn.execute(cascade, (wave,))
        return {r[0] for r in conn.execute(_DELETE, (wave,))}
    try:
        return {r[0] for r in conn.execute(_DELETE, (json.dumps(ids),))}
    except apsw.ConstraintError:
        # One is still referred to: by a path added since the marking, or by a dead one
        # kept (pinned, or itself referred to).  One by one, to keep just those.
        return {row for row in ids if _unregister_one(conn, row)}


def _unregister_one(conn: apsw.Connection, row: int) -> bool:
    try:
        return bool(
            conn.execute("DELETE FROM ValidPaths WHERE id = ? RETURNING 1", (row,)).fetchall()
        )
    except apsw.ConstraintError:
        return False

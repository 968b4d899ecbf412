"""Putting prepared paths into the store: installing new ones, registering a build's
outputs, and replacing the contents of registered paths (repair).

An entry prepared in the temporary area is renamed into place and registered inside one
`BEGIN IMMEDIATE` transaction.  Holding the write lock across the rename means that,
whenever the lock is free, every store path on disk is either registered or debris of a
dead process: an unregistered path found under the lock is moved aside, never adopted.
Replaced contents leave as a deletion does (`store.recovery`), so a crash before the commit
brings them back.
"""

import json
import os
import stat
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import apsw

from store.db import Database
from store.drvcheck import DerivationCheck
from store.errors import HashMismatch, InvalidReference, NotValid, StoreError
from store.ingest import copy_tree, take_tree
from store.queries import Queries, references_first
from store.records import NewPath, PathInfo
from store.recovery import Recovery
from store.refscan import scan_path
from store.tmparea import TmpArea, remove_tree

# Hears of the paths each install put in place, once their registration has committed.
AfterInstall = Callable[[list[str]], None]
# Hears of the paths an install puts in place before their registration commits.


class Installer:
    def __init__(
        self,
        db: Database,
        tmp: TmpArea,
        queries: Queries,
        recovery: Recovery,
        after_install: AfterInstall,
    ) -> None:
        self.db = db
        self.tmp = tmp
        self.queries = queries
        self.recovery = recovery
        self.after_install = after_install
        self.derivations = DerivationCheck(queries)

    def add_outputs(
        self,
        drv_path: str,
        built: Mapping[str, tuple[str, str]],
        candidates: Iterable[str],
        expected_hashes: Mapping[str, str] | None = None,
        repair: bool = False,
        move: bool = False,
    ) -> list[PathInfo]:
        """Register a build's outputs (see `Store.add_outputs`)."""
        expected_hashes = expected_hashes or {}
        own = {p for _, p in built.values()}
        by_hash_part = {self.queries.parse(p).hash_part: p for p in {*candidates, *own}}
        entries: list[NewPath] = []
        try:
            for output, (src, path) in sorted(built.items()):
                entry = self.tmp.new_entry()
                entries.append(NewPath(entry, path, "", 0, ()))
                got = take_tree(src, entry) if move else copy_tree(src, entry)
                want = expected_hashes.get(output)
                if want is not None and got.nar_hash != want:
                    # Nix's words, which people who asked for the hash with an empty one
                    # (a dummy) look for.
                    raise HashMismatch(
                        f"hash mismatch in fixed-output derivation '{drv_path}':\n"
                        f"  specified: {want}\n     got:    {got.nar_hash}"
                    )
                found = scan_path(entry, by_hash_part)
                refs = tuple(sorted(by_hash_part[h] for h in found))
                ca = f"fixed:out:{want}" if want is not None else None
                entries[-1] = NewPath(entry, path, got.nar_hash, got.nar_size, refs, ca, drv_path)
            _refuse_cycles(entries)
            if repair:
                return self.replace(entries)
            outputs = [(drv_path, output, path) for output, (_, path) in built.items()]
            return self.install(entries, outputs)
        finally:
            for new in entries:
                remove_tree(new.entry)

    def install(
        self,
        new: Sequence[NewPath],
        drv_outputs: Sequence[tuple[str, str, str]] = (),
    ) -> list[PathInfo]:
        """Rename entries into place and register them, all in one transaction.

        References may name paths registered earlier or other paths of this batch, and a
        path may refer to itself.  `drv_outputs` (drv path, output name, output path) rows
        are recorded when the derivation is valid.  Paths named `*.drv` must be derivations
        that check out (`store.drvcheck`), or nothing is installed.
        """
        self.derivations.check(new)
        entries = [(n.entry.name,) for n in new]
        # Journal the adds before the renames: if this process dies between a rename and
        # the commit, the next open finds the rows and removes the unregistered paths.
        self.db.write(
            lambda conn: conn.executemany(
                "INSERT INTO PendingAdds (entry, path) VALUES (?, ?)",
                [(n.entry.name, n.path) for n in new],
            )
        )
        aside: list[Path] = []

        def body(conn: apsw.Connection) -> list[PathInfo]:
            conn.executemany("DELETE FROM PendingAdds WHERE entry = ?", entries)
            batch = {n.path for n in new}
            external = sorted({r for n in new for r in n.references} - batch)
            ids = dict(zip(external, _ids(conn, external), strict=True))
            renamed: list[NewPath] = []
            try:
                fresh = self._place(conn, new, aside, renamed)
                reg_time = int(time.time())
                infos = [
                    PathInfo(
                        n.path, n.nar_hash, n.nar_size, n.references, reg_time, n.deriver, n.ca
                    )
                    for n in fresh
                ]
                _register(conn, fresh, ids, reg_time, drv_outputs)
            except BaseException:
                for n in renamed:
                    os.rename(n.path, n.entry)
                raise
            return infos

        try:
            installed = self.db.write(body)
        except BaseException:
            self.db.write(
                lambda conn: conn.executemany("DELETE FROM PendingAdds WHERE entry = ?", entries)
            )
            raise
        finally:
            for moved in aside:
                remove_tree(moved)
        if installed:
            self.after_install([i.path for i in installed])
        done = {i.path for i in installed}
        return installed + [self.queries.info_or_raise(n.path) for n in new if n.path not in done]

    def _place(
        self,
        conn: apsw.Connection,
        new: Sequence[NewPath],
        aside: list[Path],
        renamed: list[NewPath],
    ) -> list[NewPath]:
        """Rename the entries not valid yet into place; the rest are left where they are."""
        fresh = []
        for n in new:
            if conn.execute("SELECT 1 FROM ValidPaths WHERE path = ?", (n.path,)).fetchone():
                continue
            final = Path(n.path)
            # Under the write lock an unregistered path is a dead process's debris.
            moved = self.tmp.move_aside(final)
            if moved is not None:
                aside.append(moved)
            is_dir = stat.S_ISDIR(os.lstat(n.entry).st_mode)
            if is_dir:
                # Moving a directory to a new parent rewrites its '..': it needs write
                # permission on the directory itself unless we are root.
                os.chmod(n.entry, 0o755)
            os.rename(n.entry, final)
            renamed.append(n)
            if is_dir:
                os.chmod(final, 0o555)
            fresh.append(n)
        return fresh

    def replace(self, new: Sequence[NewPath]) -> list[PathInfo]:
        """Put rebuilt contents in place of registered paths, in one transaction.

        The old contents leave as a deletion does, so a crash before the commit brings
        them back (`Recovery.recover`).
        """
        recovery = self.recovery
        into = recovery.deletion_dir()

        def body(conn: apsw.Connection) -> None:
            moved: list[tuple[Path, str | None]] = []
            try:
                for n in new:
                    row = conn.execute(
                        "SELECT id FROM ValidPaths WHERE path = ?", (n.path,)
                    ).fetchone()
                    if row is None:
                        raise NotValid(f"path {n.path!r} is not valid")
                    old = recovery.move_out(n.path, into)
                    final = Path(n.path)
                    if stat.S_ISDIR(os.lstat(n.entry).st_mode):
                        os.chmod(n.entry, 0o755)
                    os.rename(n.entry, final)
                    moved.append((final, old))
                    if stat.S_ISDIR(os.lstat(final).st_mode):
                        os.chmod(final, 0o555)
                    _reregister(conn, row[0], n)
            except BaseException:
                for final, old in reversed(moved):
                    remove_tree(final)
                    if old is not None:
                        recovery.move_back(old, final)
                raise

        try:
            self.db.write(body)
        finally:
            remove_tree(into)
        return [self.queries.info_or_raise(n.path) for n in new]


def _register(
    conn: apsw.Connection,
    fresh: Sequence[NewPath],
    ids: dict[str, int],
    reg_time: int,
    drv_outputs: Sequence[tuple[str, str, str]],
) -> None:
    """Insert the rows of paths just placed: all of them first, so references within the
    batch (and to themselves) have ids, then their references, then derivation outputs."""
    for n in fresh:
        conn.execute(
            "INSERT INTO ValidPaths (path, hash, nar_size, registration_time, "
            "deriver, ca) VALUES (?, ?, ?, ?, ?, ?)",
            (n.path, n.nar_hash, n.nar_size, reg_time, n.deriver, n.ca),
        )
        ids[n.path] = conn.last_insert_rowid()
    for n in fresh:
        conn.executemany(
            "INSERT OR IGNORE INTO Refs (referrer, reference) VALUES (?, ?)",
            [(ids[n.path], ids[r]) for r in n.references],
        )
    conn.executemany(
        "INSERT OR REPLACE INTO DerivationOutputs (drv, id, path) "
        "SELECT v.id, ?, ? FROM ValidPaths v WHERE v.path = ?",
        [(output, path, drv) for drv, output, path in drv_outputs],
    )


def _reregister(conn: apsw.Connection, row: int, n: NewPath) -> None:
    """The registered path `row` has the contents of `n` now: its hash, size, references."""
    conn.execute(
        "UPDATE ValidPaths SET hash = ?, nar_size = ? WHERE id = ?",
        (n.nar_hash, n.nar_size, row),
    )
    conn.execute("DELETE FROM Refs WHERE referrer = ?", (row,))
    refs = [r for r in n.references if r != n.path]
    conn.executemany(
        "INSERT INTO Refs (referrer, reference) VALUES (?, ?)",
        [(row, i) for i in _ids(conn, refs)] + ([(row, row)] if n.path in n.references else []),
    )


def _ids(conn: apsw.Connection, paths: Sequence[str]) -> list[int]:
    if not paths:
        return []
    rows = dict(
        conn.execute(
            "SELECT path, id FROM ValidPaths WHERE path IN (SELECT value FROM json_each(?))",
            (json.dumps(list(paths)),),
        )
    )
    missing = [p for p in paths if p not in rows]
    if missing:
        raise InvalidReference(f"reference {missing[0]!r} is not a valid path")
    return [rows[p] for p in paths]


def _refuse_cycles(new: Sequence[NewPath]) -> None:
    """A build's outputs may refer to themselves, but not to each other in a cycle: no
    order would put each after its references (Nix refuses them too)."""
    index = {n.path: i for i, n in enumerate(new)}
    refs = {
        i: [index[r] for r in n.references if r in index and r != n.path] for i, n in enumerate(new)
    }
    try:
        references_first(refs)
    except StoreError:
        names = ", ".join(sorted(n.path for n in new))
        raise StoreError(f"the outputs refer to each other in a cycle: {names}") from None

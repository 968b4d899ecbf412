"""The store: atomic adds, queries and verification over a state dir.

An add is built in the temporary area, hashed as it is written, and then, inside one
`BEGIN IMMEDIATE` transaction, renamed into place and registered.  Holding the write lock
across the rename means that, whenever the lock is free, every store path on disk is either
registered or debris of a dead process: an unregistered path found under the lock is
removed, never adopted.  Paths arrive complete (rename) and leave whole (rename away, then
delete), so no reader ever sees half a path.

Every method blocks; the daemon calls them from worker threads.
"""

import json
import os
import stat
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import apsw
import blake3

from store import nar
from store.db import Database
from store.hashing import format_hash, hash_path
from store.ingest import copy_tree, copy_tree_as, take_tree
from store.layout import StateDir
from store.optimise import OptimiseStats, optimise_paths
from store.paths import PathKind, StorePath, make_store_path, validate_name
from store.pins import PinOwner, Pins
from store.refscan import scan_path
from store.sourcecache import SourceCache, signature
from store.tmparea import DELETION, TmpArea, owner_alive, owner_of, remove_tree


class StoreError(Exception):
    """An operation the store refuses, with a message meant for the user."""


class InvalidReference(StoreError):
    """A path was added with a reference that is not valid in the store."""


class HashMismatch(StoreError):
    """Content did not have the hash it was declared to have."""


class NotValid(StoreError):
    """A query named a path that is not valid."""


@dataclass(frozen=True, slots=True)
class PathInfo:
    path: str
    nar_hash: str
    nar_size: int
    references: tuple[str, ...]
    registration_time: int
    deriver: str | None = None
    ca: str | None = None
    sigs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NewPath:
    """A path built in the temporary area, ready to be renamed into place and registered."""

    entry: Path
    path: str
    nar_hash: str
    nar_size: int
    references: tuple[str, ...]
    ca: str | None = None
    deriver: str | None = None


@dataclass(frozen=True, slots=True)
class Reader:
    """A user whose permissions apply to reading a source."""

    uid: int
    gid: int
    groups: tuple[int, ...]


@dataclass(slots=True)
class VerifyReport:
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    # (path, hash registered, hash found)
    mismatched: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.mismatched


_INFO_SQL = """
SELECT v.hash, v.nar_size, v.registration_time, v.deriver, v.ca, v.sigs, rv.path
FROM ValidPaths v
LEFT JOIN Refs r ON r.referrer = v.id
LEFT JOIN ValidPaths rv ON rv.id = r.reference
WHERE v.path = ?
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


class Store:
    def __init__(self, state: StateDir, auto_optimise: bool = False) -> None:
        state.create()
        self.state = state
        self.store_dir = str(state.store_dir)
        self.db = Database(state.db_path)
        self.tmp = TmpArea(state.tmp_dir)
        self.pins = Pins()
        self.auto_optimise = auto_optimise
        self._sources = SourceCache()
        self.recover()

    @classmethod
    def open(cls, root: str | os.PathLike[str] | None = None) -> "Store":
        return cls(StateDir.at(root))

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paths ------------------------------------------------------------------------

    def parse(self, path: str) -> StorePath:
        return StorePath.parse(path, self.store_dir)

    def _real(self, path: str) -> Path:
        return Path(self.store_dir) / self.parse(path).base_name

    # -- crash recovery ---------------------------------------------------------------

    def recover(self) -> None:
        """Remove what dead processes left behind: unregistered paths, then scratch."""
        with self.db.connection() as conn:
            pending = list(conn.execute("SELECT entry, path FROM PendingAdds"))
        for entry, path in pending:
            if owner_alive(owner_of(entry)):
                continue

            def body(conn: apsw.Connection, entry: str = entry, path: str = path) -> Path | None:
                conn.execute("DELETE FROM PendingAdds WHERE entry = ?", (entry,))
                if conn.execute("SELECT 1 FROM ValidPaths WHERE path = ?", (path,)).fetchone():
                    return None
                return self.tmp.move_aside(Path(path))

            aside = self.db.write(body)
            if aside is not None:
                remove_tree(aside)
        for entry in self.tmp.dead_entries(DELETION):
            self._finish_deletion(entry)
        self.tmp.remove_dead_entries()

    def _finish_deletion(self, batch: Path) -> None:
        """Deletions whose process died: each undone if its transaction did not commit."""
        names = os.listdir(batch)

        def body(conn: apsw.Connection) -> None:
            for name in names:
                final = os.path.join(self.store_dir, name)
                registered = conn.execute(
                    "SELECT 1 FROM ValidPaths WHERE path = ?", (final,)
                ).fetchone()
                if registered and not os.path.lexists(final):
                    self.move_back(batch / name, final)

        self.db.write(body)
        remove_tree(batch)

    # -- deleting (for the collector, inside its write transaction) ---------------------

    def deletion_dir(self) -> str:
        """A new directory in `.tmp` to move deleted paths into (see `recover`)."""
        path = str(self.tmp.new_entry(DELETION))
        os.mkdir(path, 0o700)
        return path

    def move_out(self, path: str, into: str) -> str | None:
        """Rename a path out of the store into `into`, a `deletion_dir()`."""
        base = self.parse(path).base_name
        final = os.path.join(self.store_dir, base)
        entry = os.path.join(into, base)
        try:
            try:
                os.rename(final, entry)
            except PermissionError:
                # Not root: moving a directory to a new parent rewrites its '..'.
                os.chmod(final, 0o755)
                os.rename(final, entry)
        except FileNotFoundError:
            return None
        return entry

    def move_back(self, entry: str | Path, final: str | Path) -> None:
        os.rename(entry, final)
        if stat.S_ISDIR(os.lstat(final).st_mode):
            os.chmod(final, 0o555)

    # -- adding -----------------------------------------------------------------------

    def add_path(
        self,
        src: str | os.PathLike[str],
        name: str | None = None,
        references: Iterable[str] = (),
        reader: Reader | None = None,
        pin: Hashable | None = None,
    ) -> PathInfo:
        """Add a file, symlink or tree from disk as a source path.

        Re-adding a tree whose metadata has not changed since it was last added here is a
        lookup: nothing is read or written (see `store.sourcecache`).  With `reader`, the
        source is read with that user's permissions (and never answered from the cache).
        With `pin`, the path is pinned for that owner before it is looked up or added, so
        the collector cannot take it from under the caller.
        """
        if name is None:
            name = os.path.basename(os.path.abspath(src))
        key = (os.fsencode(os.path.abspath(src)), name, tuple(sorted(set(references))))
        sig = signature(src) if reader is None else None
        if sig is not None:
            known = self._sources.get(key, sig)
            info = self._pinned_info(known, pin) if known is not None else None
            if info is not None:
                return info

        def fill(dest: Path) -> tuple[str, int]:
            if reader is None:
                got = copy_tree(src, dest)
            else:
                got = copy_tree_as(src, dest, reader.uid, reader.gid, list(reader.groups))
            return got.nar_hash, got.nar_size

        info = self._add(PathKind.SOURCE, name, references, fill, pin)
        if sig is not None and signature(src) == sig:
            self._sources.put(key, sig, info.path)
        return info

    def add_nar(
        self,
        read: Callable[[int], bytes],
        name: str,
        references: Iterable[str] = (),
        expected_hash: str | None = None,
        pin: Hashable | None = None,
    ) -> PathInfo:
        """Add a source path from an archive stream; a bad archive adds nothing.

        With `expected_hash`, a path that is already valid is returned without reading the
        stream at all: the caller decides whether to drain or drop it.
        """
        if expected_hash is not None:
            known = make_store_path(
                PathKind.SOURCE, expected_hash, self.store_dir, name, references
            )
            existing = self._pinned_info(str(known), pin)
            if existing is not None:
                return existing

        def fill(dest: Path) -> tuple[str, int]:
            hasher = blake3.blake3()
            nar_size = nar.restore(read, dest, observe=hasher.update)
            got = format_hash(hasher.digest())
            if expected_hash is not None and got != expected_hash:
                raise HashMismatch(f"archive for {name!r} has hash {got}, expected {expected_hash}")
            return got, nar_size

        return self._add(PathKind.SOURCE, name, references, fill, pin)

    def add_text(
        self,
        name: str,
        text: str | bytes,
        references: Iterable[str] = (),
        pin: Hashable | None = None,
    ) -> PathInfo:
        """Add one regular file whose contents are known, like a derivation."""
        return self.add_texts([(name, text, references)], pin)[0]

    def add_texts(
        self,
        items: Sequence[tuple[str, str | bytes, Iterable[str]]],
        pin: Hashable | None = None,
    ) -> list[PathInfo]:
        """Add many (name, text, references) files in one transaction; a reference may
        name another file of the batch."""
        planned: list[tuple[str, bytes, str, int, tuple[str, ...]]] = []
        for name, text, references in items:
            validate_name(name)
            data = text.encode() if isinstance(text, str) else text
            archive = (
                nar.HEADER + nar.file_header(False, len(data)) + data + nar.file_trailer(len(data))
            )
            nar_hash = format_hash(blake3.blake3(archive).digest())
            refs = tuple(sorted(set(references)))
            for ref in refs:
                self.parse(ref)
            path = str(make_store_path(PathKind.TEXT, nar_hash, self.store_dir, name, refs))
            planned.append((path, data, nar_hash, len(archive), refs))
        paths = [p[0] for p in planned]
        if pin is not None:
            self.pins.pin(pin, paths)
        present = self.valid_paths(paths)
        new: list[NewPath] = []
        try:
            for path, data, nar_hash, size, refs in planned:
                if path in present:
                    continue
                present.add(path)
                entry = self.tmp.new_entry()
                new.append(NewPath(entry, path, nar_hash, size, refs, f"text:{nar_hash}"))
                _write_text(entry, data)
            installed = {i.path: i for i in self._install(new)} if new else {}
        finally:
            for n in new:
                remove_tree(n.entry)
        return [installed.get(p) or self._info_or_raise(p) for p in paths]

    def _pinned_info(self, path: str, pin: Hashable | None) -> PathInfo | None:
        if pin is not None:
            self.pins.pin(pin, [path])
        return self.path_info(path)

    def _add(
        self,
        kind: PathKind,
        name: str,
        references: Iterable[str],
        fill: Callable[[Path], tuple[str, int]],
        pin: Hashable | None = None,
    ) -> PathInfo:
        validate_name(name)
        refs = sorted(set(references))
        for ref in refs:
            self.parse(ref)
        entry = self.tmp.new_entry()
        try:
            nar_hash, nar_size = fill(entry)
            path = str(make_store_path(kind, nar_hash, self.store_dir, name, refs))
            info = self._pinned_info(path, pin)
            if info is None:
                new = NewPath(
                    entry, path, nar_hash, nar_size, tuple(refs), f"{kind.value}:{nar_hash}"
                )
                (info,) = self._install([new])
        finally:
            remove_tree(entry)
        return info

    def add_outputs(
        self,
        drv_path: str,
        built: Mapping[str, tuple[str, str]],
        candidates: Iterable[str],
        expected_hashes: Mapping[str, str] | None = None,
        repair: bool = False,
        move: bool = False,
        placed: Callable[[list[PathInfo]], None] | None = None,
    ) -> list[PathInfo]:
        """Register a build's outputs, {output name: (where the builder left it, store path)}.

        Each is copied canonical into the temporary area (so nothing the builder can still
        touch lands in the store), or with `move` (outputs no process can reach any more)
        moved there and made canonical in place; hashed, checked against its expected hash
        if it has one, and scanned for references to `candidates` and to the outputs
        themselves; then all are renamed into place and registered in one transaction, with
        their deriver.
        With `repair`, they replace registered paths that are corrupt or missing.
        `placed` hears of the outputs this call puts in place (not those valid already)
        once they are there, before their registration commits: a build that needs them
        may start then, if it registers only after this call returned.
        """
        expected_hashes = expected_hashes or {}
        own = {p for _, p in built.values()}
        by_hash_part = {self.parse(p).hash_part: p for p in {*candidates, *own}}
        entries: list[NewPath] = []
        try:
            for output, (src, path) in sorted(built.items()):
                entry = self.tmp.new_entry()
                entries.append(NewPath(entry, path, "", 0, ()))
                got = take_tree(src, entry) if move else copy_tree(src, entry)
                want = expected_hashes.get(output)
                if want is not None and got.nar_hash != want:
                    raise HashMismatch(
                        f"output {output!r} of {drv_path} has hash {got.nar_hash}, expected {want}"
                    )
                found = scan_path(entry, by_hash_part)
                refs = tuple(sorted(by_hash_part[h] for h in found))
                ca = f"fixed:out:{want}" if want is not None else None
                entries[-1] = NewPath(entry, path, got.nar_hash, got.nar_size, refs, ca, drv_path)
            _refuse_cycles(entries)
            if repair:
                return self._replace(entries)
            outputs = [(drv_path, output, path) for output, (_, path) in built.items()]
            return self._install(entries, outputs, placed)
        finally:
            for new in entries:
                remove_tree(new.entry)

    def _install(
        self,
        new: Sequence[NewPath],
        drv_outputs: Sequence[tuple[str, str, str]] = (),
        placed: Callable[[list[PathInfo]], None] | None = None,
    ) -> list[PathInfo]:
        """Rename entries into place and register them, all in one transaction.

        References may name paths registered earlier or other paths of this batch, and a
        path may refer to itself.  `drv_outputs` (drv path, output name, output path) rows
        are recorded when the derivation is valid.
        """
        # Journal the adds before the renames: if this process dies between a rename and
        # the commit, the next open finds the rows and removes the unregistered paths.
        self.db.write(
            lambda conn: conn.executemany(
                "INSERT INTO PendingAdds (entry, path) VALUES (?, ?)",
                [(n.entry.name, n.path) for n in new],
            )
        )
        aside: list[Path] = []
        renamed: list[NewPath] = []

        def body(conn: apsw.Connection) -> list[PathInfo]:
            conn.executemany(
                "DELETE FROM PendingAdds WHERE entry = ?", [(n.entry.name,) for n in new]
            )
            batch = {n.path for n in new}
            external = sorted({r for n in new for r in n.references} - batch)
            ids = dict(zip(external, _ids(conn, external), strict=True))
            try:
                fresh = []
                for n in new:
                    if conn.execute(
                        "SELECT 1 FROM ValidPaths WHERE path = ?", (n.path,)
                    ).fetchone():
                        continue
                    final = Path(n.path)
                    # Under the write lock an unregistered path is a dead process's debris.
                    moved = self.tmp.move_aside(final)
                    if moved is not None:
                        aside.append(moved)
                    is_dir = stat.S_ISDIR(os.lstat(n.entry).st_mode)
                    if is_dir:
                        # Moving a directory to a new parent rewrites its '..': it needs
                        # write permission on the directory itself unless we are root.
                        os.chmod(n.entry, 0o755)
                    os.rename(n.entry, final)
                    renamed.append(n)
                    if is_dir:
                        os.chmod(final, 0o555)
                    fresh.append(n)
                reg_time = int(time.time())
                infos = [
                    PathInfo(
                        n.path, n.nar_hash, n.nar_size, n.references, reg_time, n.deriver, n.ca
                    )
                    for n in fresh
                ]
                if placed is not None and infos:
                    placed(infos)
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
            except BaseException:
                for n in renamed:
                    os.rename(n.path, n.entry)
                raise
            return infos

        try:
            installed = self.db.write(body)
        except BaseException:
            self.db.write(
                lambda conn: conn.executemany(
                    "DELETE FROM PendingAdds WHERE entry = ?", [(n.entry.name,) for n in new]
                )
            )
            raise
        finally:
            for moved in aside:
                remove_tree(moved)
        if self.auto_optimise and installed:
            self.optimise([i.path for i in installed])
        done = {i.path for i in installed}
        return installed + [self._info_or_raise(n.path) for n in new if n.path not in done]

    def _replace(self, new: Sequence[NewPath]) -> list[PathInfo]:
        """Put rebuilt contents in place of registered paths, in one transaction.

        The old contents leave as a deletion does, so a crash before the commit brings
        them back (`recover`).
        """
        into = self.deletion_dir()

        def body(conn: apsw.Connection) -> None:
            moved: list[tuple[Path, str | None]] = []
            try:
                for n in new:
                    row = conn.execute(
                        "SELECT id FROM ValidPaths WHERE path = ?", (n.path,)
                    ).fetchone()
                    if row is None:
                        raise NotValid(f"path {n.path!r} is not valid")
                    old = self.move_out(n.path, into)
                    final = Path(n.path)
                    if stat.S_ISDIR(os.lstat(n.entry).st_mode):
                        os.chmod(n.entry, 0o755)
                    os.rename(n.entry, final)
                    moved.append((final, old))
                    if stat.S_ISDIR(os.lstat(final).st_mode):
                        os.chmod(final, 0o555)
                    conn.execute(
                        "UPDATE ValidPaths SET hash = ?, nar_size = ? WHERE id = ?",
                        (n.nar_hash, n.nar_size, row[0]),
                    )
                    conn.execute("DELETE FROM Refs WHERE referrer = ?", (row[0],))
                    refs = [r for r in n.references if r != n.path]
                    conn.executemany(
                        "INSERT INTO Refs (referrer, reference) VALUES (?, ?)",
                        [(row[0], i) for i in _ids(conn, refs)]
                        + ([(row[0], row[0])] if n.path in n.references else []),
                    )
            except BaseException:
                for final, old in reversed(moved):
                    remove_tree(final)
                    if old is not None:
                        self.move_back(old, final)
                raise

        try:
            self.db.write(body)
        finally:
            remove_tree(into)
        return [self._info_or_raise(n.path) for n in new]

    def invalidate(self, path: str) -> None:
        """Forget a path that is gone from disk; refused while a valid path refers to it."""

        def body(conn: apsw.Connection) -> None:
            try:
                conn.execute("DELETE FROM ValidPaths WHERE path = ?", (path,))
            except apsw.ConstraintError:
                raise StoreError(f"{path} is still referenced") from None

        self.db.write(body)

    def optimise(self, paths: Iterable[str] | None = None) -> OptimiseStats:
        """Hard-link identical files of these valid paths (all, by default)."""
        if paths is None:
            with self.db.connection() as conn:
                paths = [r[0] for r in conn.execute("SELECT path FROM ValidPaths")]
        stats = OptimiseStats()
        owner = PinOwner("optimise")
        for path in paths:
            # Pinned while it is worked on: replacing a file that is a whole store path
            # would otherwise put back a path the collector has just taken away.
            self.pins.pin(owner, [path])
            try:
                if self.is_valid(path):
                    optimise_paths([path], self.state.links_dir, self.tmp, stats)
            finally:
                self.pins.release(owner)
        return stats

    # -- queries ----------------------------------------------------------------------

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
            rows = conn.execute(
                "SELECT path FROM ValidPaths WHERE path IN (SELECT value FROM json_each(?))",
                (json.dumps(wanted),),
            )
            return {r[0] for r in rows}

    def path_info(self, path: str) -> PathInfo | None:
        self.parse(path)
        with self.db.connection() as conn:
            rows = list(conn.execute(_INFO_SQL, (path,)))
        if not rows:
            return None
        nar_hash, nar_size, reg_time, deriver, ca, sigs, _ = rows[0]
        refs = tuple(sorted(r[6] for r in rows if r[6] is not None))
        return PathInfo(path, nar_hash, nar_size, refs, reg_time, deriver, ca, tuple(sigs.split()))

    def _info_or_raise(self, path: str) -> PathInfo:
        info = self.path_info(path)
        if info is None:
            raise NotValid(f"path {path!r} is not valid")
        return info

    def path_with_hash(self, nar_hash: str) -> str | None:
        """A valid path whose archive has this hash, if any."""
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT path FROM ValidPaths WHERE hash = ? LIMIT 1", (nar_hash,)
            ).fetchone()
        return row[0] if row else None

    def references(self, path: str) -> list[str]:
        return list(self._info_or_raise(path).references)

    def referrers(self, path: str) -> list[str]:
        self._info_or_raise(path)
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
        return [names[i] for i in _references_first(refs)]

    # -- verification -----------------------------------------------------------------

    def verify(
        self, paths: Iterable[str] | None = None, check_contents: bool = True
    ) -> VerifyReport:
        """Check that valid paths (all, or those given) exist and, with `check_contents`,
        re-hash them against what was registered."""
        with self.db.connection() as conn:
            if paths is None:
                rows = list(
                    conn.execute("SELECT path, hash, nar_size FROM ValidPaths ORDER BY path")
                )
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


def _write_text(dest: Path, data: bytes) -> None:
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, 0o444)
        os.utime(fd, (1, 1))
    finally:
        os.close(fd)


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
        _references_first(refs)
    except StoreError:
        names = ", ".join(sorted(n.path for n in new))
        raise StoreError(f"the outputs refer to each other in a cycle: {names}") from None


def _references_first(refs: dict[int, list[int]]) -> list[int]:
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

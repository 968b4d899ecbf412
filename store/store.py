"""The store: atomic adds, queries and verification over a state dir.

`Store` is the one object callers hold; each of its jobs lives in a module of its own and
`Store` hands the call on:

- `store.adds`: sources and texts, written into the temporary area and hashed as written;
- `store.install`: renaming prepared entries into place and registering them in one
  transaction, a build's outputs, and replacing contents (repair);
- `store.queries`: read-only questions;
- `store.verify`: existence and hashes against the database;
- `store.recovery`: paths leaving the store for the collector, and setting right at open
  what dead processes left half-way.

Paths arrive complete (rename) and leave whole (rename away, then delete), so no reader ever
sees half a path.  Every method blocks; the daemon calls them from worker threads.
"""

import os
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence

import apsw

from store import nar
from store.adds import Adder
from store.db import Database
from store.derivation import Derivation
from store.errors import HashMismatch, InvalidReference, NotValid, StoreError
from store.hashing import TextPaths
from store.install import Installer
from store.layout import StateDir
from store.optimise import OptimiseStats, optimise_paths
from store.paths import StorePath
from store.pins import PinOwner, Pins
from store.queries import Queries
from store.records import ByDeriver, NewPath, PathInfo, Reader, VerifyReport
from store.recovery import Recovery
from store.snapshots import Snapshots
from store.tmparea import TmpArea
from store.verify import verify

# The records and errors are the store's vocabulary: importable from here, with `Store`.
__all__ = [
    "ByDeriver",
    "HashMismatch",
    "InvalidReference",
    "NotValid",
    "PathInfo",
    "Reader",
    "Store",
    "StoreError",
    "VerifyReport",
]


class Store:
    def __init__(self, state: StateDir, auto_optimise: bool = False) -> None:
        state.create()
        self.state = state
        self.store_dir = str(state.store_dir)
        self.db = Database(state.db_path)
        self.tmp = TmpArea(state.tmp_dir)
        self.pins = Pins()
        self.auto_optimise = auto_optimise
        self._queries = Queries(self.db, self.store_dir)
        self._recovery = Recovery(self.db, self.tmp, self.store_dir)
        self._installer = Installer(
            self.db, self.tmp, self._queries, self._recovery, self._installed
        )
        self._adder = Adder(self.tmp, self.pins, self._queries, self._installer)
        self.snapshots = Snapshots(self.db)
        self._text_paths = TextPaths(self.store_dir)
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

    def parse(self, path: str) -> StorePath:
        return self._queries.parse(path)

    # -- crash recovery, and deleting (for the collector, inside its write transaction) --

    def recover(self) -> None:
        """Remove what dead processes left behind: unregistered paths, then scratch."""
        self._recovery.recover()

    def deletion_dir(self) -> str:
        """A new directory in `.tmp` to move deleted paths into (see `recover`)."""
        return self._recovery.deletion_dir()

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
        the collector cannot take it from under the caller.  A valid store path is itself;
        the store dir, what holds it, and what in it is no valid path are refused.
        """
        return self._adder.add_path(src, name, references, reader, pin)

    def take_path(
        self,
        src: str | os.PathLike[str],
        name: str,
        references: Iterable[str] = (),
        pin: Hashable | None = None,
    ) -> PathInfo:
        """Add a tree as a source path by moving it in and making it canonical where it
        lies, as a built output is (`store.ingest.take_tree`): only for a tree no other
        process can reach, such as one staged in the store's temporary area.  `src` is
        gone after an add, and may be after a failed one (the caller removes what is left).
        With `pin`, as `add_path`."""
        return self._adder.take_path(src, name, references, pin)

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
        return self._adder.add_nar(read, name, references, expected_hash, pin)

    def add_text(
        self,
        name: str,
        text: str | bytes,
        references: Iterable[str] = (),
        pin: Hashable | None = None,
    ) -> PathInfo:
        """Add one regular file whose contents are known, like a derivation (one named
        `*.drv` must be a derivation that checks out: `store.drvcheck`)."""
        return self._adder.add_texts([(name, text, references)], pin)[0]

    def add_texts(
        self,
        items: Sequence[tuple[str, str | bytes, Iterable[str]]],
        pin: Hashable | None = None,
    ) -> list[PathInfo]:
        """Add many (name, text, references) files in one transaction; a reference may
        name another file of the batch."""
        return self._adder.add_texts(items, pin)

    def text_path(self, name: str, text: str, references: Iterable[str] = ()) -> str:
        """The path `add_text` gives `text` named `name` with `references`, without adding
        it; remembered for the texts seen before (`TextPaths`: an evaluation sends the
        same `.drv`s again and again)."""
        return self._text_paths.path(name, text, references)

    def checked_derivation(self, path: str) -> Derivation | None:
        """The derivation at `path` as parsed when it was checked before registration
        (`store.drvcheck`), if that was lately: a `.drv` just added needs no parsing
        again.  The path's text never changes, so this is its derivation; whether it is
        valid is asked separately."""
        return self._installer.derivations.checked(path)

    def add_outputs(
        self,
        drv_path: str,
        built: Mapping[str, tuple[str, str]],
        candidates: Iterable[str],
        expected_hashes: Mapping[str, str] | None = None,
        repair: bool = False,
        move: bool = False,
    ) -> list[PathInfo]:
        """Register a build's outputs, {output name: (where the builder left it, store path)}.

        Each is copied canonical into the temporary area (so nothing the builder can still
        touch lands in the store), or with `move` (outputs no process can reach any more)
        moved there and made canonical in place; hashed, checked against its expected hash
        if it has one, and scanned for references to `candidates` and to the outputs
        themselves; then all are renamed into place and registered in one transaction, with
        their deriver.
        With `repair`, they replace registered paths that are corrupt or missing.
        """
        return self._installer.add_outputs(
            drv_path, built, candidates, expected_hashes, repair, move
        )

    def install(
        self, new: Sequence[NewPath], drv_outputs: Sequence[tuple[str, str, str]] = ()
    ) -> list[PathInfo]:
        """Entries already in `.tmp` renamed into place and registered with their
        references, derivers and `(drv, output, path)` rows, in one transaction: all of
        them or none (an import)."""
        return self._installer.install(new, drv_outputs)

    def _installed(self, paths: list[str]) -> None:
        if self.auto_optimise:
            self.optimise(paths)

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
        return self._queries.is_valid(path)

    def valid_paths(self, paths: Iterable[str]) -> set[str]:
        """The subset of `paths` that is valid, in one query."""
        return self._queries.valid_paths(paths)

    def path_info(self, path: str) -> PathInfo | None:
        return self._queries.path_info(path)

    def path_infos(self, paths: list[str]) -> dict[str, PathInfo]:
        """The infos of those of `paths` that are valid, in one read of the database."""
        return self._queries.path_infos(paths)

    def resolve_deriver(self, path: str) -> str | None:
        """The derivation a path stands for: a `.drv` path is its own; an output's is the
        deriver it was registered with, if it is valid and has one; else None."""
        return self._queries.resolve_deriver(path)

    def by_deriver(self, paths: Iterable[str]) -> ByDeriver:
        """Group paths by the valid derivation that built them (what repair can rebuild);
        the rest, in the order given, are orphans."""
        return self._queries.by_deriver(paths)

    def path_with_hash(self, nar_hash: str) -> str | None:
        """A valid path whose archive has this hash, if any."""
        return self._queries.path_with_hash(nar_hash)

    def dump(self, path: str) -> Iterator[bytes]:
        """The archive of a valid path, in chunks (`nar.dump`); refused if it is not valid."""
        if not self.is_valid(path):
            raise NotValid(f"path {path!r} is not valid")
        return nar.dump(path)

    def references(self, path: str) -> list[str]:
        return self._queries.references(path)

    def referrers(self, path: str) -> list[str]:
        return self._queries.referrers(path)

    def closure(self, paths: Iterable[str]) -> list[str]:
        """Every path reachable from `paths`, each after all of its references."""
        return self._queries.closure(paths)

    # -- verification -----------------------------------------------------------------

    def verify(
        self, paths: Iterable[str] | None = None, check_contents: bool = True
    ) -> VerifyReport:
        """Check that valid paths (all, or those given) exist and, with `check_contents`,
        re-hash them against what was registered."""
        return verify(self.db, paths, check_contents)

"""Adding sources and texts: the content is written into the temporary area, canonical and
hashed as it is written; its store path follows from the hash; if that path is valid
already the entry is dropped, else it is installed (`store.install`).

With a pin owner, the path is pinned before it is looked up or installed, so the collector
cannot take it from under the caller (`store.pins`: pin first, then check validity).
"""

import os
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path

import blake3

from store import nar
from store.derivation import check_hash
from store.errors import HashMismatch, NotValid, StoreError
from store.hashing import format_hash
from store.ingest import copy_tree, copy_tree_as, take_tree
from store.install import Installer
from store.paths import InvalidPath, PathKind, StorePath, make_store_path, validate_name
from store.pins import Pins
from store.queries import Queries
from store.records import NewPath, PathInfo, Reader
from store.sourcecache import SourceCache, signature
from store.tmparea import TmpArea, remove_tree

# Writes an entry's content at the path given; returns its archive's hash and size.
Fill = Callable[[Path], tuple[str, int]]


class Adder:
    def __init__(self, tmp: TmpArea, pins: Pins, queries: Queries, installer: Installer) -> None:
        self.tmp = tmp
        self.pins = pins
        self.queries = queries
        self.installer = installer
        self.store_dir = queries.store_dir
        self._sources = SourceCache()

    def add_path(
        self,
        src: str | os.PathLike[str],
        name: str | None = None,
        references: Iterable[str] = (),
        reader: Reader | None = None,
        pin: Hashable | None = None,
    ) -> PathInfo:
        """Add a file, symlink or tree from disk as a source path (see `Store.add_path`)."""
        if not os.fspath(src):
            raise StoreError("no path given to add (an empty string is not the current dir)")
        existing = self._in_store(src, name, references, pin)
        if existing is not None:
            return existing
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

    def take_path(
        self,
        src: str | os.PathLike[str],
        name: str,
        references: Iterable[str] = (),
        pin: Hashable | None = None,
    ) -> PathInfo:
        """Add a tree nothing else can reach by moving it in (see `Store.take_path`)."""

        def fill(dest: Path) -> tuple[str, int]:
            got = take_tree(src, dest)
            return got.nar_hash, got.nar_size

        return self._add(PathKind.SOURCE, name, references, fill, pin)

    def add_nar(
        self,
        read: Callable[[int], bytes],
        name: str,
        references: Iterable[str] = (),
        expected_hash: str | None = None,
        pin: Hashable | None = None,
    ) -> PathInfo:
        """Add a source path from an archive stream (see `Store.add_nar`)."""
        if expected_hash is not None:
            check_hash(expected_hash, f"expected hash of {name!r}")
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
                self.queries.parse(ref)
            path = str(make_store_path(PathKind.TEXT, nar_hash, self.store_dir, name, refs))
            planned.append((path, data, nar_hash, len(archive), refs))
        paths = [p[0] for p in planned]
        if pin is not None:
            self.pins.pin(pin, paths)
        present = self.queries.valid_paths(paths)
        new: list[NewPath] = []
        try:
            for path, data, nar_hash, size, refs in planned:
                if path in present:
                    continue
                present.add(path)
                entry = self.tmp.new_entry()
                ca = f"text:{nar_hash}"
                new.append(NewPath(entry, path, nar_hash, size, refs, ca, contents=data))
                _write_text(entry, data)
            installed = {i.path: i for i in self.installer.install(new)} if new else {}
        finally:
            for n in new:
                remove_tree(n.entry)
        return [installed.get(p) or self.queries.info_or_raise(p) for p in paths]

    def _in_store(
        self,
        src: str | os.PathLike[str],
        name: str | None,
        references: Iterable[str],
        pin: Hashable | None,
    ) -> PathInfo | None:
        """For a source in the store dir: a valid store path is itself (as Nix answers
        for a store path it is asked to add), unless another name or other references
        are asked for; within one, its content is copied as any tree is; the store dir,
        its scratch and paths not valid are refused.  (The copy refuses a source that holds
        its own destination whatever the path says: `store.ingest`.)"""
        given = os.path.abspath(src)
        real = os.path.join(os.path.realpath(os.path.dirname(given)), os.path.basename(given))
        store_real = os.path.realpath(self.store_dir)
        if real != store_real and not real.startswith(store_real + "/"):
            return None
        top, _, within = real[len(store_real) + 1 :].partition("/")
        if not top:
            raise StoreError(f"cannot add {given}: it is the store dir itself")
        try:
            path = str(StorePath.from_base_name(top, self.store_dir))
        except InvalidPath:
            raise StoreError(f"cannot add {given}: it is in the store, in no store path") from None
        info = self._pinned_info(path, pin)
        if info is None:
            raise NotValid(f"cannot add {given}: it is in {path}, which is not valid")
        refs = set(references)
        same_name = name in (None, top.split("-", 1)[1])
        if not within and same_name and (not refs or refs == set(info.references)):
            return info
        return None

    def _pinned_info(self, path: str, pin: Hashable | None) -> PathInfo | None:
        if pin is not None:
            self.pins.pin(pin, [path])
        return self.queries.path_info(path)

    def _add(
        self,
        kind: PathKind,
        name: str,
        references: Iterable[str],
        fill: Fill,
        pin: Hashable | None = None,
    ) -> PathInfo:
        validate_name(name)
        refs = sorted(set(references))
        for ref in refs:
            self.queries.parse(ref)
        entry = self.tmp.new_entry()
        try:
            nar_hash, nar_size = fill(entry)
            path = str(make_store_path(kind, nar_hash, self.store_dir, name, refs))
            info = self._pinned_info(path, pin)
            if info is None:
                new = NewPath(
                    entry, path, nar_hash, nar_size, tuple(refs), f"{kind.value}:{nar_hash}"
                )
                (info,) = self.installer.install([new])
        finally:
            remove_tree(entry)
        return info


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

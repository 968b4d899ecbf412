"""Adding an export stream (`docs/export.md`) to the store, all of it or nothing.

The stream comes from anyone, so nothing in it is believed until checked:

- the framing and every metadata field (`store/streamreader.py`), the store dir (a path's
  hash covers it: paths cannot move between store dirs), each name (`validate_name`);
- each archive against the hash and size its metadata declares, and the path against its
  contents: a source or text path is recomputed from its archive hash, name and
  references, a fixed output from its hash and name.  An output addressed by its
  derivation cannot be checked against its contents, so it, and every deriver, is taken
  only from a caller that trusts the stream (`trust_metadata`), as Nix takes unsigned
  input-addressed paths only from trusted users;
- each reference: earlier in the stream, the path itself, or valid in this store;
- a fixed output's references against its contents: its name covers only its content hash
  and name (a source or text path's covers its references), and a build finds them by a
  scan (`store/refscan.py`), so they must be exactly what a scan of its archive finds among
  the path itself, the references it declares and the paths the stream named before it: a
  forged one would keep a path alive for nothing, a dropped one would leave a closure
  short for the collector and for sandboxes;
- the trailer: the count, the roots in the stream, every path in their closure, and
  nothing after it.

Archives are restored into the temporary area as they arrive; only when the whole stream
has checked out are all of them renamed into place and registered, with their references,
in one transaction (`Store.install`).  A stream that fails anywhere leaves nothing
registered and its entries are removed.
"""

import os
import string
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from store import nar
from store.derivation import Derivation, DerivationError
from store.drvcheck import read_drv_file
from store.errors import HashMismatch, InvalidReference, StoreError
from store.export import MAGIC, MAX_FIELD, TAG_END, TAG_PATH, VERSION, StreamError
from store.hashing import format_hash
from store.paths import InvalidPath, PathKind, StorePath, make_store_path
from store.records import NewPath
from store.refscan import ReferenceScanner
from store.store import Store
from store.streamreader import READ_SIZE, StreamReader
from store.tmparea import remove_tree

# Paths in one stream: every one is held in the temporary area until the stream's end, so
# one stream is bounded.  Ten times the largest closures met in practice (a NixOS desktop
# system is about 5,000 paths).
MAX_PATHS = 65_536
# The metadata of one stream, all held until its end.  A 5,000-path closure declares about
# 100,000 references, some 10 MB; six times that keeps a stream that is little but
# metadata from holding more than a few hundred MB of the daemon's memory.
MAX_METADATA = 64 << 20
_HEX = frozenset(string.hexdigits.lower())
_HASH_PREFIX = "blake3:"
# The archive format's own limit: a size at or over it is absurd (`nar.ABSURD_LENGTH`).
_MAX_NAR_SIZE = nar.ABSURD_LENGTH
MAGIC_FIELD = nar.encode_str(MAGIC)


@dataclass(frozen=True, slots=True)
class Meta:
    """A path's metadata as the stream declares it, well-typed but not yet believed."""

    path: str
    nar_hash: str
    nar_size: int
    references: tuple[str, ...]
    deriver: str | None
    ca: str | None


@dataclass(slots=True)
class Imported:
    roots: list[str]
    paths: list[str]  # every path of the stream, references first
    added: list[str]  # those that were not valid here before


def import_stream(
    store: Store, read: Callable[[int], bytes], pin: Hashable, trust_metadata: bool
) -> Imported:
    """Check and add the stream read from `read`; every path it names is pinned for `pin`
    first (so a collection cannot take a reference between its check and the commit)."""
    job = _Import(store, pin, trust_metadata)
    try:
        return job.run(StreamReader(read))
    finally:
        job.discard()


class _Import:
    def __init__(self, store: Store, pin: Hashable, trust_metadata: bool) -> None:
        self.store = store
        self.pin = pin
        self.trust = trust_metadata
        self.seen: dict[str, Meta] = {}
        self.held = 0  # bytes of metadata read, all of it held until the end
        self.new: list[NewPath] = []
        # What a fixed output's scan looks for (`_scanner`): hash part to path, and the
        # same hash parts as the scanner wants them.
        self.by_part: dict[str, str] = {}
        self.wanted: set[bytes] = set()

    def run(self, src: StreamReader) -> Imported:
        roots = self._header(src)
        while (tag := src.tag()) != TAG_END:
            if tag != TAG_PATH:
                raise StreamError(f"unknown tag {tag!r} at byte {src.offset}")
            self._path(src)
        count = src.document(MAX_FIELD, "the trailer").get("count")
        if type(count) is not int or count != len(self.seen):
            raise StreamError(
                f"the trailer counts {count!r} paths; the stream holds {len(self.seen)}"
            )
        if not src.at_eof():
            raise StreamError(f"data after the trailer, at byte {src.offset}")
        self._check_closure(roots)
        if self.new:
            self.store.install(self.new, self._drv_outputs())
        return Imported(roots, list(self.seen), [n.path for n in self.new])

    def discard(self) -> None:
        for n in self.new:
            remove_tree(n.entry)

    def _header(self, src: StreamReader) -> list[str]:
        if src.exact(len(MAGIC_FIELD), "the magic") != MAGIC_FIELD:
            raise StreamError("not an export stream (bad magic): store-export writes them")
        version = int.from_bytes(src.exact(8, "the version"), "little")
        if version != VERSION:
            raise StreamError(f"export stream version {version}; this weft reads {VERSION}")
        doc = src.document(MAX_FIELD, "the header")
        store_dir = doc.get("store_dir")
        if store_dir != self.store.store_dir:
            raise InvalidPath(
                f"the stream holds paths of the store {store_dir!r}, not of this store "
                f"{self.store.store_dir!r}: a store path's hash covers its store dir, so "
                "paths cannot move to another one"
            )
        roots = doc.get("roots")
        if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
            raise StreamError("the header's 'roots' must be a list of store paths")
        for r in roots:
            self.store.parse(r)
        return roots

    def _path(self, src: StreamReader) -> None:
        if len(self.seen) >= MAX_PATHS:
            raise StreamError(f"more than {MAX_PATHS} paths in one stream")
        start = src.offset
        meta = _meta(src.document(MAX_FIELD, "a path's metadata"))
        self.held += src.offset - start
        if self.held > MAX_METADATA:
            raise StreamError(f"more than {MAX_METADATA} bytes of metadata in one stream")
        parsed = self.store.parse(meta.path)
        if meta.path in self.seen:
            raise StreamError(f"{meta.path} is in the stream twice")
        for r in meta.references:
            self.store.parse(r)
        self.store.pins.pin(self.pin, [meta.path, *meta.references])
        self._check_references(meta)
        deriver = self._deriver(meta)
        _check_address(meta, parsed, self.store.store_dir, self.trust)
        if self.store.is_valid(meta.path):
            _skip(src, meta)
        else:
            self._restore(src, meta, deriver)
        self.seen[meta.path] = meta
        self._look_for([meta.path])

    def _check_references(self, meta: Meta) -> None:
        outside = [r for r in meta.references if r != meta.path and r not in self.seen]
        valid = self.store.valid_paths(outside)
        for r in outside:
            if r not in valid:
                raise InvalidReference(
                    f"{meta.path} refers to {r}, which is neither earlier in the stream "
                    "nor valid in this store"
                )

    def _deriver(self, meta: Meta) -> str | None:
        if meta.deriver is None or not self.trust:
            return None
        if not meta.deriver.endswith(".drv"):
            raise InvalidPath(f"the deriver of {meta.path}, {meta.deriver!r}, is not a .drv")
        self.store.parse(meta.deriver)
        return meta.deriver

    def _restore(self, src: StreamReader, meta: Meta, deriver: str | None) -> None:
        st = os.statvfs(self.store.store_dir)
        free = st.f_bavail * st.f_frsize
        if meta.nar_size > free:
            raise StoreError(
                f"{meta.path} declares an archive of {meta.nar_size} bytes; the store's "
                f"file system has {free} bytes free"
            )
        entry = self.store.tmp.new_entry()
        self.new.append(
            NewPath(
                entry, meta.path, meta.nar_hash, meta.nar_size, meta.references, meta.ca, deriver
            )
        )
        hasher = blake3.blake3()
        scanner = self._scanner(meta)

        def observe(chunk: bytes) -> None:
            hasher.update(chunk)
            if scanner is not None:
                scanner.feed(chunk)

        try:
            size = nar.restore(src.bounded(meta.nar_size), entry, observe=observe)
        except nar.NarError as e:
            raise nar.NarError(f"the archive of {meta.path}: {e}") from None
        _check_hash(meta, format_hash(hasher.digest()), size)
        if scanner is not None:
            self._check_scanned(meta, scanner.result())

    def _scanner(self, meta: Meta) -> ReferenceScanner | None:
        """For a fixed output, a scan of its archive for the paths it could refer to: as a
        build's scan looks among the build's inputs, this one looks among the paths the
        stream has named so far (an honest stream is a closure, references first)."""
        if not (meta.ca or "").startswith("fixed:"):
            return None
        self._look_for([meta.path, *meta.references])
        scanner = ReferenceScanner(())
        # Shared, not copied: a copy per fixed output would make a stream of many of them
        # quadratic.  Nothing is added to it while this archive is read.
        scanner.wanted = self.wanted
        return scanner

    def _look_for(self, paths: list[str]) -> None:
        for p in paths:
            part = self.store.parse(p).hash_part
            if part not in self.by_part:
                self.by_part[part] = p
                self.wanted.add(part.encode())

    def _check_scanned(self, meta: Meta, found: set[str]) -> None:
        held = {self.by_part[h] for h in found}
        declared = set(meta.references)
        if held != declared:
            what = (
                f"declares {min(declared - held)}, which its contents do not hold"
                if declared - held
                else f"holds {min(held - declared)}, which it does not declare"
            )
            raise InvalidReference(
                f"{meta.path} is a fixed output, whose name covers only its contents, so its "
                f"references must be what a scan of its contents finds: it {what}"
            )

    def _check_closure(self, roots: list[str]) -> None:
        """Every root is in the stream, and every path of it in the roots' closure."""
        for r in roots:
            if r not in self.seen:
                raise StreamError(f"the root {r} is not in the stream")
        reached = set(roots)
        todo = list(roots)
        while todo:
            for r in self.seen[todo.pop()].references:
                if r in self.seen and r not in reached:
                    reached.add(r)
                    todo.append(r)
        stray = [p for p in self.seen if p not in reached]
        if stray:
            raise StreamError(f"{stray[0]} is in the stream but in the closure of no root")

    def _drv_outputs(self) -> list[tuple[str, str, str]]:
        """(derivation, output name, path) of each new path whose deriver is here: the
        record the collector's keep-outputs and keep-derivations read."""
        entries = {n.path: n.entry for n in self.new}
        derivations: dict[str, Derivation | None] = {}
        rows = []
        for n in self.new:
            if n.deriver is None:
                continue
            if n.deriver not in derivations:
                derivations[n.deriver] = self._derivation(n.deriver, entries)
            drv = derivations[n.deriver]
            if drv is not None:
                rows += [(n.deriver, k, n.path) for k, o in drv.outputs.items() if o.path == n.path]
        return rows

    def _derivation(self, path: str, entries: dict[str, Path]) -> Derivation | None:
        where = entries.get(path) or (Path(path) if self.store.is_valid(path) else None)
        if where is None:
            return None
        try:
            return Derivation.from_json(read_drv_file(where))
        except (DerivationError, OSError, UnicodeDecodeError):
            return None


def _meta(doc: dict[str, Any]) -> Meta:
    path, nar_hash, size = doc.get("path"), doc.get("nar_hash"), doc.get("nar_size")
    refs, deriver, ca = doc.get("references"), doc.get("deriver"), doc.get("ca")
    if not isinstance(path, str):
        raise StreamError("a path's metadata has no 'path'")
    if not isinstance(nar_hash, str) or not _is_hash(nar_hash):
        raise StreamError(f"{path}: 'nar_hash' must be blake3:<64 hex digits>")
    if type(size) is not int or not 0 < size < _MAX_NAR_SIZE:
        raise StreamError(f"{path}: 'nar_size' must be a whole number of bytes below 2^63")
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise StreamError(f"{path}: 'references' must be a list of store paths")
    if deriver is not None and not isinstance(deriver, str):
        raise StreamError(f"{path}: 'deriver' must be a store path or null")
    if ca is not None and not isinstance(ca, str):
        raise StreamError(f"{path}: 'ca' must be a content address or null")
    return Meta(path, nar_hash, size, tuple(sorted(set(refs))), deriver, ca)


def _is_hash(text: str) -> bool:
    digits = text.removeprefix(_HASH_PREFIX)
    return len(text) == len(_HASH_PREFIX) + 64 and len(digits) == 64 and set(digits) <= _HEX


def _check_address(meta: Meta, parsed: StorePath, store_dir: str, trust: bool) -> None:
    """The path must be the one its declared contents give (where contents give one)."""
    kind, _, rest = (meta.ca or "").partition(":")
    if kind in ("source", "text"):
        content_hash, fp_hash, refs = rest, rest, meta.references
    elif kind == "fixed" and rest.startswith("out:"):
        content_hash, fp_hash, refs = rest[4:], meta.ca, ()
    elif meta.ca is None:
        if not trust:
            raise PermissionError(
                f"{meta.path} is addressed by its derivation, so its contents cannot be "
                "checked against its name: only trusted users (trusted-users in weft.toml) "
                "may import it"
            )
        return
    else:
        raise StreamError(f"{meta.path}: unknown content address {meta.ca!r}")
    if content_hash != meta.nar_hash:
        raise HashMismatch(
            f"{meta.path}: its content address {meta.ca} is not its archive hash {meta.nar_hash}"
        )
    path_kind = PathKind.OUTPUT if kind == "fixed" else PathKind(kind)
    want = str(make_store_path(path_kind, fp_hash, store_dir, parsed.name, refs))
    if want != meta.path:
        raise HashMismatch(
            f"{meta.path} does not match its contents: a {kind} path with this archive, "
            f"name and references is {want}"
        )


def _check_hash(meta: Meta, got: str, size: int) -> None:
    if got != meta.nar_hash or size != meta.nar_size:
        raise HashMismatch(
            f"the archive of {meta.path} has hash {got} ({size} bytes); the stream "
            f"declared {meta.nar_hash} ({meta.nar_size} bytes)"
        )


def _skip(src: StreamReader, meta: Meta) -> None:
    """The archive of a path valid here already: read and checked, not written."""
    read = src.bounded(meta.nar_size)
    hasher = blake3.blake3()
    size = 0
    while chunk := read(READ_SIZE):
        hasher.update(chunk)
        size += len(chunk)
    if size != meta.nar_size:
        raise StreamError(f"stream truncated at byte {src.offset}, in the archive of {meta.path}")
    _check_hash(meta, format_hash(hasher.digest()), size)

"""Export streams written by hand from the format as `docs/export.md` describes it, not by
`store/export.py`: the tests of the reader check the documented format, and hostile
variants are easy to make."""

import json
import os

import blake3

from store import nar
from store.hashing import format_hash
from store.paths import PathKind, make_store_path


class Entry:
    """One path of a stream: its metadata document and its archive."""

    def __init__(self, meta: dict, archive: bytes) -> None:
        self.meta = meta
        self.archive = archive

    @property
    def path(self) -> str:
        return self.meta["path"]


def archive_of_file(data: bytes) -> bytes:
    """The archive of one regular file holding `data`."""
    return nar.HEADER + nar.file_header(False, len(data)) + data + nar.file_trailer(len(data))


def _hash(archive: bytes) -> str:
    return format_hash(blake3.blake3(archive).digest())


def source(store_dir: str, name: str, data: bytes, refs: list[str] | None = None) -> Entry:
    """A source path holding one file, addressed by its contents as `store-add` adds it."""
    archive = archive_of_file(data)
    h = _hash(archive)
    refs = sorted(refs or [])
    path = str(make_store_path(PathKind.SOURCE, h, store_dir, name, refs))
    meta = {"path": path, "nar_hash": h, "nar_size": len(archive), "references": refs}
    return Entry({**meta, "deriver": None, "ca": f"source:{h}"}, archive)


def fixed(store_dir: str, name: str, data: bytes, refs: list[str] | None = None) -> Entry:
    """A fixed output (a fetch's) holding one file: its name covers its contents' hash and
    its name, not the references it declares."""
    archive = archive_of_file(data)
    h = _hash(archive)
    path = str(make_store_path(PathKind.OUTPUT, f"fixed:out:{h}", store_dir, name))
    meta = {"path": path, "nar_hash": h, "nar_size": len(archive)}
    return Entry(
        {**meta, "references": sorted(refs or []), "deriver": None, "ca": f"fixed:out:{h}"}, archive
    )


def output(store_dir: str, name: str, data: bytes) -> Entry:
    """A path addressed by a derivation (here, a made-up one): its name says nothing of
    its contents."""
    archive = archive_of_file(data)
    made_up = format_hash(os.urandom(32))
    path = str(make_store_path(PathKind.OUTPUT, made_up, store_dir, name))
    meta = {"path": path, "nar_hash": _hash(archive), "nar_size": len(archive)}
    return Entry({**meta, "references": [], "deriver": None, "ca": None}, archive)


def _field(doc: object) -> bytes:
    return nar.encode_str(json.dumps(doc).encode())


def stream(
    store_dir: str, entries: list[Entry], roots: list[str] | None = None, count: int | None = None
) -> bytes:
    """Header (magic, version 1, store dir and roots), each path's tag, metadata and
    archive, trailer with the count; the roots default to the last path."""
    roots = [entries[-1].path] if roots is None else roots
    out = nar.encode_str(b"weft-export") + (1).to_bytes(8, "little")
    out += _field({"store_dir": store_dir, "roots": roots})
    for e in entries:
        out += nar.encode_str(b"path") + _field(e.meta) + e.archive
    n = len(entries) if count is None else count
    return out + nar.encode_str(b"end") + _field({"count": n})

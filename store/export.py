"""Closures between stores: the export stream (`docs/export.md`) and writing it.

One self-describing stream carries a closure to another store: a header (magic, version,
the store dir, the paths asked for), then every path of the closure references first, each
as its metadata (path, references, deriver, content address, archive hash and size) and its
archive, then a trailer with the count.  Every field is framed as the archive format frames
its strings (`store/nar.py`), so the whole stream is parsed with one rule, and each archive
is preceded by its exact size: a reader never has to trust an archive to say where it ends.

Reading a stream back and adding what it holds is `store/importer.py`.
"""

import json
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass

import blake3

from store import nar
from store.closureinfo import closure_infos
from store.errors import HashMismatch
from store.hashing import format_hash
from store.records import PathInfo
from store.store import Store

MAGIC = b"weft-export"
VERSION = 1
TAG_PATH = b"path"
TAG_END = b"end"
# A header, a path's metadata or the trailer: a path with 4,000 references of 250 bytes
# fits with room to spare, and a reader holds no more than this of a field it cannot yet
# trust in memory.
MAX_FIELD = 1 << 20
# Pieces of the stream are gathered up to this size before they are handed on: a closure
# of many small paths then crosses to the daemon's event loop once per batch, not per path.
BATCH = 256 << 10


class StreamError(nar.NarError):
    """An export stream that is malformed, truncated or hostile."""


def u64(n: int) -> bytes:
    return n.to_bytes(8, "little")


def field(doc: object) -> bytes:
    """A JSON document as one framed string of the stream."""
    return nar.encode_str(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())


def header(store_dir: str, roots: list[str]) -> bytes:
    return nar.encode_str(MAGIC) + u64(VERSION) + field({"store_dir": store_dir, "roots": roots})


def path_header(info: PathInfo) -> bytes:
    meta = {
        "path": info.path,
        "nar_hash": info.nar_hash,
        "nar_size": info.nar_size,
        "references": sorted(info.references),
        "deriver": info.deriver,
        "ca": info.ca,
    }
    return nar.encode_str(TAG_PATH) + field(meta)


def trailer(count: int) -> bytes:
    return nar.encode_str(TAG_END) + field({"count": count})


@dataclass(slots=True)
class Export:
    paths: list[str]  # the closure, in the order the stream holds it
    chunks: Iterator[bytes]


def export_stream(store: Store, roots: Iterable[str], pin: Hashable) -> Export:
    """The stream of the closure of `roots`, in pieces of bounded size.

    The roots are pinned for `pin` before the closure is read, which keeps all of it alive
    while it is written (the collector keeps the closure of a pin).  The closure is read
    now, so a path that is not valid is refused before anything is written; an archive
    whose hash is not the registered one (a corrupt path) ends the stream early, without
    its trailer, so no reader can take what came before as complete.
    """
    wanted = sorted(set(roots))
    store.pins.pin(pin, wanted)
    infos = closure_infos(store.db, store.store_dir, wanted)
    return Export([i.path for i in infos], _batched(_pieces(store.store_dir, wanted, infos)))


def _pieces(store_dir: str, roots: list[str], infos: list[PathInfo]) -> Iterator[bytes]:
    yield header(store_dir, roots)
    for info in infos:
        yield path_header(info)
        hasher = blake3.blake3()
        size = 0
        for chunk in nar.dump(info.path):
            hasher.update(chunk)
            size += len(chunk)
            yield chunk
        got = format_hash(hasher.digest())
        if got != info.nar_hash or size != info.nar_size:
            raise HashMismatch(
                f"{info.path} is corrupt in this store: registered {info.nar_hash} "
                f"({info.nar_size} bytes), found {got} ({size} bytes); "
                "run store-verify --repair"
            )
    yield trailer(len(infos))


def _batched(pieces: Iterator[bytes]) -> Iterator[bytes]:
    batch = bytearray()
    for piece in pieces:
        if len(batch) + len(piece) > BATCH and batch:
            yield bytes(batch)
            batch.clear()
        if len(piece) >= BATCH:
            yield piece
        else:
            batch += piece
    if batch:
        yield bytes(batch)

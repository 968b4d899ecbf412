"""Content hashes: BLAKE3 of a path's archive, written `blake3:<hex>`."""

import os
from collections.abc import Iterable

import blake3

from store import nar
from store.paths import PathKind, make_store_path

ALGORITHM = "blake3"
# BLAKE3's default output, 32 bytes, in hex.
DIGEST_HEX_LEN = 64


def format_hash(digest: bytes) -> str:
    return f"{ALGORITHM}:{digest.hex()}"


def hash_path(path: str | os.PathLike[str]) -> tuple[str, int]:
    """The content hash and archive size of whatever is at `path` now."""
    hasher = blake3.blake3()
    size = 0
    for chunk in nar.dump(path):
        hasher.update(chunk)
        size += len(chunk)
    return format_hash(hasher.digest()), size


def hash_text(data: bytes) -> tuple[str, int]:
    """The content hash and archive size of a regular, non-executable file holding `data`:
    what a text path (`Store.add_text`) holds, hashed without building its archive."""
    head = nar.HEADER + nar.file_header(False, len(data))
    tail = nar.file_trailer(len(data))
    hasher = blake3.blake3(head)
    hasher.update(data)
    hasher.update(tail)
    return format_hash(hasher.digest()), len(head) + len(data) + len(tail)


def text_path(store_dir: str, name: str, data: bytes, references: Iterable[str]) -> str:
    """The store path `Store.add_text` gives `data` named `name` with `references`: known
    without the store, so that a recipe's `.drv` paths are computed where it runs."""
    nar_hash, _ = hash_text(data)
    return str(make_store_path(PathKind.TEXT, nar_hash, store_dir, name, references))

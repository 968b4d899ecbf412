"""Content hashes: BLAKE3 of a path's archive, written `blake3:<hex>`."""

import os
import threading
from collections.abc import Iterable

import blake3

from store import nar
from store.paths import PathKind, store_path

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


# What a text's archive holds around its bytes: the framing before them but for their
# length, and after them by their length modulo 8 (the padding).  Built once: the daemon
# hashes each `.drv` an evaluation sends again (`add-texts`), a recipe each it makes.
_TEXT_HEAD = nar.HEADER + nar.file_header(False, 0)[:-8]
_TEXT_TAILS = tuple(nar.file_trailer(n) for n in range(8))


def hash_text(data: bytes) -> tuple[str, int]:
    """The content hash and archive size of a regular, non-executable file holding `data`:
    what a text path (`Store.add_text`) holds, hashed without building its archive."""
    size = len(data)
    # One call of the binding, which costs more than copying a text: each `update` costs
    # about what hashing a `.drv` does.
    archive = b"".join([_TEXT_HEAD, size.to_bytes(8, "little"), data, _TEXT_TAILS[size % 8]])
    return format_hash(blake3.blake3(archive).digest()), len(archive)


def text_path(store_dir: str, name: str, data: bytes, references: Iterable[str]) -> str:
    """The store path `Store.add_text` gives `data` named `name` with `references`: known
    without the store, so that a recipe's `.drv` paths are computed where it runs."""
    nar_hash, _ = hash_text(data)
    return store_path(PathKind.TEXT, nar_hash, store_dir, name, references)


# Bytes of texts `TextPaths` keeps: the `.drv`s of a few large recipes (one of 2,000
# derivations sends a few MiB), a small part of the daemon's memory.
TEXT_PATHS_BYTES = 16 << 20


class TextPaths:
    """`text_path` in one store (each `Store` keeps its own: `Store.text_path`), remembered
    for the texts seen before: every evaluation of a recipe sends the daemon the same
    `.drv`s (`add-texts`), and computing a path (the text's hash, its fingerprint's) costs
    ten times looking it up.  The oldest forgotten first past TEXT_PATHS_BYTES of texts
    kept; safe across threads."""

    def __init__(self, store_dir: str, max_bytes: int = TEXT_PATHS_BYTES) -> None:
        self.store_dir = store_dir
        self._max_bytes = max_bytes
        self._paths: dict[tuple[str, str, tuple[str, ...]], str] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def path(self, name: str, text: str, references: Iterable[str]) -> str:
        key = (name, text, tuple(references))
        with self._lock:
            known = self._paths.get(key)
        if known is not None:
            return known
        path = text_path(self.store_dir, name, text.encode(), key[2])
        if _size(key) > self._max_bytes:
            return path
        with self._lock:
            if key not in self._paths:
                self._paths[key] = path
                self._bytes += _size(key)
            while self._bytes > self._max_bytes:
                # The oldest first: dicts keep their insertion order.
                oldest = next(iter(self._paths))
                del self._paths[oldest]
                self._bytes -= _size(oldest)
        return path


def _size(key: tuple[str, str, tuple[str, ...]]) -> int:
    name, text, references = key
    return len(name) + len(text) + sum(map(len, references))

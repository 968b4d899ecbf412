"""Content hashes: BLAKE3 of a path's archive, written `blake3:<hex>`."""

import os

import blake3

from store import nar

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

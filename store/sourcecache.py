"""Remembers which store path a source tree on disk was added as, so re-adding it is cheap.

Builds add the same source directories again and again.  Hashing them again means
reading every byte; instead a signature of the tree's metadata (every entry's name, type,
mode, inode, size, mtime and ctime) is compared with the one taken when it was last
added.  ctime cannot be set by users, and changes with any write or chmod, so an equal
signature means equal content, except for a change made within the same clock tick as
the signature was taken: as git does with "racily clean" entries, a tree with any
timestamp newer than a few seconds is not cached at all.
"""

import os
import stat
import time

import blake3

from store.lru import Lru

RACY_SECONDS = 2.0
MAX_ENTRIES = 1024
# A tree this large is signed by walking it, which is cheap next to copying it, but
# bounded so a huge tree does not keep a worker busy twice.
MAX_FILES = 100_000

Key = tuple[bytes, str, tuple[str, ...]]


class _TooLarge(Exception):
    pass


def signature(path: str | os.PathLike[str]) -> bytes | None:
    """A digest of the tree's metadata, or None if it is too fresh or too large to trust."""
    hasher = blake3.blake3()
    horizon = (time.time() - RACY_SECONDS) * 1e9
    count = 0

    def visit(p: bytes, st: os.stat_result) -> None:
        nonlocal count
        count += 1
        if count > MAX_FILES or max(st.st_mtime_ns, st.st_ctime_ns) > horizon:
            raise _TooLarge
        hasher.update(
            b"%s\0%d %d %d %d %d %d %d\n"
            % (
                p,
                st.st_mode,
                st.st_dev,
                st.st_ino,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                st.st_nlink,
            )
        )
        if stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(p)):
                child = p + b"/" + name
                visit(child, os.lstat(child))

    root = os.fsencode(os.path.abspath(path))
    try:
        visit(root, os.lstat(root))
    except _TooLarge:
        return None
    return hasher.digest()


class SourceCache:
    """A bounded LRU map from (source, name, references, signature) to a store path."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._map = Lru[tuple[Key, bytes], str](max_entries)

    def get(self, key: Key, sig: bytes) -> str | None:
        return self._map.get((key, sig))

    def put(self, key: Key, sig: bytes, path: str) -> None:
        self._map.put((key, sig), path)

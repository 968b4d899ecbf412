"""Find which of a known set of store paths a build output refers to.

A reference is a store path's 32-character hash part appearing anywhere in the output's
archive (file contents, names, symlink targets), as in Nix.  Only a candidate set is
looked for: the build's input closure and its own outputs.

The scan runs at the speed of two C loops over each chunk: `bytes.translate` maps every
character of the base-32 alphabet to one marker byte and every other byte to another,
then `bytes.find` looks for a run of 32 markers.  Only inside such runs (rare in binary
data) are windows compared against the candidates.  The last 31 bytes of each chunk are
checked with the start of the next, so a hash split across chunks is still found.

Data made mostly of the alphabet's characters (long runs without e, o, t, u or any
capital) is the slow case: every window of a run is looked up.  Real outputs rarely
have such runs except where they hold store paths.
"""

import os
from collections.abc import Iterable

from store import base32, nar
from store.paths import HASH_PART_LEN

_MARK = b"\x01"
_TABLE = bytes(1 if chr(b) in base32.ALPHABET else 0 for b in range(256))
_RUN = _MARK * HASH_PART_LEN


class ReferenceScanner:
    def __init__(self, hash_parts: Iterable[str]) -> None:
        self.wanted = {h.encode() for h in hash_parts}
        self.found: set[bytes] = set()
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        if len(self.found) == len(self.wanted):
            return
        if self._tail:
            # Only the windows that cross from the previous chunk into this one.
            self._scan(self._tail + chunk[: HASH_PART_LEN - 1])
        self._scan(chunk)
        self._tail = (self._tail + chunk)[-(HASH_PART_LEN - 1) :]

    def _scan(self, data: bytes) -> None:
        marks = data.translate(_TABLE)
        start = marks.find(_RUN)
        while start != -1:
            end = start + HASH_PART_LEN
            while end < len(marks) and marks[end] == 1:
                end += 1
            for i in range(start, end - HASH_PART_LEN + 1):
                window = data[i : i + HASH_PART_LEN]
                if window in self.wanted:
                    self.found.add(window)
            start = marks.find(_RUN, end)

    def result(self) -> set[str]:
        return {h.decode() for h in self.found}


def scan_path(path: str | os.PathLike[str], hash_parts: Iterable[str]) -> set[str]:
    """The hash parts in `hash_parts` that occur in the archive of `path`."""
    scanner = ReferenceScanner(hash_parts)
    for chunk in nar.dump(path):
        scanner.feed(chunk)
    return scanner.result()

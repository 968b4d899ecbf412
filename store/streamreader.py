"""Reading an export stream's framing from a `read(n)` source, trusting nothing.

Each read is exact or fails with a `StreamError` naming the byte offset and what was being
read; an archive is read through `bounded`, which never serves a byte past the size the
metadata declared, so a hostile archive cannot read into the next path.
"""

import json
from collections.abc import Callable
from typing import Any

from store.export import StreamError

# What one call asks the source for: a data frame's worth (`MAX_CHUNK` of the protocol).
READ_SIZE = 1 << 20
# Tags are "path" and "end"; anything longer is not a tag of this format.
MAX_TAG = 16


class StreamReader:
    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self._buf = b""
        self._pos = 0
        self.offset = 0

    def _take(self, n: int) -> bytes:
        """Up to `n` bytes, from what is buffered first; b"" at the end of the source."""
        if self._pos == len(self._buf):
            self._buf, self._pos = self._read(max(n, READ_SIZE)), 0
        out = self._buf[self._pos : self._pos + n]
        self._pos += len(out)
        self.offset += len(out)
        return out

    def exact(self, n: int, what: str) -> bytes:
        parts = []
        need = n
        while need:
            data = self._take(need)
            if not data:
                raise StreamError(
                    f"stream truncated at byte {self.offset}: {need} more bytes of {what} expected"
                )
            parts.append(data)
            need -= len(data)
        return b"".join(parts)

    def string(self, limit: int, what: str) -> bytes:
        n = int.from_bytes(self.exact(8, what), "little")
        if n > limit:
            raise StreamError(
                f"{what} at byte {self.offset} is {n} bytes, over the {limit} allowed"
            )
        data = self.exact(n, what)
        if n % 8 and self.exact(8 - n % 8, what).strip(b"\0"):
            raise StreamError(f"non-zero padding after {what} at byte {self.offset}")
        return data

    def tag(self) -> bytes:
        return self.string(MAX_TAG, "a tag")

    def document(self, limit: int, what: str) -> dict[str, Any]:
        raw = self.string(limit, what)
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            raise StreamError(f"{what} ending at byte {self.offset} is not JSON") from None
        if not isinstance(doc, dict):
            raise StreamError(f"{what} ending at byte {self.offset} is not a JSON object")
        return doc

    def bounded(self, size: int) -> Callable[[int], bytes]:
        """A `read(n)` over the next `size` bytes only: b"" once they are read."""
        left = size

        def read(n: int) -> bytes:
            nonlocal left
            data = self._take(min(n, left)) if left else b""
            left -= len(data)
            return data

        return read

    def at_eof(self) -> bool:
        return not self._take(1)

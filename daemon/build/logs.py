"""Build logs: the log of a running build as it comes (its last lines for the error of a
failed one), and every finished build's log stored compressed in `var/log/<drv>.gz`,
for `store-log`."""

import gzip
import os
import zlib
from collections import deque
from pathlib import Path

# The lines of a failed build's log its error shows: Nix's `log-lines` default.
LOG_TAIL = 25
# zlib's default level, which gzip uses too: the log is stored off the path of any build.
LOG_COMPRESSION = 6


class LogTail:
    """The build log so far (for the log file) and its last lines (for the error)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self._partial = b""
        self.lines: deque[str] = deque(maxlen=LOG_TAIL)

    def add(self, chunk: bytes) -> list[str]:
        """Take a chunk the builder wrote; returns the lines it completed."""
        self.chunks.append(chunk)
        self.size += len(chunk)
        *complete, self._partial = (self._partial + chunk).split(b"\n")
        lines = [line.decode(errors="replace") for line in complete]
        self.lines.extend(lines)
        return lines

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def tail(self) -> str:
        """The end of the log, for a failed build's error ("" if it wrote nothing)."""
        lines = list(self.lines) + (
            [self._partial.decode(errors="replace")] if self._partial else []
        )
        if not lines:
            return ""
        return f"; last {len(lines[-LOG_TAIL:])} log lines:\n" + "\n".join(
            f"  {line}" for line in lines[-LOG_TAIL:]
        )


class BuildLogs:
    """The stored logs, one file per derivation (the last build's)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir

    def _path(self, drv_path: str) -> Path:
        return self.log_dir / f"{os.path.basename(drv_path)}.gz"

    def store(self, drv_path: str, data: bytes) -> None:
        """Replace the derivation's log with `data`, atomically (in a worker thread)."""
        path = self._path(drv_path)
        tmp = path.with_suffix(".gz.tmp")
        # Compressed in one call, gzip header and all (wbits 31): a GzipFile costs more
        # than the compression of most logs.
        view = memoryview(zlib.compress(data, LOG_COMPRESSION, 31))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def read(self, drv_path: str) -> bytes:
        """The derivation's stored log; FileNotFoundError if it has none."""
        with gzip.open(self._path(drv_path), "rb") as f:
            return f.read()

"""Build logs: the pipe a builder writes its log to (and the one a session runner reports
on: `ReportPipe`), the log of a running build as it comes (its last lines for the error
of a failed one, and what `store-log` of a running build reads, or follows), and every
finished build's log stored compressed in `var/log/<drv>.gz`, for `store-log`.

The pipe's ends each have one owner that closes them once (`LogPipe`): a number closed
twice may by then be another task's or thread's descriptor, and closing it breaks that
one (a daemon once died of EBADF that way when a client went away mid-build).

A follower of a running build (`LogTail.stream`) holds a position in the build's log,
not a copy: the log is kept whole until it is stored anyway, so a follower costs the
daemon nothing while the build runs, however slowly it reads; the data goes out through
the connection's flow control (credit).  Once the build is over, a follower behind keeps
that one log alive until it has read it, or until the connection fails it for granting
no credit (`daemon/rpc/context.py`'s `STREAM_IDLE`): at most one log, of at most the
build's `max-log-size`, per follower.

The lines of a running build are reported as they come, each cut to `LOG_LINE_CAP`: a
builder may write megabytes with no newline, and what reaches a client, or a failed
build's error, is the line's start and how much more there was.  The stored log keeps it
all.
"""

import gzip
import os
import stat
import threading
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType

import trio

# The one file every empty log is a link to (`BuildLogs`); no derivation's log has this
# name, which is no store path's.
EMPTY_LOG = ".empty.gz"
# More than an empty log compresses to (20 bytes), so a longer file is seen as one.
EMPTY_LOG_MAX = 64
# The lines of a failed build's log its error shows: Nix's `log-lines` default.
LOG_TAIL = 25
# The bytes of one log line reported (to waiting clients, and in a failed build's error);
# the rest of a longer line is counted, not kept: the stored log has it all.  Far above a
# line anyone reads (a compiler's diagnostic is well under 1 KiB), and far below the
# protocol's 4 MiB frame, so an error's 25 lines stay about 100 KiB however a builder
# writes; a line with no end is not copied again on every read.
LOG_LINE_CAP = 4 << 10
# zlib's default level, which gzip uses too: the log is stored off the path of any build.
LOG_COMPRESSION = 6


class LogPipe:
    """A build's log pipe.  The read end is `reader`'s, which closes it once however often
    it is closed; the write end is this pipe's until `close_write_end` (once the spawner
    has its copy: the builder's end-of-file then comes when the builder's side closes).
    Leaving the `with` closes whatever is still open."""

    def __init__(self) -> None:
        read_end, write_end = os.pipe()
        try:
            # The read end is the stream's from here, even if making it fails: its
            # finalizer closes it then.
            self.reader = trio.lowlevel.FdStream(read_end)
        except BaseException:
            os.close(write_end)
            raise
        self._write_end: int | None = write_end

    @property
    def write_end(self) -> int:
        if self._write_end is None:
            raise ValueError("the log pipe's write end is closed")
        return self._write_end

    def close_write_end(self) -> None:
        fd, self._write_end = self._write_end, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> "LogPipe":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close_write_end()
        self.reader.close()


class ReportPipe:
    """The pipe the session runner of a build with environments reports on
    (`daemon/build/session.py`): the write end goes to the spawner with the log pipe's
    (`close_write_end` once it has its copy), the read end is read once the runner has
    exited, never waited on: the report, a line, is there by then or never comes.
    Without `wanted` (a build without environments) there is no pipe at all.  Leaving the
    `with` closes whatever is still open."""

    # A report is one short line (spawner/runner.c); more is not a report.
    MAX_REPORT = 4096

    def __init__(self, wanted: bool = True) -> None:
        self._read_end: int | None = None
        self._write_end: int | None = None
        if wanted:
            self._read_end, self._write_end = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(self._read_end, False)

    @property
    def write_end(self) -> int | None:
        return self._write_end

    def close_write_end(self) -> None:
        fd, self._write_end = self._write_end, None
        if fd is not None:
            os.close(fd)

    def read(self) -> bytes:
        """What the runner wrote (b"" for nothing); the pipe is closed after."""
        fd, self._read_end = self._read_end, None
        if fd is None:
            return b""
        try:
            return os.read(fd, self.MAX_REPORT)
        except BlockingIOError:
            return b""
        finally:
            os.close(fd)

    def __enter__(self) -> "ReportPipe":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close_write_end()
        fd, self._read_end = self._read_end, None
        if fd is not None:
            os.close(fd)


class LogTail:
    """The build log so far (for the log file, and for `store-log` while it runs) and its
    last lines (for the error)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.ended = False  # the builder is gone: nothing more comes
        # The line being written: its first `LOG_LINE_CAP` bytes, and how many more came.
        self._partial = bytearray()
        self._dropped = 0
        self.lines: deque[str] = deque(maxlen=LOG_TAIL)
        self._grown = trio.Event()

    def add(self, chunk: bytes) -> list[str]:
        """Take a chunk the builder wrote; returns the lines it completed, each cut to
        `LOG_LINE_CAP`.  Each byte is looked at once, however long the line."""
        self.chunks.append(chunk)
        self.size += len(chunk)
        view = memoryview(chunk)
        lines: list[str] = []
        start = 0
        while (end := chunk.find(b"\n", start)) != -1:
            self._keep(view[start:end])
            lines.append(self._line())
            self._partial.clear()
            self._dropped = 0
            start = end + 1
        self._keep(view[start:])
        self.lines.extend(lines)
        self._wake()
        return lines

    def _keep(self, part: memoryview) -> None:
        """Add `part` to the line being written: what fits under the cap, the rest counted."""
        room = max(0, LOG_LINE_CAP - len(self._partial))
        self._partial += part[:room]
        self._dropped += max(0, len(part) - room)

    def _line(self) -> str:
        """The line being written, as reported: cut, if it was longer, with how much was."""
        line = self._partial.decode(errors="replace")
        return f"{line}[... {self._dropped} more bytes]" if self._dropped else line

    def end(self) -> None:
        """The builder is gone: followers end once they have what came."""
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        self._grown.set()
        self._grown = trio.Event()

    async def stream(self, send: Callable[[bytes], Awaitable[None]], follow: bool) -> int:
        """`send` the log so far and, if `follow`, what comes until the builder is gone;
        returns the bytes sent."""
        sent = taken = 0
        while True:
            grown = self._grown
            new = self.chunks[taken:]
            taken += len(new)
            for chunk in new:
                await send(chunk)
                sent += len(chunk)
            if not follow or (self.ended and taken == len(self.chunks)):
                return sent
            if taken == len(self.chunks):
                await grown.wait()

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def tail(self) -> str:
        """The end of the log, for a failed build's error ("" if it wrote nothing)."""
        unended = self._partial or self._dropped
        lines = list(self.lines) + ([self._line()] if unended else [])
        if not lines:
            return ""
        return f"; last {len(lines[-LOG_TAIL:])} log lines:\n" + "\n".join(
            f"  {line}" for line in lines[-LOG_TAIL:]
        )


class LiveLogs:
    """The logs of the builds running now, by derivation, from the builder's start until
    the log is stored: `store-log` finds a build's log in one place or the other."""

    def __init__(self) -> None:
        self._logs: dict[str, LogTail] = {}

    def add(self, drv_path: str, log: LogTail) -> None:
        self._logs[drv_path] = log

    def remove(self, drv_path: str, log: LogTail) -> None:
        # Only its own: a check of the same derivation may have come since.
        if self._logs.get(drv_path) is log:
            del self._logs[drv_path]

    def get(self, drv_path: str) -> LogTail | None:
        return self._logs.get(drv_path)


class BuildLogs:
    """The stored logs, one file per derivation (the last build's).

    Every empty log is one file, `EMPTY_LOG`, linked at each derivation's name: a build
    that writes nothing (most trivial ones) then costs the disk a link, not a new file
    (on a file system slow to allocate inodes, the most a trivial build's log costs).
    A log file is never written in place once stored, only replaced, so the links stay
    what they were."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._empty: Path | None = None  # once made or found

    def _path(self, drv_path: str) -> Path:
        return self.log_dir / f"{os.path.basename(drv_path)}.gz"

    def store(self, drv_path: str, data: bytes) -> None:
        """Replace the derivation's log with `data`, atomically (in a worker thread)."""
        path = self._path(drv_path)
        if not data:
            try:
                os.link(self._empty_log(), path)
                return
            except FileExistsError:
                pass  # an earlier build's log: replaced as any other
        _write_replacing(path, data)

    def _empty_log(self) -> Path:
        if self._empty is None:
            # Made once per daemon, or again if it is not what it must be.
            empty = self.log_dir / EMPTY_LOG
            if _read_plain(empty) != zlib.compress(b"", LOG_COMPRESSION, 31):
                # A name of this thread's own: a failed build's thread may make it too.
                _write_replacing(empty, b"", f"{EMPTY_LOG}.{threading.get_native_id()}.tmp")
            self._empty = empty
        return self._empty

    def store_many(self, logs: list[tuple[str, bytes]]) -> list[OSError | None]:
        """`store` for each (derivation, log): each one's error, if it could not be
        stored (in a worker thread, batched: `Workers.batched`)."""
        errors: list[OSError | None] = []
        for drv_path, data in logs:
            try:
                self.store(drv_path, data)
            except OSError as e:
                errors.append(e)
            else:
                errors.append(None)
        return errors

    def read(self, drv_path: str) -> bytes:
        """The derivation's stored log; FileNotFoundError if it has none."""
        with gzip.open(self._path(drv_path), "rb") as f:
            return f.read()


def _write_replacing(path: Path, data: bytes, tmp_name: str = "") -> None:
    """`path` holding `data` compressed, put in place of what was there in one step,
    written first at `tmp_name` (`<name>.tmp` if not given) beside it."""
    tmp = path.with_name(tmp_name or f"{path.name}.tmp")
    # Compressed in one call, gzip header and all (wbits 31): a GzipFile costs more than
    # the compression of most logs.
    view = memoryview(zlib.compress(data, LOG_COMPRESSION, 31))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_plain(path: Path) -> bytes | None:
    """A regular file's bytes (None: missing, or not a regular file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        return os.read(fd, EMPTY_LOG_MAX) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    finally:
        os.close(fd)

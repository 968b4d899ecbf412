"""What the daemon says about a build, for people: on a terminal one status line kept at
the bottom, elsewhere plain lines.

The status line is cut to the terminal's width, read again at each redraw (a window may
be resized mid-build): a line one column too long wraps, and each redraw, which returns
only to the start of the last row, then leaves a copy of it behind.  It shows the time
since the command started, the builds that hold a slot (the daemon's `started` frame is
sent once a build has one; one waiting for a slot or for another client is not running)
with their own times, and the last line the most recent of them wrote.
"""

import os
import time
from collections.abc import Callable

from daemon.wire.protocol import Log, LogKind

# What a status line may use when stderr's width cannot be read (not a terminal after
# all, or a terminal that reports none): the classic terminal's.
FALLBACK_COLUMNS = 80

# Of a builder's last line, what is kept for the status line: wider than any terminal, and
# a 1 MB line without a newline is not cleaned up again at every redraw.
MAX_KEPT_LINE = 1024

# Control characters in a builder's line would move the cursor or wrap the status line.
_CONTROLS = {c: " " for c in (*range(32), 127)}


def stderr_columns() -> int:
    try:
        return os.get_terminal_size(2).columns or FALLBACK_COLUMNS
    except OSError:
        return FALLBACK_COLUMNS


def duration(seconds: float) -> str:
    """`7s`, `2m05s`, `1h02m`: short enough to leave room for the rest of the line."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def plain(text: str) -> str:
    """A builder's line made safe for the status line: escape sequences (colours, cursor
    moves) dropped, other control characters shown as spaces."""
    if "\x1b" in text:
        first, *rest = text.split("\x1b")
        kept = [first]
        for part in rest:
            if part.startswith("["):
                # A CSI sequence ends at its first byte in @..~.
                end = next((i for i, c in enumerate(part[1:], 1) if "@" <= c <= "~"), len(part))
                kept.append(part[end + 1 :])
            else:
                # Other sequences: intermediate bytes in space../, then one final byte.
                end = next((i for i, c in enumerate(part) if not " " <= c <= "/"), len(part))
                kept.append(part[end + 1 :])
        text = "".join(kept)
    return text.translate(_CONTROLS)


def fit(text: str, columns: int) -> str:
    """`text` cut to at most `columns` cells of a terminal: a wide character takes two,
    a combining one none."""
    if text.isascii():
        return text[:columns]
    import unicodedata

    used = 0
    for i, c in enumerate(text):
        cells = (
            0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        )
        if used + cells > columns:
            return text[:i]
        used += cells
    return text


def _name(drv: str) -> str:
    # Imported only on a terminal: the store's derivation module costs a command ~40 ms,
    # which builds followed through a pipe (scripts, the bench) do not pay.
    from store.derivation import drv_name

    return drv_name(drv)


class Progress:
    """A build request's `log` frames shown as they come: the frames' `kind` tells a
    builder's line (shown in full with `-L`) and the builds that start and end (the
    status line's) from the rest.  What is shown is gathered and written when the client
    is about to wait (`flush`), once per batch of frames."""

    def __init__(
        self,
        show_logs: bool,
        terminal: bool,
        columns: Callable[[], int] = stderr_columns,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.show_logs = show_logs
        self.terminal = terminal
        self.columns = columns
        self.clock = clock
        self.began = clock()
        self.done = self.total = 0
        self.running: dict[str, float] = {}  # derivation path: when it got its slot
        self.last_line: dict[str, str] = {}  # derivation path: the last line it wrote
        self._talker = ""  # the build that wrote last
        self._status = False
        self._pending: list[str] = []

    def _write(self, text: str) -> None:
        self._pending.append(text)

    def flush(self) -> None:
        """Write what was gathered: called when the client is about to wait."""
        if self._pending:
            data = "".join(self._pending).encode()
            self._pending.clear()
            while data:
                data = data[os.write(2, data) :]

    def _line(self, text: str) -> None:
        if self._status:
            self._write("\r\x1b[K")
            self._status = False
        self._write(text + "\n")

    def update(self, event: Log) -> None:
        if event.kind == LogKind.LINE:
            drv = event.drv
            if drv is not None and drv in self.running:
                self.last_line[drv] = event.message.partition("> ")[2][:MAX_KEPT_LINE]
                self._talker = drv
            if self.show_logs:
                self._line(event.message)
        else:
            self._track(event)
            if not self.terminal:
                counted = event.done is not None
                self._line(
                    f"[{self.done}/{self.total}] {event.message}" if counted else event.message
                )
        if self.terminal:
            self._redraw()

    def _track(self, event: Log) -> None:
        if event.done is not None and event.total is not None:
            self.done, self.total = event.done, event.total
        drv = event.drv
        if drv is None:
            return
        if event.kind == LogKind.STARTED:
            self.running[drv] = self.clock()
            self.last_line.pop(drv, None)
        elif event.kind in (LogKind.BUILT, LogKind.FAILED, LogKind.RETRIED):
            # A retried build waits for its delay and a slot again, then starts anew.
            self.running.pop(drv, None)
            self.last_line.pop(drv, None)

    def tick(self) -> None:
        """The clock moved and nothing else did: the status line's times are redrawn."""
        if self.terminal:
            self._redraw()
            self.flush()

    def status(self) -> str:
        now = self.clock()
        names = ", ".join(
            f"{_name(d)} ({duration(now - since)})" for d, since in self.running.items()
        )
        text = f"{duration(now - self.began)} [{self.done}/{self.total} built] running: "
        text += names or "-"
        talker = self._talker
        if talker not in self.running and self.running:
            talker = next(reversed(self.running))
        if talker in self.running and self.last_line.get(talker):
            # Whose line it is, when more than one build could have written it.
            who = f"{_name(talker)}> " if len(self.running) > 1 else ""
            text += f" | {who}{plain(self.last_line[talker])}"
        # One column short of the width: some terminals wrap on writing the last one.
        return fit(text, max(self.columns() - 1, 1))

    def _redraw(self) -> None:
        self._write(f"\r\x1b[K{self.status()}")
        self._status = True

    def finish(self) -> None:
        if self._status:
            self._write("\r\x1b[K")
            self._status = False
        self.flush()

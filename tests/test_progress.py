"""store-build's status line: within the terminal's width, with the time and the last line
of a running build, counting only builds that hold a slot.  The unit tests give
`Progress` a terminal width and a clock; the last one runs a real build under a
pseudo-terminal."""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path

import pytest

from bench.daemons import DaemonProc
from daemon.cli.progress import Progress, fit, plain
from daemon.wire.protocol import Log, LogKind

A = "/store/" + "a" * 32 + "-alpha.drv"
B = "/store/" + "b" * 32 + "-bravo.drv"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def statuses(written: str) -> list[str]:
    """Each status line drawn: the text after each `\\r\\x1b[K`, up to the next control."""
    return [s.split("\n")[0] for s in written.split("\r\x1b[K")[1:] if s.split("\n")[0]]


def drawn(capfd: pytest.CaptureFixture[str], progress: Progress) -> list[str]:
    progress.flush()
    return statuses(capfd.readouterr().err)


def test_the_status_line_is_cut_to_the_terminal_width(capfd: pytest.CaptureFixture[str]) -> None:
    columns = [30]
    progress = Progress(False, True, columns=lambda: columns[0], clock=Clock())
    progress.update(Log(1, "2 derivations to build, 0 present", 0, 2, LogKind.NOTE))
    progress.update(Log(1, "building alpha", kind=LogKind.STARTED, drv=A))
    progress.update(Log(1, "building bravo", kind=LogKind.STARTED, drv=B))
    progress.update(Log(1, "alpha> " + "x" * 500, kind=LogKind.LINE, drv=A))
    columns[0] = 12  # the window was made narrower mid-build
    progress.update(Log(1, "alpha> \u4e2d\u6587" * 50, kind=LogKind.LINE, drv=A))
    lines = drawn(capfd, progress)
    assert len(lines) == 5
    # One column short of the width: a terminal may wrap on writing the last one.
    assert all(len(s) <= 29 for s in lines[:4]) and len(lines[3]) == 29
    assert lines[3].startswith("0s [0/2 built] running: alpha")
    # Wide characters take two cells each: 11 cells hold the start and no half of one.
    assert lines[4] == fit(lines[4], 11) and len(lines[4].encode("utf-16-le")) // 2 <= 11


def test_wide_and_combining_characters_take_their_cells() -> None:
    assert fit("\u4e2d\u6587\u4e2d", 5) == "\u4e2d\u6587"
    assert fit("e\u0301" * 4, 3) == "e\u0301" * 3
    assert fit("plain ascii", 5) == "plain"


def test_escape_sequences_and_controls_never_reach_the_terminal() -> None:
    assert plain("\x1b[1;31mred\x1b[0m and\ttab\rcr\x07") == "red and tab cr "
    assert plain("\x1b(Bcharset\x1b=") == "charset"
    assert "\x1b" not in plain("cut short \x1b[")


def test_the_status_line_shows_the_time_and_a_running_builds_last_line(
    capfd: pytest.CaptureFixture[str],
) -> None:
    clock = Clock()
    progress = Progress(False, True, columns=lambda: 200, clock=clock)
    progress.update(Log(1, "1 derivations to build, 0 present", 0, 1, LogKind.NOTE))
    clock.now += 3
    progress.update(Log(1, "building alpha", kind=LogKind.STARTED, drv=A))
    progress.update(Log(1, "alpha> \x1b[32mcompiling\x1b[0m main.c", kind=LogKind.LINE, drv=A))
    clock.now += 62
    progress.tick()  # the daemon was silent for a second: only the clock moved
    assert drawn(capfd, progress)[-1] == (
        "1m05s [0/1 built] running: alpha (1m02s) | compiling main.c"
    )
    progress.update(Log(1, "building bravo", kind=LogKind.STARTED, drv=B))
    progress.update(Log(1, "alpha> linking", kind=LogKind.LINE, drv=A))
    assert drawn(capfd, progress)[-1].endswith("bravo (0s) | alpha> linking")
    progress.update(Log(1, "built alpha", 1, 2, LogKind.BUILT, A))
    assert drawn(capfd, progress)[-1] == "1m05s [1/2 built] running: bravo (0s)"


def test_a_build_counts_as_running_only_once_it_holds_a_slot(
    capfd: pytest.CaptureFixture[str],
) -> None:
    progress = Progress(False, True, columns=lambda: 200, clock=Clock())
    waiting = "waiting for alpha, which another client is building"
    progress.update(Log(1, waiting, kind=LogKind.NOTE, drv=A))
    progress.update(Log(1, "bravo> a line before its start", kind=LogKind.LINE, drv=B))
    assert drawn(capfd, progress)[-1].endswith("running: -")
    progress.update(Log(1, "building bravo", kind=LogKind.STARTED, drv=B))
    assert drawn(capfd, progress)[-1].endswith("running: bravo (0s)")
    # A failed attempt waits for its delay, and then a slot, before it runs again.
    retry = "retrying bravo (attempt 2 of 3) in 1 s, at the same parallelism: exit code 1"
    progress.update(Log(1, retry, kind=LogKind.RETRIED, drv=B))
    assert drawn(capfd, progress)[-1].endswith("running: -")
    progress.update(Log(1, "building bravo", kind=LogKind.STARTED, drv=B))
    progress.update(Log(1, "bravo: not retried: exit code 1", kind=LogKind.FAILED, drv=B))
    assert drawn(capfd, progress)[-1].endswith("running: -")


def test_without_a_terminal_progress_is_plain_lines(capfd: pytest.CaptureFixture[str]) -> None:
    progress = Progress(False, False, columns=lambda: 10, clock=Clock())
    progress.update(Log(1, "1 derivations to build, 0 present", 0, 1, LogKind.NOTE))
    progress.update(Log(1, "building alpha", kind=LogKind.STARTED, drv=A))
    progress.update(Log(1, "alpha> not shown without -L", kind=LogKind.LINE, drv=A))
    progress.tick()
    progress.finish()
    err = capfd.readouterr().err
    assert err == "[0/1] 1 derivations to build, 0 present\nbuilding alpha\n"


RECIPE = """
from store.recipe import busybox, derivation

bb = busybox()
long_line = "the quick brown fox jumps over the lazy dog " * 8
default = derivation(
    "status-{tag}",
    f"{{bb}}/bin/busybox",
    ["sh", "-c", f"echo '{{long_line}}'; sleep 2.5; echo done > $out"],
    env={{"PATH": f"{{bb}}/bin"}},
)
"""


def _read_all(fd: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: every holder of the terminal's other end closed it
            return out
        if not chunk:
            return out
        out += chunk


def test_store_build_on_a_terminal_keeps_its_status_line_within_the_width(
    builder_daemon: DaemonProc, tmp_path: Path
) -> None:
    columns = 64
    recipe = tmp_path / "status.py"
    recipe.write_text(textwrap.dedent(RECIPE.format(tag=os.urandom(4).hex())))
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {**os.environ, "WEFT_STATE_DIR": str(builder_daemon.state)}
    started = time.monotonic()
    proc = subprocess.Popen(
        [Path(sys.executable).parent / "store-build", str(recipe)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    try:
        seen = _read_all(master).decode()
    finally:
        os.close(master)
    assert proc.wait(60) == 0, seen
    assert time.monotonic() - started >= 2.5
    pieces = [p.replace("\x1b[K", "") for p in re.split(r"[\r\n]+", seen)]
    assert pieces and max(len(p) for p in pieces) <= columns, pieces
    status = [p for p in pieces if "built] running:" in p]
    # The builder's line shows while it sleeps, and the clock moves on though nothing
    # else does (the daemon sends nothing for 2.5 s).
    assert any(") | the quick brown" in p for p in status), status
    assert {p.split()[0] for p in status} >= {"1s", "2s"}, status

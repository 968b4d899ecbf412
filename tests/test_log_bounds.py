"""Builder log lines of any length, through a real daemon: the daemon stays responsive while
a builder writes megabytes with no newline, an over-long line is reported cut short (the
stored log keeps every byte), and a failed build's error stays short.  And a build shared
by two requests that ends in an unexpected error is not taken for a success by the one
that waited for it."""

import os
import threading
import time
from collections.abc import Callable

from daemon.build.logs import LOG_LINE_CAP
from daemon.cli.blocking import BlockingClient, DaemonError
from tests.daemon_fixtures import Graph

MIB = 1 << 20
# A failed build's error: its last 25 lines, each cut to the cap, and a sentence.
SHORT_ERROR = 32 * (LOG_LINE_CAP + 100)


class Building:
    """A build running in a thread of its own, with its result (or error) once it is over;
    the log lines its client heard."""

    def __init__(self, graph: Graph, drv: object) -> None:
        self.results: list[dict] = []
        self.error: Exception | None = None
        self.lines: list[str] = []
        path = drv.path  # type: ignore[attr-defined]

        def run() -> None:
            on_log = lambda e: self.lines.append(e.message)  # noqa: E731
            try:
                with BlockingClient(graph.daemon.socket, on_log=on_log) as c:
                    self.results = c.call("build", drvs=[path])  # type: ignore[assignment]
            except (DaemonError, ConnectionError) as e:
                self.error = e

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def said(self, name: str) -> list[str]:
        """The lines the builder of `name` wrote, as the client heard them."""
        return [m.removeprefix(f"{name}> ") for m in self.lines if m.startswith(f"{name}> ")]

    def join(self, timeout: float = 120) -> list[dict]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the build did not end"
        return self.results


def _slowest_status_while(graph: Graph, running: Callable[[], bool]) -> float:
    """The slowest of the `status` queries asked, one after another, while `running()`."""
    slowest = 0.0
    with BlockingClient(graph.daemon.socket) as c:
        while running():
            asked = time.monotonic()
            c.call("status")
            slowest = max(slowest, time.monotonic() - asked)
            time.sleep(0.05)
    return slowest


def _stored_log(graph: Graph, path: str) -> bytes:
    data = bytearray()
    with BlockingClient(graph.daemon.socket) as c:
        c.download("log", data.extend, path=path)
    return bytes(data)


def test_a_builder_writing_20_mib_with_no_newline_fails_with_a_short_error_promptly(
    graph: Graph,
) -> None:
    size = 20 * MIB
    script = f"yes a | tr -d '\\n' | head -c {size}; exit 3"
    drv = graph.sh("no-newline", script)
    started = time.monotonic()
    building = Building(graph, drv)
    slowest = _slowest_status_while(graph, building.thread.is_alive)
    [result] = building.join()
    # Linear in the log: a copy of the whole line per 64 KiB read took tens of seconds.
    assert time.monotonic() - started < 20
    assert slowest < 2, slowest
    assert result["status"] == "failed"
    message = result["message"]
    assert "failed with exit code 3" in message
    assert f"[... {size - LOG_LINE_CAP} more bytes]" in message
    assert len(message) < SHORT_ERROR, len(message)
    assert _stored_log(graph, drv.path) == b"a" * size


def test_a_5_mib_line_is_reported_cut_short_and_the_build_succeeds(graph: Graph) -> None:
    size = 5 * MIB
    script = f"yes b | tr -d '\\n' | head -c {size}; echo; echo short line; echo > $out"
    drv = graph.sh("one-long-line", script)
    building = Building(graph, drv)
    slowest = _slowest_status_while(graph, building.thread.is_alive)
    [result] = building.join()
    assert building.error is None, building.error
    assert slowest < 2, slowest
    assert result["status"] == "built"
    cut = "b" * LOG_LINE_CAP + f"[... {size - LOG_LINE_CAP} more bytes]"
    said = building.said("one-long-line")
    assert said == [cut, "short line"]
    assert _stored_log(graph, drv.path) == b"b" * size + b"\nshort line\n"


def test_a_request_waiting_on_a_build_that_crashed_is_told_it_failed_not_built(
    graph: Graph,
) -> None:
    drv = graph.sh("crashes-after", "echo started; sleep 2; exit 1")
    # Its failed build's log cannot be stored (the file it is written to first is a
    # directory): an OSError, not a BuildError, comes out of the attempt.
    log_dir = graph.daemon.state / "var" / "log"
    os.mkdir(log_dir / f"{os.path.basename(drv.path)}.gz.tmp")
    first = Building(graph, drv)
    deadline = time.monotonic() + 30
    while "started" not in first.said("crashes-after"):
        assert time.monotonic() < deadline, "the build did not start"
        time.sleep(0.05)
    second = Building(graph, drv)
    second.join()
    first.join()
    assert first.error is not None  # the request whose build it ran: an internal error
    [result] = second.results
    assert result["status"] == "failed", result
    assert "failed unexpectedly" in result["message"]

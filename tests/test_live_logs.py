"""`log` of a build still running: what it wrote so far, or, with `follow`, all it writes
until it ends (`store-log -f`), through a real daemon; and followers that do not read cost
the daemon nothing."""

import socket
import threading
import time
from collections.abc import Callable

import pytest

from bench.daemons import rss_kib
from daemon.cli.blocking import BlockingClient, DaemonError
from daemon.wire import protocol as p
from tests.daemon_fixtures import Graph


def _wait_for(what: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _log(graph: Graph, path: str, **args: object) -> bytes:
    data = bytearray()
    with BlockingClient(graph.daemon.socket) as c:
        c.download("log", data.extend, path=path, **args)
    return bytes(data)


def _so_far(graph: Graph, path: str) -> bytes:
    """The log, or b"" while the build has not started."""
    try:
        return _log(graph, path)
    except DaemonError as e:
        assert e.code == "not-valid"
        return b""


class Building:
    """A build running in a thread of its own, with its result once it is over."""

    def __init__(self, graph: Graph, *drvs: object) -> None:
        self.results: list[dict] = []
        paths = [d.path for d in drvs]  # type: ignore[attr-defined]

        def run() -> None:
            with BlockingClient(graph.daemon.socket, on_log=lambda e: None) as c:
                self.results = c.call("build", drvs=paths)  # type: ignore[assignment]

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def join(self) -> list[dict]:
        self.thread.join(60)
        return self.results


def test_the_log_of_a_running_build_is_what_it_wrote_so_far(graph: Graph) -> None:
    slow = graph.sh("talks-slowly", "echo one; echo two; sleep 3; echo three > $out")
    building = Building(graph, slow)
    _wait_for(lambda: _so_far(graph, slow.path) == b"one\ntwo\n")
    # At once, not at the build's end.
    started = time.monotonic()
    assert _log(graph, slow.path) == b"one\ntwo\n"
    assert time.monotonic() - started < 1
    assert [r["status"] for r in building.join()] == ["built"]
    assert _log(graph, slow.path) == b"one\ntwo\n"


def test_following_a_running_build_streams_what_it_writes_until_it_ends(graph: Graph) -> None:
    script = "echo one; sleep 1; echo two; sleep 1; echo three; echo > $out"
    slow = graph.sh("talks-in-steps", script)
    building = Building(graph, slow)
    _wait_for(lambda: _so_far(graph, slow.path).startswith(b"one\n"))
    came: list[tuple[float, bytes]] = []
    with BlockingClient(graph.daemon.socket) as c:
        reply = c.download(
            "log", lambda b: came.append((time.monotonic(), b)), path=slow.path, follow=True
        )
    ended = time.monotonic()
    assert b"".join(b for _, b in came) == b"one\ntwo\nthree\n"
    assert reply == {"size": len(b"one\ntwo\nthree\n")}
    # "two" came while the build ran, a second before "three", which came at its end.
    at = {line: t for t, chunk in came for line in chunk.split()}
    assert at[b"three"] - at[b"two"] > 0.5
    assert ended - at[b"three"] < 1
    assert [r["status"] for r in building.join()] == ["built"]


def test_following_a_finished_build_gives_its_stored_log_and_ends(graph: Graph) -> None:
    done = graph.sh("done-already", "echo stored; echo > $out")
    assert [r["status"] for r in graph.build(done)] == ["built"]
    assert _log(graph, done.path, follow=True) == b"stored\n"


def test_a_log_neither_running_nor_stored_is_refused_and_says_so(graph: Graph) -> None:
    never = graph.sh("never-built", "echo > $out")
    with pytest.raises(DaemonError) as refused:
        _log(graph, never.path, follow=True)
    assert refused.value.code == "not-valid"
    assert never.path in str(refused.value) and "not building" in str(refused.value)


def _stalled_follower(sock_path: str, drv: str) -> socket.socket:
    """A client that asks to follow a log, grants no credit and reads nothing."""
    proto = p.Connection(p.Role.CLIENT)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    hello = proto.send(p.Hello(agent="stalled"))
    s.sendall(hello + proto.send(p.Request(1, "log", {"path": drv, "follow": True})))
    return s


MIB = 1 << 20


def test_followers_that_do_not_read_do_not_grow_the_daemon(graph: Graph) -> None:
    # 4 MiB of log, a pause while ten followers come, then 16 MiB more.
    line = "0123456789abcdef" * 4
    script = (
        f"yes {line} | head -c {4 * MIB}; sleep 1; yes {line} | head -c {16 * MIB}; "
        "sleep 2; echo > $out"
    )
    chatty = graph.sh("chatty-while-followed", script)
    building = Building(graph, chatty)
    _wait_for(lambda: len(_so_far(graph, chatty.path)) >= 4 * MIB)
    followers = [_stalled_follower(graph.daemon.socket, chatty.path) for _ in range(10)]
    try:
        time.sleep(0.2)
        before = rss_kib(graph.daemon.proc.pid)
        _wait_for(lambda: len(_log(graph, chatty.path)) >= 20 * MIB)
        grown = rss_kib(graph.daemon.proc.pid) - before
        # The daemon holds the log (16 MiB more) until it is stored, and copies of what
        # it sent the test's own reads; a copy per follower would be 160 MiB more.
        assert grown < 48 * 1024, grown
        assert [r["status"] for r in building.join()] == ["built"]
    finally:
        for f in followers:
            f.close()

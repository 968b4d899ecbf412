"""Quick wake-ups, an opt-in: while builds run, a daemon with `quick-wakeups = true` holds a
CPU latency request of 0 µs; only then."""

import contextlib
import os
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from daemon.proc.wakeups import DEVICE, QuickWakeups
from store.recipe import Derivation
from tests.daemon_fixtures import Graph, start_daemon, stop_daemon


def test_the_first_holder_makes_the_request_and_the_last_withdraws_it(tmp_path: Path) -> None:
    device = tmp_path / "latency"
    device.write_bytes(b"")
    wakeups = QuickWakeups(True, str(device))
    with wakeups.held():
        assert _opened(os.getpid(), str(device)) == 1
        with wakeups.held():
            assert _opened(os.getpid(), str(device)) == 1
        assert _opened(os.getpid(), str(device)) == 1
    assert _opened(os.getpid(), str(device)) == 0
    assert device.read_bytes() == struct.pack("=i", 0)


def test_off_or_without_the_device_nothing_is_opened(tmp_path: Path) -> None:
    device = tmp_path / "latency"
    device.write_bytes(b"")
    with QuickWakeups(False, str(device)).held():
        assert _opened(os.getpid(), str(device)) == 0
    with QuickWakeups(True, str(tmp_path / "absent")).held():
        pass
    assert device.read_bytes() == b""


def test_the_daemon_opted_in_holds_the_request_while_it_builds() -> None:
    with _daemon("quick-wakeups = true\n") as graph:
        pid = graph.daemon.proc.pid
        assert _opened(pid, DEVICE) == 0
        held, results = _during_build(graph, graph.sh("slow", "sleep 1; echo > $out"))
        assert held and [r["status"] for r in results] == ["built"]
        assert _opened(pid, DEVICE) == 0


def test_by_default_the_daemon_makes_no_request(graph: Graph) -> None:
    held, results = _during_build(graph, graph.sh("slow", "sleep 1; echo > $out"))
    assert not held and [r["status"] for r in results] == ["built"]


@contextlib.contextmanager
def _daemon(settings: str) -> Iterator[Graph]:
    where = Path(tempfile.mkdtemp(prefix="weft-wakeups-", dir="/var/tmp"))
    (where / "state").mkdir()
    (where / "state" / "weft.toml").write_text(settings)
    d = start_daemon(where / "state")
    graph = Graph(d)
    try:
        yield graph
    finally:
        graph.close()
        stop_daemon(d)
        shutil.rmtree(where, ignore_errors=True)


def _during_build(graph: Graph, drv: Derivation) -> tuple[bool, list[dict]]:
    """Whether the daemon held the device open at some point while `drv` built."""
    got: dict[str, list[dict]] = {}
    build = threading.Thread(target=lambda: got.update(results=graph.build(drv)))
    build.start()
    held = False
    while build.is_alive() and not held:
        held = _opened(graph.daemon.proc.pid, DEVICE) > 0
        time.sleep(0.01)
    build.join()
    return held, got["results"]


def _opened(pid: int, path: str) -> int:
    """How many of `pid`'s descriptors are open on `path`."""
    fds = f"/proc/{pid}/fd"
    count = 0
    for fd in os.listdir(fds):
        with contextlib.suppress(FileNotFoundError):
            count += os.readlink(f"{fds}/{fd}") == path
    return count

"""The spawner's side of faults and of where a daemon runs, with real daemons: builders
die with a daemon killed with kill -9, a killed spawner leaves no debris, a state dir may
be anywhere, and a request past a packet's size builds (past execve's limits, it is
refused, naming the limit)."""

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.daemons import start_daemon, stop_daemon
from store.recipe import Derivation
from tests.daemon_fixtures import Graph

# How long a builder, its sandbox and its pasta may take to go once the daemon is dead:
# the kernel kills them at once; this is the slack of a loaded test machine.
GONE_WITHIN = 3.0
# How the spawner shows in its command line (`python -m spawner 3`).
SPAWNER = b"\0spawner\0"


def _processes() -> Iterator[tuple[int, int, bytes]]:
    """(pid, parent pid, command line) of every process."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    yield int(name), ppid, f.read()
            except (OSError, IndexError, ValueError):
                continue


def _pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _in_namespaces(namespaces: set[str]) -> list[int]:
    return [pid for pid, _, _ in _processes() if _pid_namespace(pid) in namespaces]


def _wait_for(found: Callable[[], list[int]], count: int, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(pids := found()) < count:
        assert time.monotonic() < deadline, f"{len(pids)} of {count} found"
        time.sleep(0.05)
    return pids


def _children(parent: int, word: bytes) -> list[int]:
    return [pid for pid, ppid, cmd in _processes() if ppid == parent and word in cmd]


@pytest.fixture
def scratch() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="weft-faults-", dir="/var/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_a_daemon_killed_while_builds_run_takes_every_process_of_them_along(
    scratch: Path,
) -> None:
    daemon = start_daemon(scratch / "state")
    graph = Graph(daemon)
    marker = f"weft-kill-{os.getpid()}"
    sleeper = graph.sh("sleeper", f": {marker}; sleep 1000 & sleep 1000; true")
    fetcher = graph.sh("fetcher", f": {marker}; sleep 1000; true", output_hash="blake3:" + "0" * 64)
    builds = threading.Thread(target=_build_until_dead, args=(graph, sleeper, fetcher))
    try:
        builds.start()
        builders = _wait_for(lambda: [p for p, _, c in _processes() if marker.encode() in c], 2)
        namespaces = {ns for pid in builders if (ns := _pid_namespace(pid))}
        (spawner,) = _children(daemon.proc.pid, SPAWNER)
        pastas = _wait_for(lambda: _children(spawner, b"pasta"), 1)
        assert len(_in_namespaces(namespaces)) >= 4  # two shells, three sleeps
        os.kill(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait()
        deadline = time.monotonic() + GONE_WITHIN
        while (left := _in_namespaces(namespaces) + [p for p in pastas if _alive(p)]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert left == [], "processes of the builds outlived the daemon"
        assert not _alive(spawner)
    finally:
        builds.join(10)
        graph.client.close()
        # The next daemon on the state dir starts, and stops, cleanly.
        stop_daemon(start_daemon(scratch / "state"))


def _build_until_dead(graph: Graph, *drvs: Derivation) -> None:
    with contextlib.suppress(OSError, EOFError):
        graph.build(*drvs)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _scratch_dirs(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("weft-sandbox-"))


def _wait_for_scratch(tmp: Path, done: Callable[[list[str]], bool]) -> list[str]:
    deadline = time.monotonic() + 10
    while not done(names := _scratch_dirs(tmp)):
        assert time.monotonic() < deadline, names
        time.sleep(0.05)
    return names


def test_a_killed_spawner_leaves_no_scratch_directory_behind(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp = scratch / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    daemon = start_daemon(scratch / "state")
    try:
        (spawner,) = _children(daemon.proc.pid, SPAWNER)
        (first,) = _wait_for_scratch(tmp, lambda names: bool(names))
        assert first.startswith(f"weft-sandbox-{spawner}.")
        os.kill(spawner, signal.SIGKILL)
        (now,) = _wait_for_scratch(tmp, lambda names: bool(names) and names != [first])
        # Read once the new scratch dir is there: a look while the replacement started
        # could catch a process of the start that is not the spawner serving now.
        (second,) = _wait_for(lambda: _children(daemon.proc.pid, SPAWNER), 1)
        assert second != spawner and now.startswith(f"weft-sandbox-{second}.")
        # The replacement builds.
        graph = Graph(daemon)
        try:
            (result,) = graph.build(graph.sh("after", "echo ok > $out"))
            assert result["status"] == "built", result
        finally:
            graph.close()
    finally:
        stop_daemon(daemon)
    assert _scratch_dirs(tmp) == []


@pytest.mark.parametrize(
    ("base", "prefix"),
    [
        ("/tmp", "weft-loc-"),
        ("/dev/shm", "weft-loc-"),
        ("/root", "weft-loc-"),
        ("/var/tmp", "weft loc with spaces "),
    ],
    ids=["under-tmp", "under-dev-shm", "under-root", "with-spaces"],
)
def test_builds_work_from_a_state_dir_anywhere(base: str, prefix: str) -> None:
    """(A deep one: `test_sandbox.py`, the daemon's socket path being short.)"""
    top = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    daemon = start_daemon(top / "state")
    graph = Graph(daemon)
    try:
        first = graph.sh("first", "echo one > $out")
        second = graph.sh("second", f'cat "{first}" > $out; echo two >> $out')
        (result,) = graph.build(second)
        assert result["status"] == "built", result
        assert Path(second.out).read_text() == "one\ntwo\n"
    finally:
        graph.close()
        stop_daemon(daemon)
        shutil.rmtree(top, ignore_errors=True)


def _big_env(size: int, each: int = 100_000) -> dict[str, str]:
    return {f"BIG{i}": "x" * min(each, size - i * each) for i in range(-(-size // each))}


def test_a_megabyte_of_environment_builds(graph: Graph) -> None:
    env = _big_env(1_000_000)
    script = 'echo "${#BIG0} ${#BIG9} $(env | wc -c)" > $out'
    big = graph.sh("big-env", script, env=env)
    (result,) = graph.build(big)
    assert result["status"] == "built", result
    first, last, total = Path(big.out).read_text().split()
    assert (first, last) == ("100000", "100000") and int(total) > 1_000_000


def test_past_execves_limits_a_build_is_refused_naming_the_limit(graph: Graph) -> None:
    too_much = graph.sh("too-much", "echo built > $out", env=_big_env(3_000_000))
    too_long = graph.sh("too-long", "echo built > $out", env={"ONE": "x" * 200_000})
    results = {r["drv"]: r for r in graph.build(too_much, too_long, keep_going=True)}
    assert results[too_much.path]["status"] == "failed"
    assert "ARG_MAX" in results[too_much.path]["message"]
    assert results[too_long.path]["status"] == "failed"
    message = results[too_long.path]["message"]
    assert "ONE" in message and "MAX_ARG_STRLEN" in message

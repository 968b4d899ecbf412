"""Faults around running builds, for real: a `store-build` interrupted or killed while two
builds run, and a daemon killed with kill -9 whose builder runs on in its slot."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.compose import pauser_for
from daemon.proc.spawner import build_ids
from daemon.settings import Settings
from store.layout import StateDir
from tests.daemon_fixtures import DaemonProc, Graph, start_daemon, stop_daemon

ROOT = Path(__file__).parent.parent
STORE_BUILD = Path(sys.executable).parent / "store-build"


def _running(marker: str) -> list[int]:
    """The processes whose command line holds `marker`."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(name))
            except OSError:
                continue
    return found


def _alive(pid: int) -> bool:
    """Running, not exited (a zombie pid 1 has not reaped yet has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _pipes(pid: int) -> list[str]:
    """The pipes among the descriptors `pid` holds."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if (target := os.readlink(f"/proc/{pid}/fd/{fd}")).startswith("pipe:"):
                found.append(target)
    return found


def _wait_for(what: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not what():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def repo_daemon() -> Iterator[DaemonProc]:
    # A state dir inside the checkout, not /var/tmp as most tests have it.
    d = Path(tempfile.mkdtemp(prefix=".state-faults-", dir=Path(__file__).parent))
    daemon = start_daemon(d / "state", "--grace", "5")
    yield daemon
    stop_daemon(daemon)
    shutil.rmtree(d, ignore_errors=True)


RECIPE = """
from store.recipe import busybox, derivation
bb = busybox()
env = {{"PATH": f"{{bb}}/bin"}}
for name in ("left", "right"):
    globals()[name] = derivation(
        name, f"{{bb}}/bin/busybox", ["sh", "-c", "echo started; sleep {marker}; echo > $out"],
        env=env,
    )
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_a_client_stopped_while_two_builds_run_leaves_the_daemon_serving(
    repo_daemon: DaemonProc, tmp_path: Path, sig: signal.Signals
) -> None:
    # A sleep no other test runs: its builders are found by it.
    marker = f"{40 + int(sig)}.{uuid.uuid4().int % 10**6:06d}"
    recipe = tmp_path / "two.py"
    recipe.write_text(RECIPE.format(marker=marker))
    env = {**os.environ, "WEFT_STATE_DIR": str(repo_daemon.state)}
    for _ in range(3):
        client = subprocess.Popen(
            [STORE_BUILD, "-j2", "-L", str(recipe)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own process group, SIGINT handled as at a terminal's Ctrl-C.
            start_new_session=True,
        )
        _wait_for(lambda: len(_running(f"sleep {marker}")) == 2)
        client.send_signal(sig)
        client.wait(30)
        # The daemon kills the abandoned builders, and serves on.
        _wait_for(lambda: not [p for p in _running(f"sleep {marker}") if _alive(p)], 15)
        assert repo_daemon.alive(), repo_daemon.log.read_text()
        # Both ends of each abandoned build's log pipe are closed: the daemon holds no
        # pipe at rest.
        _wait_for(lambda: not _pipes(repo_daemon.proc.pid), 10)
    graph = Graph(repo_daemon)
    try:
        quick = graph.sh("after", "echo fine > $out")
        assert [r["status"] for r in graph.build(quick)] == ["built"]
    finally:
        graph.close()
    assert "Traceback" not in repo_daemon.log.read_text()


def _slot_dir(state: Path, index: int) -> Path:
    return state / "var" / "builds" / str(index)


def _leave_builder(state: Path, busybox: str, cgroups: str, script: str) -> int:
    """A builder left running in slot 0."""
    uid, _ = build_ids(0, Settings().build_uid_base, Settings().build_slots)
    args = [str(_slot_dir(state, 0)), str(state / "store"), str(uid), busybox, cgroups, script]
    out = subprocess.run(
        [sys.executable, "-m", "tests.leftover_driver", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=ROOT,
    )
    return int(out.stdout)


def test_builders_left_running_by_a_killed_daemon_are_dead_before_a_slot_is_used() -> None:
    where = Path(tempfile.mkdtemp(prefix="weft-leftover-", dir="/var/tmp"))
    state = where / "state"
    first = start_daemon(state)
    leftovers: list[int] = []
    try:
        graph = Graph(first)
        marker = f"53.{uuid.uuid4().int % 10**6:06d}"
        slow = graph.sh("slow", f"sleep {marker}; echo > $out")
        busybox = graph.bb
        graph.close()
        # The daemon's own builder in slot 0, which may or may not die with it.
        request = subprocess.Popen(
            [STORE_BUILD, slow.path],
            env={**os.environ, "WEFT_STATE_DIR": str(state)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for(lambda: _running(f"sleep {marker}"))
        first.proc.kill()
        first.proc.wait()
        request.wait(30)
        # And some that certainly outlived it, two writing in the slot's build dir every
        # 20 ms, by a relative path as builds do (the spawner's exit detaches a builder's
        # `/build` mount, not its working directory): one in a cgroup of the state
        # dir's, as the daemon's builders are where it can make them, one in none; and
        # one in a cgroup that went elsewhere.
        cgroups = pauser_for(StateDir.at(state)).cgroups
        writes = "while :; do echo x >> {}; sleep 0.02; done"
        leftovers = [
            _leave_builder(state, busybox, cgroups, writes.format("in-cgroup")),
            _leave_builder(state, busybox, "", writes.format("no-cgroup")),
        ]
        if cgroups:
            leftovers.append(
                _leave_builder(state, busybox, cgroups, "cd /; " + writes.format("/dev/null"))
            )
        build = _slot_dir(state, 0) / "build"
        _wait_for(lambda: {"in-cgroup", "no-cgroup"} <= set(os.listdir(build)))
        assert all(_alive(p) for p in leftovers)
        # Someone looking at the slot from the host, no builder.
        onlooker = subprocess.Popen(["sleep", "60"], cwd=build)
        second = start_daemon(state)
        try:
            graph = Graph(second)
            # Slot 0 is the one the new daemon's first build gets.
            looks = graph.sh("looks", "ls -a /build > $out; sleep 0.5; ls -a /build >> $out")
            assert [r["status"] for r in graph.build(looks)] == ["built"]
            assert "cgroup" not in Path(looks.out).read_text()
            assert not [p for p in leftovers if _alive(p)]
            assert not [p for p in _running(f"sleep {marker}") if _alive(p)]
            assert onlooker.poll() is None
            onlooker.kill()
            onlooker.wait()
            graph.close()
        finally:
            stop_daemon(second)
    finally:
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if first.alive():
            stop_daemon(first)
        shutil.rmtree(where, ignore_errors=True)

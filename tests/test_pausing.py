"""Pausing a build behind one interface (`daemon/sched/pauser.py`): its freezer cgroup
frozen, or its process tree stopped with signals, which a build whose cgroup cannot be
written falls back to for good.  Real processes, a real cgroup hierarchy."""

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.proc.processes import Process
from daemon.sched.freezer import Freezer
from daemon.sched.loadsignals import IDLE
from daemon.sched.scheduler import Running
from daemon.sched.sigstop import SIGNALS, tree


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _settles(check: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def freezer() -> Iterator[Freezer]:
    found = Freezer.find(f"test-pausing-{os.getpid()}")
    assert found is not None
    yield found
    found.close()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
    assert _settles(lambda: len(tree(proc.pid)) == 2)
    yield proc
    _kill(proc)


def _kill(proc: subprocess.Popen) -> int:
    for p in reversed(tree(proc.pid)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    return proc.wait()


def _stopped(pid: int) -> bool:
    return {_state(p) for p in tree(pid)} == {"T"}


def _running_build(pauser: Freezer, proc: Process) -> Running:
    run = Running("/store/x-a.drv", 1, None, time.time(), IDLE, IDLE, 1, pauser)
    run.watch(proc, [])
    return run


def test_the_freezer_freezes_a_builders_cgroup_and_removes_it_once_reaped(
    freezer: Freezer, sleeper: subprocess.Popen
) -> None:
    cgroup = freezer.base / "build-1"
    cgroup.mkdir()
    (cgroup / "cgroup.procs").write_text(str(sleeper.pid))
    proc = Process(sleeper.pid, ["sh"])
    proc.cgroup = str(cgroup)
    assert freezer.cgroups == str(freezer.base)
    freezer.pause(proc)
    assert _settles(lambda: "frozen 1" in (cgroup / "cgroup.events").read_text().splitlines())
    freezer.resume(proc)
    assert _settles(lambda: "frozen 0" in (cgroup / "cgroup.events").read_text().splitlines())
    freezer.reaped(proc)
    assert cgroup.is_dir()  # still running: not reaped
    proc.returncode = _kill(sleeper)
    assert _settles(lambda: not Path(cgroup, "cgroup.procs").read_text().strip())
    freezer.reaped(proc)
    assert not cgroup.exists()


async def test_a_builder_in_no_cgroup_of_its_own_is_paused_with_signals(
    freezer: Freezer, sleeper: subprocess.Popen
) -> None:
    run = _running_build(freezer, Process(sleeper.pid, ["sh"]))
    run.pause()
    assert _settles(lambda: _stopped(sleeper.pid))
    run.resume()
    assert _settles(lambda: not _stopped(sleeper.pid))
    assert run.pauser is freezer


async def test_a_build_whose_cgroup_went_away_goes_on_with_signals(
    freezer: Freezer, sleeper: subprocess.Popen
) -> None:
    proc = Process(sleeper.pid, ["sh"])
    proc.cgroup = str(freezer.base / "removed-by-an-admin")
    run = _running_build(freezer, proc)
    run.pause()
    assert run.pauser is SIGNALS
    assert _settles(lambda: _stopped(sleeper.pid))
    run.resume()
    assert _settles(lambda: not _stopped(sleeper.pid))

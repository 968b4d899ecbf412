"""The daemon's threads and the locker share one CPU; the spawner and the builders keep all."""

import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from daemon.proc.cpus import Cpus, current_cpu
from tests.daemon_fixtures import DaemonProc, Graph, start_daemon, stop_daemon

ALL = frozenset(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(len(ALL) < 2, reason="one CPU: nothing to share")


def test_a_thread_settles_home_spreads_for_long_work_and_yields_for_background_work() -> None:
    cpus = Cpus.plan(share=True)
    assert cpus.home in ALL and cpus.allowed == ALL and cpus.renice
    seen: dict[str, object] = {}

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def thread() -> None:
        cpus.settle()
        seen["home"] = (os.sched_getaffinity(0), current_cpu())
        seen["spread"] = cpus.spread(lambda: os.sched_getaffinity(0))()
        seen["after"] = os.sched_getaffinity(0)
        seen["background"] = cpus.background(nice)()
        seen["nice after"] = nice()

    t = threading.Thread(target=thread)
    t.start()
    t.join()
    assert seen["home"] == ({cpus.home}, cpus.home)
    assert seen["spread"] == ALL
    assert seen["after"] == {cpus.home}
    assert (seen["background"], seen["nice after"]) == (19, os.getpriority(os.PRIO_PROCESS, 0))
    unshared = Cpus.plan(share=False)
    assert unshared.home is None and unshared.for_helper(shares=True) is None
    assert unshared.spread(len) is len and unshared.background(len) is len


def test_the_daemon_and_locker_share_a_cpu_the_spawner_and_builders_use_all(
    graph: Graph,
) -> None:
    d = graph.daemon
    drv = graph.sh("cpus", "grep Cpus_allowed_list /proc/self/status > $out")
    assert [r["status"] for r in graph.build(drv)] == ["built"]
    with open("/proc/self/status") as f:
        ours = [line for line in f if line.startswith("Cpus_allowed_list")]
    assert Path(drv.out).read_text().splitlines() == [line.rstrip("\n") for line in ours]
    # The worker thread that registered the output spread out for it, and came back.
    home = _daemon_cpus(d)
    assert len(home) == 1
    locker, spawner = _helper(d, "locker"), _helper(d, "spawner")
    assert os.sched_getaffinity(locker) == home
    assert os.sched_getaffinity(spawner) == ALL
    # Helpers started again by the daemon, from its one CPU, are placed the same way
    # (looked at once they have served a build, so surely after they were placed).
    os.kill(locker, signal.SIGKILL)
    os.kill(spawner, signal.SIGKILL)
    locker = _helper(d, "locker", not_pid=locker)
    spawner = _helper(d, "spawner", not_pid=spawner)
    assert [r["status"] for r in graph.build(graph.sh("after", "echo > $out"))] == ["built"]
    assert os.sched_getaffinity(locker) == home
    assert os.sched_getaffinity(spawner) == ALL
    assert _daemon_cpus(d) == home


def test_share_cpu_false_leaves_every_cpu_to_the_daemon() -> None:
    where = Path(tempfile.mkdtemp(prefix="weft-cpus-", dir="/var/tmp"))
    state = where / "state"
    state.mkdir()
    (state / "weft.toml").write_text("share-cpu = false\n")
    d = start_daemon(state)
    try:
        assert _daemon_cpus(d) == ALL
        assert os.sched_getaffinity(_helper(d, "locker")) == ALL
    finally:
        stop_daemon(d)
        shutil.rmtree(where, ignore_errors=True)


def _daemon_cpus(d: DaemonProc) -> frozenset[int]:
    """The CPUs of the daemon's threads, which must all be alike."""
    tasks = os.listdir(f"/proc/{d.proc.pid}/task")
    (cpus,) = {frozenset(os.sched_getaffinity(int(t))) for t in tasks}
    return cpus


def _helper(d: DaemonProc, module: str, not_pid: int = 0) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for p in os.listdir("/proc"):
            if not p.isdigit() or int(p) == not_pid:
                continue
            try:
                with open(f"/proc/{p}/cmdline") as f:
                    cmdline = f.read()
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ours = f"-m\0{module}\x003\0" in cmdline and int(fields[1]) == d.proc.pid
            if ours and fields[0] != "Z":
                return int(p)
        time.sleep(0.02)
    raise AssertionError(f"no {module} of daemon {d.proc.pid}")

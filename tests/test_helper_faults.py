"""A helper's death never takes the daemon down: the locker killed with kill -9 at the
awkward moments (a request on its way, the one-daemon lock being taken back, shutdown,
builds holding locks, a collection running), a helper that answers garbage or hangs up
without exiting, and one that dies at every start."""

import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from daemon.cli.blocking import BlockingClient, DaemonError
from daemon.main import OUTPUT_LOCKS
from daemon.proc.helper import HelperConnection
from daemon.proc.locks import (
    DAEMON_OWNER,
    LockerDied,
    LockLost,
    LockService,
    start_locker_process,
)
from daemon.proc.processes import Process, ProcessMonitor
from daemon.wire.locker import Mode
from daemon.wire.packets import Fields
from tests.daemon_fixtures import Graph, start_daemon, stop_daemon
from tests.test_locker import outside_can_lock, outside_can_lock_byte

BIN = Path(sys.executable).parent


def proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def someone_holds(path: Path) -> bool:
    """Whether any process holds a lock on `path`, asked without taking one (F_OFD_GETLK):
    a probe that took the lock could take it from the daemon in the moment it asks."""
    flock = struct.pack("@hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    fd = os.open(path, os.O_RDWR)
    try:
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, flock)
    finally:
        os.close(fd)
    return struct.unpack("@hhqqi4x", answer)[0] != fcntl.F_UNLCK


async def until(condition: object, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not condition():  # type: ignore[operator]
            await trio.sleep(0.002)


@asynccontextmanager
async def service(
    monitor: ProcessMonitor, daemon_lock: str | None = None, on_lost: object = None
) -> AsyncIterator[LockService]:
    """A locker service whose monitor the test starts (or not) itself."""
    proc, sock = start_locker_process(monitor)
    svc = LockService(monitor, proc, sock, daemon_lock, on_lost or (lambda: None))
    async with trio.open_nursery() as nursery:
        await nursery.start(svc.run)
        yield svc
        with trio.fail_after(10):
            await svc.aclose()
        nursery.cancel_scope.cancel()


async def test_a_request_sent_after_the_locker_died_but_before_it_was_reaped_fails_as_locker_died(
    tmp_path: Path,
) -> None:
    monitor = ProcessMonitor(reap_all=False)
    async with trio.open_nursery() as nursery:
        async with service(monitor) as svc:
            held = await svc.lock(str(tmp_path / "a.lock"), Mode.EXCLUSIVE, "first")
            old = svc.locker_pid
            os.kill(old, signal.SIGKILL)
            # Nobody reaps yet: the daemon has not noticed, and the socket's other end is
            # gone.
            await until(lambda: proc_state(old) == "Z")
            await svc.unlock(held, "first")
            with pytest.raises(LockerDied, match="lock helper"):
                await svc.lock(str(tmp_path / "b.lock"), Mode.EXCLUSIVE, "second")
            await nursery.start(monitor.run)
            await until(lambda: svc.restarts == 1)
            with trio.fail_after(10):
                async with svc.exclusive([str(tmp_path / "b.lock")], "third"):
                    locked = not await trio.to_thread.run_sync(
                        outside_can_lock, tmp_path / "b.lock"
                    )
            assert locked
        nursery.cancel_scope.cancel()


async def test_a_daemon_lock_held_for_a_moment_while_the_locker_restarts_is_waited_out(
    tmp_path: Path,
) -> None:
    daemon_lock = tmp_path / "daemon.lock"
    lost: list[bool] = []
    monitor = ProcessMonitor(reap_all=False)
    holder = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(daemon_lock)!r}, os.O_RDWR)\n"
        "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "print('held', flush=True)\n"
        "time.sleep(0.5)\n"
    )
    async with trio.open_nursery() as nursery:
        async with service(monitor, str(daemon_lock), lambda: lost.append(True)) as svc:
            await svc.lock(str(daemon_lock), Mode.EXCLUSIVE, DAEMON_OWNER, wait=False)
            old = svc.locker_pid
            os.kill(old, signal.SIGKILL)
            # Not reaped yet, so no new locker: the lock is free, and a probe takes it.
            await until(lambda: proc_state(old) == "Z")
            probe = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE)
            assert probe.stdout is not None and probe.stdout.readline() == b"held\n"
            await nursery.start(monitor.run)
            await until(lambda: svc.restarts == 1)
            await until(lambda: someone_holds(daemon_lock) and probe.poll() is not None)
            assert probe.wait() == 0
            await trio.sleep(0.1)
            assert lost == []
        nursery.cancel_scope.cancel()


async def test_a_locker_killed_again_while_the_daemon_lock_is_taken_back_does_not_stop_the_daemon(
    tmp_path: Path,
) -> None:
    daemon_lock = tmp_path / "daemon.lock"
    lost: list[bool] = []
    monitor = ProcessMonitor(reap_all=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        async with service(monitor, str(daemon_lock), lambda: lost.append(True)) as svc:
            await svc.lock(str(daemon_lock), Mode.EXCLUSIVE, DAEMON_OWNER, wait=False)
            os.kill(svc.locker_pid, signal.SIGKILL)
            await until(lambda: svc.restarts == 1)
            # The new locker has just been started: the daemon lock's request is on its way.
            os.kill(svc.locker_pid, signal.SIGKILL)
            await until(lambda: svc.restarts == 2)
            await until(lambda: someone_holds(daemon_lock))
            assert lost == []
        nursery.cancel_scope.cancel()


async def test_closing_while_the_daemon_lock_is_taken_back_raises_nothing(tmp_path: Path) -> None:
    daemon_lock = tmp_path / "daemon.lock"
    monitor = ProcessMonitor(reap_all=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        proc, sock = start_locker_process(monitor)
        svc = LockService(monitor, proc, sock, str(daemon_lock))
        async with trio.open_nursery() as inner:
            await inner.start(svc.run)
            os.kill(svc.locker_pid, signal.SIGKILL)
            await until(lambda: svc.restarts == 1)
            # Shut down with the daemon lock's request in flight: its task is cancelled
            # while the socket it would withdraw the request on is closed.
            with trio.fail_after(10):
                await svc.aclose()
            inner.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


async def test_work_that_fails_as_it_is_cancelled_for_lost_locks_raises_lock_lost(
    tmp_path: Path,
) -> None:
    monitor = ProcessMonitor(reap_all=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        async with service(monitor) as svc:

            async def cleanup_that_fails() -> None:
                try:
                    await trio.sleep_forever()
                finally:
                    raise OSError("the build's cleanup failed as it was cancelled")

            held = svc.exclusive([str(tmp_path / "out.lock")], "build:x")
            with pytest.raises(LockLost, match=r"locker.*died.*retry") as caught:
                async with held, trio.open_nursery() as body:
                    body.start_soon(cleanup_that_fails)
                    await trio.sleep(0.05)
                    os.kill(svc.locker_pid, signal.SIGKILL)
                    await trio.sleep_forever()
            assert isinstance(caught.value.__cause__, ExceptionGroup)
            await until(lambda: svc.restarts == 1)
        nursery.cancel_scope.cancel()


# A stand-in helper at fd 3: reads one request, then does what the test names.
MISBEHAVING = textwrap.dedent("""
    import socket, sys, time
    sock = socket.socket(fileno=3)
    sock.recv(1 << 16)
    if sys.argv[1] == "garbage":
        sock.send(b"\\xc1 not msgpack")
    else:
        sock.close()
    time.sleep(60)
""")


def misbehaving(monitor: ProcessMonitor, how: str) -> tuple[Process, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        proc = monitor.spawn([sys.executable, "-c", MISBEHAVING, how], {3: theirs.fileno()})
    finally:
        theirs.close()
    return proc, ours


@pytest.mark.parametrize("how", ["garbage", "hangs up"])
async def test_a_locker_that_answers_garbage_or_hangs_up_is_killed_and_replaced(
    tmp_path: Path, how: str
) -> None:
    monitor = ProcessMonitor(reap_all=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        proc, sock = misbehaving(monitor, how)
        svc = LockService(monitor, proc, sock)
        await nursery.start(svc.run)
        with trio.fail_after(10), pytest.raises(LockerDied):
            await svc.lock(str(tmp_path / "a.lock"), Mode.EXCLUSIVE, "first")
        with trio.fail_after(10):
            assert await proc.wait() == -signal.SIGKILL
            await until(lambda: svc.restarts == 1)
            async with svc.exclusive([str(tmp_path / "a.lock")], "second"):
                assert not await trio.to_thread.run_sync(outside_can_lock, tmp_path / "a.lock")
            await svc.aclose()
        nursery.cancel_scope.cancel()


class Doomed(HelperConnection[str, str]):
    """A helper that exits as soon as it starts, every time."""

    name = "doomed helper"

    def _encode(self, request: str) -> Fields:
        return {"text": request}

    def _decode(self, fields: Fields) -> str:
        return str(fields)


def start_doomed(monitor: ProcessMonitor) -> tuple[Process, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        proc = monitor.spawn([sys.executable, "-c", "raise SystemExit(3)"], {3: theirs.fileno()})
    finally:
        theirs.close()
    return proc, ours


async def test_a_helper_that_dies_at_every_start_is_restarted_at_a_falling_rate() -> None:
    monitor = ProcessMonitor(reap_all=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        helper = Doomed(monitor, start_doomed, *start_doomed(monitor))
        await nursery.start(helper.run)
        await trio.sleep(2)
        # Pauses of 0.1, 0.2, 0.4, 0.8 s after the second death: about six starts in 2 s,
        # where restarting at once makes one per interpreter start (dozens).
        assert 3 <= helper.restarts <= 8
        assert await helper._call("anyone?") is None
        await helper.aclose()
        nursery.cancel_scope.cancel()


# -- the whole daemon --------------------------------------------------------------------


def lockers_of(daemon_pid: int) -> list[int]:
    found = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if b"-m\0locker\0" in cmdline and ppid == daemon_pid:
            found.append(int(p))
    return found


def kill_locker(daemon_pid: int, previous: int | None = None) -> int:
    """kill -9 the daemon's locker (once there is one other than `previous`): its pid."""
    deadline = time.monotonic() + 10
    while True:
        pids = [p for p in lockers_of(daemon_pid) if p != previous and proc_state(p) != "Z"]
        if pids:
            break
        assert time.monotonic() < deadline, "no locker"
        time.sleep(0.002)
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]


class Builds:
    """Builds on connections of their own, each in a thread."""

    def __init__(self, socket_path: str, drv_paths: list[str]) -> None:
        self.outcomes: list[tuple[str, str]] = []
        self._threads = [
            threading.Thread(target=self._build, args=(socket_path, p)) for p in drv_paths
        ]
        for t in self._threads:
            t.start()

    def _build(self, socket_path: str, drv: str) -> None:
        client = BlockingClient(socket_path, on_log=lambda e: None)
        try:
            results = client.call("build", drvs=[drv])
            for r in results:  # type: ignore[attr-defined]
                self.outcomes.append((r["status"], r.get("message", "")))
        except DaemonError as e:
            self.outcomes.append((e.code, e.message))
        except ConnectionError as e:
            self.outcomes.append(("gone", str(e)))
        finally:
            client.close()

    def join(self, timeout: float = 120) -> list[tuple[str, str]]:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), "builds still running"
        return self.outcomes


def pids_of(marker: bytes) -> list[int]:
    """Running processes whose command line holds `marker`."""
    found = []
    for p in os.listdir("/proc"):
        if p.isdigit() and proc_state(int(p)) not in ("Z", "gone"):
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    if marker in f.read():
                        found.append(int(p))
            except OSError:
                continue
    return found


def wait_for_builders(marker: str, n: int) -> None:
    """Until `n` builders whose command line holds `marker` run: each was spawned under
    its output locks, which it holds until it exits."""
    deadline = time.monotonic() + 60
    while (running := len(pids_of(marker.encode()))) < n:
        assert time.monotonic() < deadline, f"{running} of {n} builders started"
        time.sleep(0.01)


def test_the_daemon_survives_its_locker_killed_while_builds_hold_locks_and_a_gc_runs(
    graph: Graph,
) -> None:
    d = graph.daemon
    env = {**os.environ, "WEFT_STATE_DIR": str(d.state)}
    for i in range(300):
        graph.client.call("add-text", name=f"dead{i}", text=f"dead {i}")

    # A build holding its output locks fails, saying what died.  (One: on a loaded machine
    # the scheduler may hold a second back, which would then take its locks afresh.)
    drvs = [graph.sh("held", ": held-; sleep 30; echo held > $out")]
    builds = Builds(d.socket, [p.path for p in drvs])
    wait_for_builders(": held-", len(drvs))
    gc = subprocess.Popen([BIN / "store-gc"], env=env, stdout=subprocess.DEVNULL)
    kill_locker(d.proc.pid)
    outcomes = builds.join()
    assert [s for s, _ in outcomes] == ["failed"], outcomes
    assert all("locker" in m and "died" in m for _, m in outcomes), outcomes
    assert gc.wait(60) == 0

    # Killed twice in a row while builds ask for their locks: built, or failed saying why.
    drvs = [graph.sh(f"asking{i}", f"echo {i} > $out") for i in range(3)]
    builds = Builds(d.socket, [p.path for p in drvs])
    killed = kill_locker(d.proc.pid)
    kill_locker(d.proc.pid, killed)
    for status, message in builds.join():
        assert status == "built" or ("locker" in message and "died" in message), message
    assert d.alive()

    # And the daemon serves on, and holds the one-daemon lock again.
    drvs = [graph.sh(f"after{i}", f"echo {i} > $out") for i in range(3)]
    results = graph.build(*drvs)
    assert [r["status"] for r in results] == ["built"] * 3, results
    assert not outside_can_lock(d.state / "var" / "daemon.lock")


def test_a_restarted_locker_still_dies_with_its_daemon(tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "state")
    try:
        first = kill_locker(d.proc.pid)
        deadline = time.monotonic() + 10
        while not (lockers := [p for p in lockers_of(d.proc.pid) if p != first]):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        (second,) = lockers
        # Once it has taken the one-daemon lock back.
        while not someone_holds(d.state / "var" / "daemon.lock"):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        d.proc.kill()
        d.proc.wait()
        deadline = time.monotonic() + 1
        while proc_state(second) not in ("Z", "gone"):
            assert time.monotonic() < deadline, "the locker outlived its daemon"
            time.sleep(0.005)
        assert outside_can_lock(d.state / "var" / "daemon.lock")
    finally:
        stop_daemon(d)


def test_output_locks_of_a_killed_daemon_go_with_it_and_leave_no_file() -> None:
    # Under the repo's tests directory: state dirs are not all in one kind of place.
    work = Path(tempfile.mkdtemp(prefix="stale-locks-", dir=Path(__file__).parent))
    try:
        d = start_daemon(work / "state")
        graph = Graph(d)
        bytes_file = d.state / "var" / OUTPUT_LOCKS
        try:
            # Long enough to be killed in, short enough to build again in the test.
            drvs = [graph.sh("slow", ": stale-; sleep 3; echo slow > $out")]
            outs = [o for drv in drvs for o in drv.outputs.values()]
            builds = Builds(d.socket, [p.path for p in drvs])
            wait_for_builders(": stale-", len(drvs))
            # Building, its output is locked for every other process too.
            assert not any(outside_can_lock_byte(bytes_file, o) for o in outs)
            d.proc.kill()
            d.proc.wait()
            builds.join()
        finally:
            graph.close()
            stop_daemon(d)
        # Builders outliving their daemon are another matter (the next daemon's to find);
        # here only the locks are.
        for pid in pids_of(b": stale-"):
            os.kill(pid, signal.SIGKILL)
        assert all(outside_can_lock_byte(bytes_file, o) for o in outs)
        assert not any(os.path.lexists(f"{o}.lock") for o in outs)

        d = start_daemon(work / "state")
        try:
            outcomes = Builds(d.socket, [drv.path for drv in drvs]).join(60)
            assert outcomes == [("built", "")], outcomes
            assert bytes_file.stat().st_size == 0
        finally:
            stop_daemon(d)
    finally:
        shutil.rmtree(work, ignore_errors=True)

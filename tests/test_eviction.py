"""Eviction under memory pressure (docs/snapshots.md): a build whose on-pause scope is
`data` is killed rather than frozen, its durable directories kept in a paused snapshot, its
slots freed, and it starts again with them once the pressure falls, or at the next build of
its derivation after a daemon restart.  A real daemon, real sandboxes; only the load
signals are the test's (`load-proc-dir`, as in tests/test_scheduling.py)."""

import dataclasses
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from daemon.cli.blocking import BlockingClient, DaemonError
from daemon.sched.admission import Admission, Limits
from daemon.sched.loadsignals import IDLE, LoadSample
from daemon.sched.scheduler import Scheduler
from daemon.sched.sigstop import SIGNALS
from store.recipe import Derivation
from tests.daemon_fixtures import Graph, start_daemon, stop_daemon
from tests.test_scheduling import FakeProc, _paused, wait_for

SETTINGS = """
max-jobs = 2
build-slots = 2
load-sample-interval = 0.1
load-proc-dir = "{proc}"
max-memory-pressure = 90
pause-memory-pressure = 50
load-resume-fraction = 0.5
sandbox-paths = ["{control}"]
"""
DURABLE = {"durable": "/build/durable"}


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.control = root / "control"
        self.control.mkdir(mode=0o755)
        self.proc = FakeProc(root / "proc")
        self.state = root / "state"
        self.state.mkdir()
        settings = SETTINGS.format(proc=self.proc.root, control=self.control)
        (self.state / "weft.toml").write_text(settings)
        self.daemon = start_daemon(self.state)
        self.graph = Graph(self.daemon)

    def restart(self) -> None:
        self.graph.close()
        stop_daemon(self.daemon)
        self.daemon = start_daemon(self.state)
        self.graph = Graph(self.daemon)

    def close(self) -> None:
        self.graph.close()
        stop_daemon(self.daemon)

    def status(self) -> dict:
        return self.graph.client.call("status")  # type: ignore[return-value]

    def load(self, memory: float) -> None:
        """Set the memory pressure and wait for the daemon to have sampled it."""
        self.proc.set(memory=memory)
        wait_for(lambda: self.status()["load"]["memory"] == memory, timeout=5)

    def running(self, drv: Derivation) -> dict | None:
        found = [r for r in self.status()["running"] if r["drv"] == drv.path and r["pid"]]
        return found[0] if found else None

    def snapshots(self, drv: Derivation) -> list[dict]:
        return self.graph.client.call("snapshots", target=drv.path)["snapshots"]  # type: ignore[index]

    def build(self, drv: Derivation, **args: object) -> tuple[threading.Thread, list, list[str]]:
        """Build `drv` in a thread of its own: the thread, the results, the log's lines."""
        out: list = []
        logs: list[str] = []

        def run() -> None:
            with BlockingClient(self.daemon.socket, on_log=lambda e: logs.append(e.message)) as c:
                try:
                    out.extend(c.call("build", drvs=[drv.path], **args))  # type: ignore[arg-type]
                except (DaemonError, OSError) as e:
                    out.append(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t, out, logs


@pytest.fixture
def env() -> Iterator[Env]:
    # Not under /tmp: the sandbox has its own /tmp.  0755: the control dir is bound into
    # sandboxes whose users must reach it.
    root = Path(tempfile.mkdtemp(prefix="weft-evict-", dir="/var/tmp"))
    root.chmod(0o755)
    e = Env(root)
    yield e
    (e.control / "go").touch()
    e.close()
    shutil.rmtree(root, ignore_errors=True)


def _evicting(env: Env) -> tuple[Derivation, Derivation]:
    """Two builds: one that holds a slot until told, and one with a durable dir that
    writes it and waits (until evicted), or, finding it, builds from it."""
    g, control = env.graph, env.control
    hold = g.sh("hold", f"while [ ! -e {control}/go ]; do sleep 0.05; done; echo h > $out")
    script = (
        "if [ -e durable/n ]; then cat durable/n > $out; exit 0; fi; "
        "mkdir -p durable; echo kept > durable/n; touch wrote; sleep 600"
    )
    return hold, g.sh("evictee", script, durable_dirs=DURABLE)


def _evict(env: Env, hold: Derivation, evictee: Derivation) -> tuple[int, list, list[str], dict]:
    """Start both, the evictee last, and raise the pressure until it is evicted: its
    builder's pid, its results and log, its paused snapshot's record."""
    env.build(hold)
    wait_for(lambda: env.running(hold))
    _, results, logs = env.build(evictee, on_pause="data", on_commit="data")
    builds = env.state / "var" / "builds"
    wait_for(lambda: list(builds.glob("*/build/wrote")) and env.running(evictee))
    pid = env.running(evictee)["pid"]  # type: ignore[index]
    env.load(memory=70)
    wait_for(lambda: env.status()["evicted"] == 1 and not env.running(evictee))
    # Its whole sandbox went with its builder.
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=10)
    (paused,) = wait_for(lambda: env.snapshots(evictee))  # type: ignore[misc]
    return pid, results, logs, paused


def test_a_data_scope_build_is_evicted_and_resumes_with_its_durable_data_once_pressure_falls(
    env: Env,
) -> None:
    hold, evictee = _evicting(env)
    _, results, logs, paused = _evict(env, hold, evictee)
    snap = Path(paused["path"])
    assert (paused["state"], paused["reason"], paused["scope"]) == ("paused", "evicted", "data")
    assert (snap / "durable" / "durable" / "n").read_text() == "kept\n"
    evicted = f"evictee: evicted under memory pressure; its durable directories are kept in {snap}"
    wait_for(lambda: evicted in logs)
    assert env.status()["running"][0]["drv"] == hold.path

    # Its slot is free: with two slots, another build gets one; its on-pause scope is full,
    # so under the same pressure it is frozen, not evicted.
    frozen = env.graph.sh(
        "frozen", "i=0; while [ $i -lt 20 ]; do i=$((i+1)); sleep 0.05; done; echo f > $out"
    )
    thread, frozen_results, _ = env.build(frozen, on_pause="full")
    run = wait_for(lambda: (r := env.running(frozen)) and r["paused"] and r)
    # Frozen (a freezer cgroup settles a moment after it is told).
    wait_for(lambda: _paused(run["pid"]), timeout=5)  # type: ignore[index]
    assert env.status()["evicted"] == 1

    env.load(memory=5)
    thread.join(60)
    assert [r["status"] for r in frozen_results] == ["built"]
    wait_for(lambda: results, timeout=60)
    (r,) = results
    assert (r["status"], r["attempts"], r["flaky"]) == ("built", 2, False), r
    assert Path(evictee.out).read_text() == "kept\n"
    assert (
        f"evictee: resuming from the paused snapshot of attempt 1, {snap}: restored durable/durable"
        in logs
    )
    assert logs.count("building evictee") == 2
    first, second = env.graph.client.call("history", drv=evictee.path)["attempts"]  # type: ignore[index]
    assert (first["outcome"], first["snapshot"]) == ("evicted", str(snap))
    assert (second["outcome"], second["snapshot"]) == ("built", None)
    # Spent: a paused snapshot is its build's own, gone once resumed from.
    assert env.snapshots(evictee) == []
    assert env.status()["evicted"] == 0


def test_an_evicted_builds_paused_snapshot_outlives_a_daemon_restart(env: Env) -> None:
    hold, evictee = _evicting(env)
    paused = _evict(env, hold, evictee)[3]
    env.restart()
    assert [s["path"] for s in env.snapshots(evictee)] == [paused["path"]]
    # Never resumed from by request: it is its build's.
    with pytest.raises(DaemonError, match="is a paused build's snapshot; only committed"):
        env.graph.build(evictee, resume_from=paused["path"])
    # Whoever builds the derivation next, under any scopes, goes on from it.
    env.load(memory=5)
    (r,) = env.graph.build(evictee)
    assert r["status"] == "built", r
    assert Path(evictee.out).read_text() == "kept\n"
    said = f"evictee: resuming from the paused snapshot {paused['path']}: restored durable/durable"
    assert said in [m for m, _ in env.graph.logs]
    assert env.snapshots(evictee) == []


def test_an_evicted_build_whose_sandbox_cannot_be_made_keeps_its_paused_snapshot(
    env: Env,
) -> None:
    hold, evictee = _evicting(env)
    _, results, logs, paused = _evict(env, hold, evictee)
    # Every sandbox binds the control dir: gone, the next attempt's cannot be made.
    away = env.root / "control-away"
    env.control.rename(away)
    try:
        env.load(memory=5)
        wait_for(lambda: results, timeout=60)
    finally:
        away.rename(env.control)
    (r,) = results
    assert r["status"] == "failed", r
    assert "could not be started" in r["message"], r
    # Restored, but its builder never ran: the durable data is still the build's own.
    said = f"evictee: resuming from the paused snapshot of attempt 1, {paused['path']}"
    assert any(line.startswith(said) for line in logs), logs
    assert [s["path"] for s in env.snapshots(evictee)] == [paused["path"]]

    (r,) = env.graph.build(evictee)
    assert r["status"] == "built", r
    assert Path(evictee.out).read_text() == "kept\n"
    assert env.snapshots(evictee) == []


def test_a_resumed_build_the_daemon_abandons_leaves_its_paused_snapshot_to_the_next(
    env: Env,
) -> None:
    g, control = env.graph, env.control
    hold = g.sh("hold", f"while [ ! -e {control}/go ]; do sleep 0.05; done; echo h > $out")
    # Resumed, it waits to be let go (or killed with its daemon).
    script = (
        f"if [ -e durable/n ]; then touch resumed; while [ ! -e {control}/go ]; do sleep 0.05; "
        "done; cat durable/n > $out; exit 0; fi; "
        "mkdir -p durable; echo kept > durable/n; touch wrote; sleep 600"
    )
    evictee = g.sh("evictee", script, durable_dirs=DURABLE)
    paused = _evict(env, hold, evictee)[3]
    env.load(memory=5)
    wait_for(lambda: list((env.state / "var" / "builds").glob("*/build/resumed")))
    env.restart()
    assert [s["path"] for s in env.snapshots(evictee)] == [paused["path"]]
    (control / "go").touch()
    (r,) = env.graph.build(evictee)
    assert r["status"] == "built", r
    assert Path(evictee.out).read_text() == "kept\n"
    said = f"evictee: resuming from the paused snapshot {paused['path']}: restored durable/durable"
    assert said in [m for m, _ in env.graph.logs]
    assert env.snapshots(evictee) == []


class _Monitor:
    """The load monitor a scheduler reads: samples are the test's to give."""

    latest = IDLE

    def __init__(self) -> None:
        self.reader = self

    def sample(self, keep: bool = True) -> LoadSample:
        return IDLE


async def test_an_evicted_build_goes_before_new_builds_once_nothing_runs() -> None:
    limits = Limits(0, 0, 0, 0, 0, resume_fraction=0.5, pause_memory=50, cores=1)
    scheduler = Scheduler(Admission(limits, max_jobs=1), _Monitor(), SIGNALS)  # type: ignore[arg-type]
    started: list[str] = []
    old_done = trio.Event()

    async def build(drv: str, evicted: bool = False, until: trio.Event | None = None) -> None:
        async with scheduler.slot(drv, 2 if evicted else 1, None, evicted):
            started.append(drv)
            if until is not None:
                await until.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(build, "old", False, old_done)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(build, "evicted", True)
        nursery.start_soon(build, "new")
        await trio.testing.wait_all_tasks_blocked()
        assert (started, scheduler.status()["evicted"]) == (["old"], 1)
        # The old build ends: nothing runs, which is what lets the evicted one in at the
        # next sample, however high the pressure; the new one waits for that.
        old_done.set()
        await trio.testing.wait_all_tasks_blocked()
        assert started == ["old"]
        scheduler.on_sample(dataclasses.replace(IDLE, memory=70.0))
    assert started == ["old", "evicted", "new"]
    assert scheduler.status()["evicted"] == 0


async def test_a_slot_is_free_only_when_a_build_asking_now_would_start_at_once() -> None:
    limits = Limits(0, 0, 0, 0, 0, resume_fraction=0.5, pause_memory=50, cores=1)
    scheduler = Scheduler(Admission(limits, max_jobs=1), _Monitor(), SIGNALS)  # type: ignore[arg-type]
    held = trio.Event()
    frees: list[bool] = [scheduler.free()]

    async def build(drv: str, evicted: bool = False) -> None:
        async with scheduler.slot(drv, 2 if evicted else 1, None, evicted):
            await held.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(build, "running")
        await trio.testing.wait_all_tasks_blocked()
        frees.append(scheduler.free())  # the one slot taken
        nursery.start_soon(build, "evicted", True)
        held.set()
        await trio.testing.wait_all_tasks_blocked()
        # Nothing runs, but the evicted build goes first, at the next sample.
        frees.append(scheduler.free())
        scheduler.on_sample(IDLE)
    frees.append(scheduler.free())
    assert frees == [True, False, False, True]

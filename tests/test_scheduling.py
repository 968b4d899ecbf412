"""Load-adaptive scheduling through a real daemon: real sandboxes, real SQLite history, real
SIGSTOP.  Only the load signals are the test's: the daemon reads them from a directory laid
out like /proc (`load-proc-dir`), which the test writes."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.cli.blocking import BlockingClient
from tests.daemon_fixtures import DaemonProc, start_daemon, stop_daemon
from tests.test_builds import Graph

SETTINGS = """
max-jobs = 3
load-sample-interval = 0.1
load-proc-dir = "{proc}"
max-cpu-pressure = 60
max-memory-pressure = 90
pause-memory-pressure = 50
load-resume-fraction = 0.5
retry-backoff = 0.3
sandbox-paths = ["{control}"]
"""


class FakeProc:
    """Pressure files as the kernel writes them, minus `total`: the daemon takes avg10."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "pressure").mkdir(parents=True)
        (root / "loadavg").write_text("0.10 0.10 0.10 1/100 1\n")
        (root / "meminfo").write_text("MemAvailable:   8000000 kB\n")
        (root / "vmstat").write_text("oom_kill 0\n")
        self.set()

    def set(self, cpu: float = 0.0, memory: float = 0.0, io: float = 0.0) -> None:
        for name, value in (("cpu", cpu), ("memory", memory), ("io", io)):
            tmp = self.root / "pressure" / f".{name}"
            tmp.write_text(f"some avg10={value:.2f} avg60=0.00 avg300=0.00\n")
            os.replace(tmp, self.root / "pressure" / name)


class Env:
    def __init__(self, daemon: DaemonProc, proc: FakeProc, control: Path) -> None:
        self.daemon = daemon
        self.proc = proc
        self.control = control
        self.client = BlockingClient(daemon.socket, on_log=lambda e: None)

    def load(self, **pressure: float) -> None:
        """Set the pressure and wait for the daemon to have sampled it."""
        self.proc.set(**pressure)
        wait_for(lambda: all(self.status()["load"][k] == v for k, v in pressure.items()), timeout=5)

    def status(self) -> dict:
        return self.client.call("status")

    def history(self, drv: str) -> list[dict]:
        return self.client.call("history", drv=drv)["attempts"]

    def command(self, name: str, *args: str) -> list[str]:
        return [str(Path(sys.executable).parent / name), *args]

    @property
    def cmd_env(self) -> dict[str, str]:
        return {**os.environ, "WEFT_STATE_DIR": str(self.daemon.state)}


def wait_for(check: Callable[[], object], timeout: float = 20.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError("condition not met")


@pytest.fixture
def env() -> Iterator[Env]:
    # Not under /tmp: the sandbox mounts its own /tmp over that path.
    d = Path(tempfile.mkdtemp(prefix="weft-sched-", dir="/var/tmp"))
    os.chmod(d, 0o755)  # the control dir is bound into sandboxes whose users must reach it
    control = d / "control"
    control.mkdir(mode=0o755)
    proc = FakeProc(d / "proc")
    state = d / "state"
    state.mkdir()
    (state / "weft.toml").write_text(SETTINGS.format(proc=d / "proc", control=control))
    daemon = start_daemon(state)
    e = Env(daemon, proc, control)
    yield e
    e.client.close()
    stop_daemon(daemon)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def graph(env: Env) -> Iterator[Graph]:
    g = Graph(env.daemon)
    yield g
    g.close()


def build_in_thread(
    env: Env, drvs: list[str], logs: list[tuple[float, str]] | None = None, **args: object
) -> tuple[threading.Thread, list]:
    out: list = []

    def log(e) -> None:  # type: ignore[no-untyped-def]
        if logs is not None:
            logs.append((time.monotonic(), e.message))

    def run() -> None:
        with BlockingClient(env.daemon.socket, on_log=log) as c:
            out.extend(c.call("build", drvs=drvs, **args))

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_admission_holds_builds_back_under_pressure_and_releases_them(
    env: Env, graph: Graph
) -> None:
    env.load(cpu=90)
    wait_for(lambda: env.status()["parallelism"] == 1)
    assert "cpu pressure 90% > 60%" in env.status()["held_back"]
    drvs = [graph.sh(f"held{i}", "sleep 2; echo done > $out", env={"I": str(i)}) for i in range(3)]
    thread, results = build_in_thread(env, [d.path for d in drvs], max_jobs=3)
    wait_for(lambda: env.status()["queued"] == 2)
    time.sleep(0.5)
    status = env.status()
    assert (len(status["running"]), status["queued"]) == (1, 2)
    env.load(cpu=5)
    # Released: the two held back start while the first still runs.
    wait_for(lambda: len(env.status()["running"]) == 3, timeout=1.5)
    thread.join(30)
    assert [r["status"] for r in results] == ["built"] * 3
    status = env.status()
    assert status["parallelism"] == 3 and status["held_back"] == []

    out = subprocess.run(
        env.command("store-status"), capture_output=True, text=True, env=env.cmd_env, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert "parallelism: 3 of max-jobs 3" in out.stdout and "pressure: cpu 5%" in out.stdout
    out = subprocess.run(
        env.command("store-status", "--json"),
        capture_output=True,
        text=True,
        env=env.cmd_env,
        timeout=30,
    )
    assert json.loads(out.stdout)["max_jobs"] == 3


def test_flaky_derivation_succeeds_on_retry_with_less_parallelism(env: Env, graph: Graph) -> None:
    fail = env.control / "fail"
    fail.write_text("")
    test = f"echo testing; if [ -e {fail} ]; then echo test failed; exit 1; fi"
    flaky = graph.sh("flaky", f"{test}; echo ok > $out")
    user = graph.sh("user", f"cat {flaky} > $out")
    busy = [graph.sh(f"busy{i}", "sleep 1.5; echo b > $out", env={"I": str(i)}) for i in range(2)]
    # Loaded (over the resume mark) but under the admission limit: all three start.
    env.load(cpu=45)
    build = subprocess.Popen(
        env.command("store-build", "-j", "3", *(d.path for d in [user, *busy])),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env.cmd_env,
    )
    wait_for(lambda: env.history(flaky.path))
    fail.unlink()
    stdout, stderr = build.communicate(timeout=60)
    assert build.returncode == 0, stderr
    assert stdout.split() == [user.out, busy[0].out, busy[1].out]
    assert Path(user.out).read_text() == "ok\n"
    assert "retrying flaky (attempt 2 of 3)" in stderr
    assert "built flaky on attempt 2 (flaky)" in stderr

    first, second = env.history(flaky.path)
    assert (first["attempt"], first["outcome"], first["exit_code"]) == (1, "exit", 1)
    assert first["parallelism"] == 3 and first["load_start"]["cpu"] == 45.0
    # The retry waited for the busy builds to drain: it ran alone, after them.
    assert (second["attempt"], second["outcome"], second["parallelism"]) == (2, "built", 1)
    busy_end = max(env.history(b.path)[0]["end_time"] for b in busy)
    assert second["start_time"] >= busy_end
    assert env.client.call("history", drv=flaky.out)["flaky"] is True

    out = subprocess.run(
        env.command("store-history", "--flaky"),
        capture_output=True,
        text=True,
        env=env.cmd_env,
        timeout=30,
    )
    assert out.stdout == f"{flaky.path}\tfailed 1\tbuilt 1\n"
    out = subprocess.run(
        env.command("store-history", flaky.path),
        capture_output=True,
        text=True,
        env=env.cmd_env,
        timeout=30,
    )
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["attempt", "started", "secs", "outcome"]
    assert [line.split()[4] for line in lines[1:]] == ["exit", "built"]
    assert "is marked flaky" in out.stderr

    # Forgotten (named by its output), it has no record and no mark.
    out = subprocess.run(
        env.command("store-history", "--forget", flaky.out),
        capture_output=True,
        text=True,
        env=env.cmd_env,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{flaky.path}: forgot 2 attempts; it is no longer marked flaky\n"
    assert env.client.call("history", drv=flaky.path) == {
        "drv": flaky.path,
        "flaky": False,
        "attempts": [],
    }
    assert env.client.call("history", flaky=True)["flaky"] == []

    # A derivation built with an explicit count, then reported by store-build.
    fail.write_text("")
    again = graph.sh("again", f"if [ -e {fail} ]; then exit 2; fi; echo ok > $out")
    build = subprocess.Popen(
        env.command("store-build", "--retries", "1", again.path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env.cmd_env,
    )
    wait_for(lambda: env.history(again.path))
    fail.unlink()
    _, stderr = build.communicate(timeout=60)
    assert build.returncode == 0, stderr
    assert "again: succeeded on attempt 2 (flaky)" in stderr


def test_deterministic_failures_are_not_retried(env: Env, graph: Graph) -> None:
    broken = graph.sh("broken", "echo broken; exit 1")
    (r,) = graph.build(broken)
    assert r["status"] == "failed" and r["attempts"] == 1
    assert [a["outcome"] for a in env.history(broken.path)] == ["exit"]

    env.load(cpu=45)
    marked = graph.sh("marked", "exit 1", env={"noRetry": "1"})
    mismatch = graph.sh("mismatch", "echo x > $out", output_hash="blake3:" + "0" * 64)
    lazy = graph.sh("lazy", "echo no output")
    loaded = graph.sh("loaded", "exit 1")
    by_drv = {r["drv"]: r for r in graph.build(marked, loaded, keep_going=True)}
    assert by_drv[marked.path]["attempts"] == 1
    # Under pressure, an unmarked failure is retried: twice by default.
    assert by_drv[loaded.path]["attempts"] == 3
    by_drv = {r["drv"]: r for r in graph.build(mismatch, lazy, keep_going=True, retries=3)}
    assert by_drv[mismatch.path]["attempts"] == 1
    assert by_drv[lazy.path]["attempts"] == 1
    assert [a["outcome"] for a in env.history(mismatch.path)] == ["hash-mismatch"]
    assert [a["outcome"] for a in env.history(lazy.path)] == ["missing-output"]
    assert [a["outcome"] for a in env.history(loaded.path)] == ["exit"] * 3
    # --no-retry: none, even under pressure.
    other = graph.sh("other", "exit 1; echo $I", env={"I": "x"})
    (r,) = graph.build(other, retries=0)
    assert r["attempts"] == 1


def test_a_missing_command_fails_once_even_under_load_and_never_counts_as_flaky(
    env: Env, graph: Graph
) -> None:
    env.load(cpu=45)
    missing = graph.sh("missing", "echo looking; no-such-command")
    logs: list[str] = []
    graph.client.on_log = lambda e: logs.append(e.message)
    (r,) = graph.build(missing)
    assert r["status"] == "failed" and r["attempts"] == 1 and not r["flaky"]
    assert "exit code 127" in r["message"]
    assert "missing: not retried: exit code 127 (found no such command) is deterministic" in logs
    (attempt,) = env.history(missing.path)
    assert (attempt["outcome"], attempt["exit_code"]) == ("exit", 127)
    assert env.client.call("history", flaky=True)["flaky"] == []


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _paused(pid: int) -> bool:
    """Whether the daemon has paused `pid`: its freezer cgroup frozen, or it and all its
    descendants stopped."""
    from daemon.sched.freezer import _mount
    from daemon.sched.sigstop import tree

    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "/weft-" not in path:
                continue
            if controllers == "":
                events = Path(f"{_mount(2)}{path}/cgroup.events").read_text()
                return "frozen 1" in events.splitlines()
            if "freezer" in controllers.split(","):
                return Path(f"{_mount(1)}{path}/freezer.state").read_text().strip() == "FROZEN"
    pids = tree(pid)
    return len(pids) >= 2 and {_state(p) for p in pids} == {"T"}


def test_build_paused_under_memory_pressure_resumes_and_completes(env: Env, graph: Graph) -> None:
    # 20 ticks of 0.15 s: 3 s of work each, within a timeout of 4.5 s only if the time paused
    # is not counted.
    script = "i=0; while [ $i -lt 20 ]; do i=$((i+1)); echo $i; sleep 0.15; done; echo $i > $out"
    drvs = [graph.sh(f"ticker{n}", script, env={"N": str(n)}) for n in range(2)]
    logs: list[tuple[float, str]] = []
    thread, results = build_in_thread(env, [d.path for d in drvs], logs, max_jobs=2, timeout=4.5)
    wait_for(lambda: all(r["pid"] for r in env.status()["running"]) and env.status()["running"])
    wait_for(lambda: len(env.status()["running"]) == 2)
    time.sleep(0.3)
    env.load(memory=70)
    running = wait_for(lambda: [r for r in env.status()["running"] if r["paused"]])
    (paused,) = running  # type: ignore[misc]
    # The newest build is the one paused, its whole sandbox stopped.
    assert paused["drv"] == env.status()["running"][-1]["drv"]
    assert _paused(paused["pid"])
    since = time.monotonic()
    time.sleep(2.5)
    until = time.monotonic()
    env.load(memory=5)
    thread.join(30)
    assert [r["status"] for r in results] == ["built", "built"], results
    for d in drvs:
        assert Path(d.out).read_text() == "20\n"
    (attempt,) = env.history(paused["drv"])
    assert attempt["paused"] >= 2.0
    assert attempt["end_time"] - attempt["start_time"] > 4.5
    # Paused, it said nothing; the other went on.
    name = paused["drv"].split("-", 1)[1].removesuffix(".drv")
    during = [m.split("> ")[0] for t, m in logs if since + 0.2 < t < until and "> " in m]
    assert name not in during and during


def test_stopping_a_process_tree_with_signals() -> None:
    from daemon.sched.sigstop import continue_tree, stop_tree, tree

    proc = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"])
    try:
        wait_for(lambda: len(tree(proc.pid)) == 3, timeout=5)
        stop_tree(proc.pid)
        # Signals are delivered, not obeyed at once: a process may run a moment longer.
        wait_for(lambda: {_state(p) for p in tree(proc.pid)} == {"T"}, timeout=5)
        continue_tree(proc.pid)
        wait_for(lambda: "T" not in {_state(p) for p in tree(proc.pid)}, timeout=5)
    finally:
        for p in reversed(tree(proc.pid)):
            os.kill(p, 9)
        proc.wait()

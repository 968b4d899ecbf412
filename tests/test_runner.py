"""The session runner (spawner/runner.c) and the daemon's side of it: builds with
environments through a real daemon, in real sandboxes, the actions written with busybox
sh.  The order of the steps and their log lines, the variables each step sees, what a
hook is handed, how the session's end is reported (a builder's own exit code or signal,
a failed enter or exit step, a timeout), the grace after a timeout, and that builds
without environments go as they did."""

import json
import math
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.daemons import start_daemon, stop_daemon
from daemon.build.session import session_ending
from daemon.build.watch import Ending
from daemon.sched.retry import Cause
from daemon.sched.sigstop import continue_tree, stop_tree
from daemon.wire.spawner import (
    Plan,
    PlanEnvironment,
    PlanStep,
    SpawnRequest,
    decode_report,
    decode_request,
    encode_request,
    exec_room,
)
from spawner.spares import _for_spare
from store.buildenv import Action, BuildEnvironment
from store.recipe import Derivation, action, environment
from tests.daemon_fixtures import Graph

# The daemon's `environment-grace`: room for an exit action after a stop, short enough
# for the tests that wait it out.
GRACE = 2.0
# What a stopped build may take past its limit and the grace: the kill, the reaping and
# the reply, on a loaded machine.
SLACK = 8.0
# A hook that runs what it wraps: skips the `-e` pairs and the `--`, and execs the rest
# (so that the wrapped program's own end is the step's).
PASS = 'while [ "$1" = -e ]; do shift 2; done; shift; exec "$@"'


@pytest.fixture
def g() -> Iterator[Graph]:
    # Under /var/tmp: the sandbox mounts its own /tmp.
    root = Path(tempfile.mkdtemp(prefix="weft-runner-", dir="/var/tmp"))
    state = root / "state"
    state.mkdir()
    (state / "weft.toml").write_text(f"environment-grace = {GRACE}\n")
    daemon = start_daemon(state)
    graph = Graph(daemon)
    try:
        yield graph
    finally:
        graph.close()
        stop_daemon(daemon)
        shutil.rmtree(root, ignore_errors=True)


def sh(g: Graph, script: str, timeout: float | None = None) -> Action:
    return action(f"{g.bb}/bin/busybox", "sh", "-c", script, timeout=timeout)


def wrapper(g: Graph, name: str = "wrap", hook: str = PASS, **actions: Action) -> BuildEnvironment:
    """A wrapper whose hooks say which they are and run `hook`, with what they wrap as
    their arguments ($0 is "hook")."""

    def run(which: str) -> Action:
        return action(f"{g.bb}/bin/busybox", "sh", "-c", f"echo hook {which}; {hook}", "hook")

    return environment(
        name,
        wrap_env_enter=run("wrap_env_enter"),
        wrap_build=run("wrap_build"),
        wrap_env_exit=run("wrap_env_exit"),
        **actions,
    )


def log_of(g: Graph, drv: Derivation) -> str:
    data = bytearray()
    g.client.download("log", data.extend, path=drv.path)
    return data.decode()


def weft_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("weft: ")]


def steps(*labels: str) -> list[str]:
    """The log lines of steps that all succeed."""
    return [line for label in labels for line in (f"weft: {label}", f"weft: {label} done")]


def attempts(g: Graph, drv: Derivation) -> list[tuple[str, int]]:
    history = g.client.call("history", drv=drv.path)["attempts"]
    return [(a["outcome"], a["exit_code"]) for a in history]


def test_steps_run_in_session_order_and_the_log_shows_each(g: Graph) -> None:
    say = lambda what: sh(g, f"echo {what}")  # noqa: E731
    plain = g.sh(
        "plain",
        "echo building; echo ok > $out",
        environments=[
            environment("a", enter=say("entering a"), exit=say("exiting a")),
            environment("b", enter=say("entering b"), exit=say("exiting b")),
        ],
    )
    (r,) = g.build(plain)
    assert r["status"] == "built", r
    log = log_of(g, plain)
    assert weft_lines(log) == steps("enter a", "enter b", "build", "exit b", "exit a")
    # Each step's output between its lines.
    order = ["weft: enter a", "entering a", "weft: enter b", "entering b", "weft: build"]
    order += ["building", "weft: exit b", "exiting b", "weft: exit a", "exiting a"]
    assert [line for line in log.splitlines() if line in order] == order
    # And as they come, to whoever waits for the build (`store-build -L`).
    live = [m.removeprefix("plain> ") for m, _ in g.logs if m.startswith("plain> weft: ")]
    assert live == weft_lines(log)

    # Environments after the wrapper are wrapped; the wrapper's own actions and those
    # before it are not; an environment without an exit action has no hook run for it.
    wrapped = g.sh(
        "wrapped",
        "echo ok > $out",
        environments=[
            environment("outer", enter=say("outer in"), exit=say("outer out")),
            wrapper(g, enter=say("wrapper in"), exit=say("wrapper out")),
            environment("inner", enter=say("inner in")),
            environment("inner2", enter=say("inner2 in"), exit=say("inner2 out")),
        ],
    )
    (r,) = g.build(wrapped)
    assert r["status"] == "built", r
    log = log_of(g, wrapped)
    assert weft_lines(log) == steps(
        "enter outer",
        "enter wrap",
        "wrap_env_enter inner",
        "wrap_env_enter inner2",
        "wrap_build",
        "wrap_env_exit inner2",
        "exit wrap",
        "exit outer",
    )
    assert log.count("hook wrap_env_enter") == 2 and log.count("hook wrap_env_exit") == 1
    assert "inner in" in log and "inner2 out" in log


def test_variables_and_weft_env_lines_reach_later_steps_and_an_unset_wins(g: Graph) -> None:
    show = (
        'echo "$A_VAR ${SET_BY_A-unset} ${BOTH-unset} ${BOTH2-unset} ${EARLY-unset} ${B_VAR-unset}"'
    )
    a_prints = "; ".join(
        [
            "echo weft_env: SET_BY_A=yes",
            "echo weft_env: BOTH=set",
            "echo weft_unset_env: BOTH",
            "echo weft_unset_env: BOTH2",
            "echo weft_env: BOTH2=set",
            "echo weft_unset_env: EARLY",
            "echo 'weft_env: 1BAD=x'",
            f"{show} > /build/a-saw",
        ]
    )
    drv = g.sh(
        "variables",
        f"{show} > $out; cat /build/a-saw /build/b-saw >> $out",
        env={"EARLY": "from-the-derivation"},
        environments=[
            environment(
                "a",
                variables={"A_VAR": "from-a"},
                enter=sh(g, a_prints),
                exit=sh(g, f"{show} >> $out"),
            ),
            environment(
                "b",
                variables={"B_VAR": "from-b"},
                enter=sh(g, f"{show} > /build/b-saw"),
                exit=sh(g, f"{show} >> $out"),
            ),
        ],
    )
    (r,) = g.build(drv)
    assert r["status"] == "built", r
    lines = Path(drv.out).read_text().splitlines()
    assert lines == [
        "from-a yes unset unset unset from-b",  # the builder
        "from-a unset unset unset from-the-derivation unset",  # enter a: before its output
        "from-a yes unset unset unset from-b",  # enter b
        "from-a yes unset unset unset from-b",  # exit b
        "from-a yes unset unset unset unset",  # exit a: b is exited
    ]
    log = log_of(g, drv)
    assert "weft_env: SET_BY_A=yes" in log  # the scanned output still reaches the log
    assert "weft: enter a: a malformed weft_env line ignored" in log


def test_a_hook_gets_the_wrapped_action_as_argv_and_as_json(g: Graph) -> None:
    # Both kept as hook-.weft-wrap-N.argv and .json (N: the step's index in the session).
    record = (
        'n=hook$(basename "$WEFT_WRAP_JSON" .json); printf "%s\\n" "$@" > /build/$n.argv; '
        'cp "$WEFT_WRAP_JSON" /build/$n.json; ' + PASS
    )
    builder = "mkdir $out; cp /build/hook.* $out/"
    inner_enter = sh(g, "echo weft_env: PRINTED=by-inner", timeout=30)
    drv = g.sh(
        "hooked",
        builder,
        env={"FROM_DRV": "d"},
        environments=[
            wrapper(g, hook=record, variables={"W_VAR": "w"}),
            environment("inner", variables={"I_VAR": "i"}, enter=inner_enter),
        ],
    )
    (r,) = g.build(drv, retries=0)
    assert r["status"] == "built", r
    out = Path(drv.out)
    # The derivation's own variables, the environments' and what weft_env lines set; none
    # of weft's defaults (HOME, NIX_STORE, TMPDIR, ...), sorted by name.
    base = dict(drv.drv.env)
    enter_env = dict(sorted({**base, "W_VAR": "w", "I_VAR": "i"}.items()))
    build_env = dict(sorted({**enter_env, "PRINTED": "by-inner"}.items()))
    for name, env, wrapped, kind, where, timeout in (
        ("0", enter_env, inner_enter, "enter", "inner", 30),
        ("1", build_env, None, "build", None, None),
    ):
        argv = (out / f"hook.weft-wrap-{name}.argv").read_text().splitlines()
        pairs = [p for i, p in enumerate(argv) if i and argv[i - 1] == "-e"]
        assert argv[: 2 * len(pairs)] == [x for p in pairs for x in ("-e", p)]
        assert pairs == [f"{k}={v}" for k, v in env.items()]
        assert "HOME" not in " ".join(pairs) and "NIX_BUILD_TOP" not in " ".join(pairs)
        what = wrapped or Action(drv.drv.builder, drv.drv.args)
        command = [what.command, *what.args]
        assert argv[2 * len(pairs) :] == ["--", *command]
        doc = json.loads((out / f"hook.weft-wrap-{name}.json").read_text())
        assert doc == {
            "command": command[0],
            "args": command[1:],
            "environment": env,
            "timeout": timeout,
            "wraps": {"kind": kind, "environment": where},
        }


def test_a_wrapped_build_makes_what_the_unwrapped_one_makes(g: Graph) -> None:
    builder = "mkdir $out; echo made > $out/file; ln -s file $out/link"
    bare = g.sh("same", builder)
    wrapped = g.sh("same", builder, environments=[wrapper(g)])
    assert bare.out != wrapped.out
    results = g.build(bare, wrapped)
    assert [r["status"] for r in results] == ["built", "built"], results
    infos = [g.client.call("path-info", path=d.out) for d in (bare, wrapped)]
    assert infos[0]["nar_hash"] == infos[1]["nar_hash"]


def test_the_builders_own_exit_code_and_signal_are_reported(g: Graph) -> None:
    exits = g.sh("exits", "exit 3", environments=[wrapper(g)])
    (r,) = g.build(exits, retries=0)
    assert r["status"] == "failed"
    assert r["message"].startswith(f"builder for '{exits.path}' failed with exit code 3")
    assert attempts(g, exits) == [("exit", 3)]
    for name, envs in (
        ("segv-wrapped", [wrapper(g)]),
        ("segv", [environment("e", enter=sh(g, ":"))]),
    ):
        segv = g.sh(name, "kill -SEGV $$", environments=envs)
        (r,) = g.build(segv, retries=0)
        assert r["status"] == "failed"
        assert r["message"].startswith(
            f"builder for '{segv.path}' failed: killed by signal SIGSEGV"
        )
        assert "139" not in r["message"]
        assert attempts(g, segv) == [("signal", -signal.SIGSEGV)]
        assert "failed: killed by signal SIGSEGV" in log_of(g, segv)


def test_a_failing_enter_runs_the_exit_actions_due_in_reverse(g: Graph) -> None:
    ok = lambda what: sh(g, f"echo {what}")  # noqa: E731
    drv = g.sh(
        "enter-fails",
        "echo never > $out",
        environments=[
            environment("a", enter=ok("in a"), exit=ok("out a")),
            environment("b", enter=ok("in b")),
            environment("c", enter=sh(g, "exit 4"), exit=ok("out c")),
            environment("d", enter=ok("in d"), exit=ok("out d")),
        ],
    )
    (r,) = g.build(drv, retries=0)
    assert r["status"] == "failed"
    assert r["message"].startswith(f"builder for '{drv.path}' failed at enter c: exit code 4")
    assert weft_lines(log_of(g, drv)) == [
        *steps("enter a", "enter b"),
        "weft: enter c",
        "weft: enter c failed: exit code 4",
        *steps("exit c", "exit a"),
    ]
    assert attempts(g, drv) == [("exit", 4)]
    # A failing exit action fails a build that succeeded, after the other exits ran.
    late = g.sh(
        "exit-fails",
        "echo built > $out",
        environments=[
            environment("a", exit=ok("out a")),
            environment("b", exit=sh(g, "kill -KILL $$")),
        ],
    )
    (r,) = g.build(late, retries=0)
    assert r["status"] == "failed"
    assert r["message"].startswith(
        f"builder for '{late.path}' failed at exit b: killed by signal SIGKILL"
    )
    assert weft_lines(log_of(g, late))[-4:] == [
        "weft: exit b",
        "weft: exit b failed: killed by signal SIGKILL",
        *steps("exit a"),
    ]


def test_a_program_that_cannot_be_started_fails_its_step(g: Graph) -> None:
    missing = f"{g.bb}/bin/no-such-program"
    drv = g.sh(
        "no-program",
        "echo never > $out",
        environments=[environment("a", enter=action(missing), exit=sh(g, "echo out a"))],
    )
    (r,) = g.build(drv, retries=0)
    assert r["status"] == "failed"
    assert r["message"].startswith(
        f"builder for '{drv.path}' failed at enter a: the program {missing} could not be "
        "started: No such file or directory (ENOENT)"
    )
    assert weft_lines(log_of(g, drv)) == [
        "weft: enter a",
        f"weft: enter a failed: the program {missing} could not be started: "
        "No such file or directory",
        *steps("exit a"),
    ]
    # As a shell says it, which the retry policy knows for deterministic.
    assert attempts(g, drv) == [("exit", 127)]


def leftovers(marker: str) -> list[str]:
    found = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True)
    return found.stdout.splitlines()


def test_an_action_timeout_stops_its_group_and_the_exit_actions_still_run(g: Graph) -> None:
    marker = f"sleep {60 + uuid.uuid4().int % 1000 / 1000:.3f}"
    drv = g.sh(
        "action-timeout",
        "echo never > $out",
        environments=[
            environment("a", exit=sh(g, "echo out a")),
            # Ignores SIGTERM: killed after the grace, with what it started.
            environment("b", enter=sh(g, f"trap '' TERM; {marker} & {marker}", timeout=1)),
        ],
    )
    started = time.monotonic()
    (r,) = g.build(drv, retries=0)
    took = time.monotonic() - started
    assert r["status"] == "failed"
    assert r["message"].startswith(
        f"builder for '{drv.path}' failed at enter b: timed out after 1 s"
    )
    assert 1 + GRACE <= took < 1 + GRACE + SLACK
    assert weft_lines(log_of(g, drv)) == [
        "weft: enter b",
        "weft: enter b failed: timed out after 1 s",
        *steps("exit a"),
    ]
    assert attempts(g, drv) == [("timeout", -signal.SIGKILL)]
    assert leftovers(marker) == []


def test_a_build_timeout_lets_the_exit_actions_run_within_the_grace(g: Graph) -> None:
    marker = f"sleep {60 + uuid.uuid4().int % 1000 / 1000:.3f}"
    drv = g.sh(
        "build-timeout",
        f"echo started; {marker} & {marker}",
        environments=[
            environment("a", exit=sh(g, "echo cleaning up a")),
            environment("b", exit=sh(g, "echo cleaning up b")),
        ],
    )
    started = time.monotonic()
    (r,) = g.build(drv, timeout=1, retries=0)
    took = time.monotonic() - started
    assert r["status"] == "failed"
    assert r["message"].startswith(f"builder for '{drv.path}' timed out after 1 s, during build")
    assert took < 1 + GRACE + SLACK
    log = log_of(g, drv)
    assert weft_lines(log) == [
        "weft: build",
        "weft: build failed: killed by signal SIGTERM",
        *steps("exit b", "exit a"),
    ]
    assert "cleaning up b\n" in log and "cleaning up a\n" in log
    assert attempts(g, drv) == [("timeout", -signal.SIGTERM)]
    assert leftovers(marker) == []

    # An exit action that does not end in time is killed with the whole sandbox.
    hung = g.sh(
        "exit-hangs",
        f"{marker}",
        environments=[
            environment("a", exit=sh(g, "echo out a")),
            environment("b", exit=sh(g, f"echo hanging; {marker}")),
        ],
    )
    started = time.monotonic()
    (r,) = g.build(hung, timeout=1, retries=0)
    took = time.monotonic() - started
    assert r["status"] == "failed" and "timed out after 1 s, during build" in r["message"]
    assert 1 + GRACE * 0.8 <= took < 1 + GRACE + SLACK
    lines = weft_lines(log_of(g, hung))
    assert lines == [
        "weft: build",
        "weft: build failed: killed by signal SIGTERM",
        "weft: exit b",
        "weft: exit b failed: killed by signal SIGKILL",
        "weft: exit a skipped: the grace is over",
    ]
    assert leftovers(marker) == []


def test_a_cancelled_build_still_runs_its_exit_actions(g: Graph) -> None:
    building, exiting = (f"sleep {n + uuid.uuid4().int % 1000 / 1000:.3f}" for n in (60, 30))
    drv = g.sh(
        "cancelled",
        building,
        environments=[environment("a", exit=sh(g, f"{exiting}; echo never"))],
    )
    code = (
        "import sys; from daemon.cli.blocking import BlockingClient; "
        "BlockingClient(sys.argv[1]).call('build', drvs=[sys.argv[2]])"
    )
    client = subprocess.Popen([sys.executable, "-c", code, g.daemon.socket, drv.path])
    try:
        until(lambda: leftovers(building))
        # The client goes: its build is cancelled, the daemon stops the session, and
        # the runner runs the exit action.
        client.kill()
        until(lambda: leftovers(exiting))
        assert leftovers(building) == []
        # Then the grace is over, and the sandbox is gone.
        until(lambda: not leftovers(exiting), GRACE + SLACK)
    finally:
        client.kill()
        client.wait()


def until(done: Callable[[], object], within: float = 10) -> None:
    deadline = time.monotonic() + within
    while not done():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_time_the_sandbox_spends_paused_does_not_count_toward_a_timeout(g: Graph) -> None:
    marker = f"sleep {1.5 + uuid.uuid4().int % 1000 / 10000:.4f}"
    drv = g.sh(
        "paused",
        "echo ok > $out",
        # 3.5 s for 2.5 s of sleeping, paused 5 s in the first sleep: at most 1.5 s of a
        # pause counts (a wake-up's worth), so the sleeping still fits.
        environments=[environment("a", enter=sh(g, f"{marker}; sleep 1", timeout=3.5))],
    )
    results: list[list[dict]] = []
    building = threading.Thread(target=lambda: results.append(g.build(drv, retries=0)))
    building.start()
    try:
        until(lambda: leftovers(marker))
        # The runner: the sleep's ancestor that is the daemon's child.
        runner = int(leftovers(marker)[0].split()[0])
        while (parent := _parent(runner)) != g.daemon.proc.pid:
            runner = parent
        # Paused as the scheduler pauses a build where it has no freezer, for longer
        # than the action's timeout.
        stop_tree(runner)
        time.sleep(5)
        continue_tree(runner)
    finally:
        building.join()
    ((r,),) = results
    assert r["status"] == "built", r


def test_a_sigterm_from_inside_the_sandbox_stops_nothing(g: Graph) -> None:
    drv = g.sh(
        "term-inside",
        "kill -TERM 1; sleep 0.3; echo survived > $out",
        environments=[environment("a", enter=sh(g, ":"))],
    )
    (r,) = g.build(drv, retries=0)
    assert r["status"] == "built", r
    assert Path(drv.out).read_text() == "survived\n"


def test_a_wrapped_command_line_over_the_system_limit_fails_naming_the_hook(g: Graph) -> None:
    # Environment variables that fit execve's limit once (the unwrapped builder's
    # environment) but not twice (the hook's environment and its -e pairs).
    room = exec_room(resource.getrlimit(resource.RLIMIT_STACK)[0])
    size = 100_000
    count = math.ceil(room * 0.55 / size)
    big = {f"BIG{i}": "x" * size for i in range(count)}
    builder = "echo built > $out"
    bare = g.sh("big", builder, environments=[environment("vars", variables=big)])
    wrapped = g.sh("big", builder, environments=[wrapper(g), environment("vars", variables=big)])
    bare_result, wrapped_result = g.build(bare, wrapped, retries=0, keep_going=True)
    assert bare_result["status"] == "built", bare_result
    assert wrapped_result["status"] == "failed"
    message = wrapped_result["message"]
    assert message.startswith(
        f"builder for '{wrapped.path}' failed at wrap_build: the hook {g.bb}/bin/busybox "
        "could not be started: Argument list too long (E2BIG)"
    ), message[:300]
    assert attempts(g, wrapped) == [("exit", 126)]


def test_builds_without_environments_send_the_request_they_always_sent() -> None:
    request = SpawnRequest(
        builder="/s/b", root="/r", build_dir="/b", store_dir="/s", host_uid=1, host_gid=2
    )
    fields = encode_request(request)
    assert "plan" not in fields
    assert decode_request(dict(fields)) == request
    strings = _for_spare(request, [], 7).split(b"\0")
    assert strings[:7] == [b"weft-spare-2", b"/s/b", b"/b", b"/r/s", b"/s", b"7", b"0"]
    assert b"plan" not in strings


def test_a_plan_crosses_to_the_spawner_whole() -> None:
    step = PlanStep("build", -1, "wrap_build", "/s/h", ["-x"], 1.5, "wrap_build", "/s/b", [], None)
    plan = Plan(2.0, ["out"], [PlanEnvironment("w", {"K": "v"})], [step])
    request = SpawnRequest(
        builder="/s/b", root="/r", build_dir="/b", store_dir="/s", host_uid=1, host_gid=2, plan=plan
    )
    assert decode_request(encode_request(request)) == request
    strings = _for_spare(request, [], 7).split(b"\0")[:-1]
    assert strings[strings.index(b"plan") :] == [
        b"plan", b"2000", b"1", b"out", b"1", b"w", b"1", b"K=v", b"1",
        b"build", b"-1", b"wrap_build", b"/s/h", b"1", b"-x", b"1.5",
        b"wrap_build", b"/s/b", b"0", b"",
    ]  # fmt: skip


def test_only_a_whole_report_is_believed() -> None:
    step = PlanStep("build", -1, "build", "/s/b", [])
    plan = Plan(2.0, [], [PlanEnvironment("e", {})], [step])
    runner = Ending(1, "", Cause.EXIT)
    assert decode_report(b"weft-runner-1 0 signal 11 0 -1\n", plan.steps) is not None
    forgeries = (b"", b"weft-runner-1 0 signal 11 0\n", b"weft-runner-1 5 ok 0 0 -1\n")
    # A step without a timeout cannot have timed out.
    forgeries += (b"weft-runner-1 0 timeout 1 0 -1\n", b"weft-runner-1 -1 timeout 1 0 -1\n")
    for forged in forgeries:
        assert decode_report(forged, plan.steps) is None
        ending = session_ending(runner, plan, forged)
        assert (ending.cause, ending.code) == (Cause.SETUP, 1)
        assert "left no report" in ending.failed
    ending = session_ending(runner, plan, b"weft-runner-1 0 signal 11 0 -1\n")
    assert (ending.code, ending.failed) == (-11, ": killed by signal SIGSEGV")


def test_a_runner_killed_without_a_report_ends_the_build_as_that_signal() -> None:
    # The OOM killer can kill a pid namespace's init: the retry policy sees the signal.
    plan = Plan(2.0, [], [PlanEnvironment("e", {})], [PlanStep("build", -1, "build", "/s/b", [])])
    ending = session_ending(Ending(-signal.SIGKILL, "", Cause.EXIT), plan, b"")
    assert (ending.cause, ending.code) == (Cause.EXIT, -signal.SIGKILL)
    assert ending.failed == ": its session runner left no report (killed by signal SIGKILL)"
    timed = PlanStep("build", -1, "build", "/s/b", [], 1.5)
    report = b"weft-runner-1 0 timeout 1 0 -1\n"
    ending = session_ending(Ending(1, "", Cause.EXIT), Plan(2.0, [], [], [timed]), report)
    assert (ending.cause, ending.failed) == (Cause.TIMEOUT, " at build: timed out after 1.5 s")


def test_a_cancelled_chatty_build_runs_its_exit_actions_within_the_grace(g: Graph) -> None:
    # The builder fills the log pipe; once its client is gone nobody would read it, and
    # the runner could not say that the build step ended, nor run the exit action.
    building, exiting = (f"sleep {n + uuid.uuid4().int % 1000 / 1000:.3f}" for n in (60, 30))
    drv = g.sh(
        "cancelled-chatty",
        f"{g.bb}/bin/busybox yes & {building}",
        environments=[environment("a", exit=sh(g, f"{exiting}; echo never"))],
    )
    code = (
        "import sys; from daemon.cli.blocking import BlockingClient; "
        "BlockingClient(sys.argv[1]).call('build', drvs=[sys.argv[2]], max_log_size=1 << 30)"
    )
    client = subprocess.Popen(
        [sys.executable, "-c", code, g.daemon.socket, drv.path], stdout=subprocess.DEVNULL
    )
    try:
        until(lambda: leftovers(building))
        time.sleep(0.5)  # the pipe is full by now
        client.kill()
        until(lambda: leftovers(exiting), GRACE)
        until(lambda: not leftovers(exiting), GRACE + SLACK)
    finally:
        client.kill()
        client.wait()


@pytest.mark.parametrize("leave", ["", "setsid "], ids=["in-its-group", "own-session"])
def test_output_an_enter_step_leaves_running_does_not_hold_the_session(
    g: Graph, leave: str
) -> None:
    # What the enter step left running writes on into a pipe the runner no longer reads
    # once the step has ended: it gets EPIPE, and none of its output comes after the step.
    drv = g.sh(
        f"flooding-{len(leave)}",
        "sleep 1; echo built > $out",
        environments=[
            environment("a", exit=sh(g, "echo cleaning up")),
            environment("b", enter=sh(g, f"{leave}{g.bb}/bin/busybox yes > /dev/stdout & exit 0")),
        ],
    )
    started = time.monotonic()
    (r,) = g.build(drv, timeout=30, retries=0, max_log_size=1 << 30)
    assert r["status"] == "built", r
    assert time.monotonic() - started < SLACK
    log = log_of(g, drv)
    assert weft_lines(log) == steps("enter b", "build", "exit a")
    assert "cleaning up\n" in log
    assert "y" not in log.split("weft: enter b done\n")[1].splitlines()


def test_the_runner_holds_no_capability_while_steps_run(g: Graph) -> None:
    drv = g.sh(
        "capabilities",
        "grep -e CapEff -e CapPrm -e NoNewPrivs /proc/1/status > $out",
        environments=[environment("e", enter=sh(g, "true"))],
    )
    (r,) = g.build(drv, retries=0)
    assert r["status"] == "built", r
    status = dict(line.split(":\t") for line in Path(drv.out).read_text().splitlines())
    assert status == {"CapPrm": "0" * 16, "CapEff": "0" * 16, "NoNewPrivs": "1"}


def test_what_a_builder_leaves_running_is_killed_before_the_exit_steps(g: Graph) -> None:
    drv = g.sh(
        "leftover",
        "mkdir $out; (sleep 1; echo late > $out/late) & exit 0",
        environments=[environment("a", exit=sh(g, "sleep 2"))],
    )
    (r,) = g.build(drv, retries=0)
    assert r["status"] == "built", r
    assert list(Path(drv.out).iterdir()) == []


def test_a_hooks_json_file_is_utf_8_whatever_bytes_the_variables_hold(g: Graph) -> None:
    # An invalid byte, a valid é, a UTF-16 surrogate's three bytes, an ASCII x.
    value = r"\377\303\251\355\240\200x"
    drv = g.sh(
        "json-bytes",
        "exit 1",
        environments=[
            environment("bytes", enter=sh(g, f"printf 'weft_env: BYTES={value}\\n'")),
            wrapper(g, hook='cp "$WEFT_WRAP_JSON" "$out"'),
        ],
    )
    (r,) = g.build(drv, retries=0)
    assert r["status"] == "built", r
    wrap = json.loads(Path(drv.out).read_bytes().decode("utf-8"))
    assert wrap["environment"]["BYTES"] == "\u00ffé\u00ed\u00a0\u0080x"

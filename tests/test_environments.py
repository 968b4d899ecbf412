"""Build environments end to end (docs/environments.md), one test per "Done when" of issue
21 and the shipped examples: recipes built with `store-build`, logs read with `store-log`
and attempts with `store-history`, the commands run as a user runs them, against a real
daemon whose builds run in real sandboxes.  The logging wrapper is the shipped one,
`examples/environments/instrument.sh`: it logs a line per hook and execs what it wraps."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.daemons import DaemonProc, start_daemon, stop_daemon

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
EXAMPLES = ROOT / "examples" / "environments"
# `environment-grace` of the tests' daemon: long enough for a quick exit action to run
# after a timeout, short enough that the test that waits it out stays short.
GRACE = 3.0
# What a build that is killed after the grace may take beyond its timeout and the grace:
# the daemon's SIGKILL, the reaping and the command's own start, on a loaded machine.
SLACK = 10.0

PREAMBLE = f"""\
from store.recipe import action, busybox, derivation, environment, source

bb = busybox()
sh = f"{{bb}}/bin/busybox"
path = {{"PATH": f"{{bb}}/bin"}}
instrument = source({str(EXAMPLES / "instrument.sh")!r})


def run(script, timeout=None):
    return action(sh, "sh", "-c", script, timeout=timeout)


def hook(name):
    return [sh, "sh", instrument, "hook", name]


def logging(name="logging"):
    return environment(
        name,
        enter=[sh, "sh", instrument, "enter"],
        exit=[sh, "sh", instrument, "exit"],
        wrap_env_enter=hook("wrap_env_enter"),
        wrap_build=hook("wrap_build"),
        wrap_env_exit=hook("wrap_env_exit"),
    )
"""
# A line the instrumentation wrapper logs for one hook: `instrument: +0.01 s: wrap_build, ...`.
HOOK_LINE = re.compile(r"instrument: \+[0-9.]+ s: (wrap_\w+), ")


class Weft:
    """The commands, run as processes on the daemon's state dir, and recipes beside it."""

    def __init__(self, base: Path, daemon: DaemonProc) -> None:
        self.base = base
        self.daemon = daemon

    def run(self, name: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "WEFT_STATE_DIR": str(self.daemon.state)}
        return subprocess.run(
            [BIN / name, *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=cwd or self.base,
            timeout=120,
        )

    def recipe(self, body: str) -> str:
        path = self.base / f"recipe-{uuid.uuid4().hex[:8]}.py"
        path.write_text(PREAMBLE + textwrap.dedent(body))
        return str(path)

    def build(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return self.run("store-build", "--no-retry", *args, cwd=cwd)

    def log(self, target: str) -> str:
        out = self.run("store-log", target)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def drv(self, name: str) -> str:
        """The one .drv named `name` in the store."""
        (found,) = (self.daemon.state / "store").glob(f"*-{name}.drv")
        return str(found)

    def history(self, drv: str) -> list[dict[str, str]]:
        """`store-history`'s table, a dict of column to cell per attempt."""
        out = self.run("store-history", drv)
        assert out.returncode == 0, out.stderr
        header, *rows = out.stdout.splitlines()
        names = header.split()
        starts = [header.index(n) for n in names]
        ends = [*starts[1:], None]
        return [
            {n: row[s:e].strip() for n, s, e in zip(names, starts, ends, strict=True)}
            for row in rows
        ]


@pytest.fixture
def weft() -> Iterator[Weft]:
    # Not under /tmp: the sandbox mounts its own /tmp over that path.
    base = Path(tempfile.mkdtemp(prefix="weft-envs-", dir="/var/tmp"))
    state = base / "state"
    state.mkdir()
    (state / "weft.toml").write_text(f"environment-grace = {GRACE}\n")
    daemon = start_daemon(state)
    try:
        yield Weft(base, daemon)
        stop_daemon(daemon)
        assert daemon.proc.returncode == 0, daemon.log.read_text()
    finally:
        stop_daemon(daemon)
        shutil.rmtree(base, ignore_errors=True)


def steps(log: str) -> list[str]:
    """The runner's lines of a build log: `weft: enter x`, `weft: enter x done`, ..."""
    return [line for line in log.splitlines() if line.startswith("weft: ")]


def ran(*labels: str) -> list[str]:
    """The runner's lines for steps that ran and succeeded, in that order."""
    return [line for label in labels for line in (f"weft: {label}", f"weft: {label} done")]


def step_lines(log: str, label: str) -> list[str]:
    """The lines a step wrote: between `weft: LABEL` and the line that ends it."""
    lines = log.splitlines()
    start = lines.index(f"weft: {label}") + 1
    end = next(i for i in range(start, len(lines)) if lines[i].startswith(f"weft: {label} "))
    return lines[start:end]


def test_a_logging_wrapper_wraps_the_inner_enter_and_the_build_and_nothing_else(
    weft: Weft,
) -> None:
    recipe = weft.recipe(
        """
        outer = environment("outer", enter=run("echo outer-enter"), exit=run("echo outer-exit"))
        inner = environment("inner", enter=run("echo 'weft_env: INNER=from-inner'"))
        app = derivation("app", sh, ["sh", "-c", "echo $INNER > $out"], env=path,
                         environments=[outer, logging(), inner])
        """
    )
    built = weft.build(f"{recipe}:app")
    assert built.returncode == 0, built.stderr
    out = built.stdout.strip()
    assert Path(out).read_text() == "from-inner\n"
    log = weft.log(out)
    assert steps(log) == ran(
        "enter outer",
        "enter logging",
        "wrap_env_enter inner",
        "wrap_build",
        "exit logging",
        "exit outer",
    )
    # The hooks ran twice, each in its own step, with the action it replaced as its argv.
    hooked = [line for line in log.splitlines() if HOOK_LINE.match(line)]
    assert [HOOK_LINE.match(line)[1] for line in hooked] == ["wrap_env_enter", "wrap_build"]
    assert hooked[0] in step_lines(log, "wrap_env_enter inner")
    assert hooked[0].endswith("sh -c echo 'weft_env: INNER=from-inner'")
    assert hooked[1] in step_lines(log, "wrap_build")
    assert hooked[1].endswith("sh -c echo $INNER > $out")
    # The outer environment and the wrapper's own actions ran as they are.
    assert step_lines(log, "enter outer") == ["outer-enter"]
    assert step_lines(log, "exit outer") == ["outer-exit"]
    assert "instrument: session started" in step_lines(log, "enter logging")
    ended = re.compile(r"instrument: \+[0-9.]+ s: session ended")
    assert any(ended.fullmatch(line) for line in step_lines(log, "exit logging"))


def test_the_wrapped_build_has_the_unwrapped_builds_archive(weft: Weft) -> None:
    # A tree with an executable, a symlink and a directory: what an archive records.
    recipe = weft.recipe(
        """
        script = (
            "mkdir -p $out/bin $out/share && echo $WORD > $out/share/word"
            " && printf '#!/bin/sh\\\\necho hi\\\\n' > $out/bin/hi && chmod +x $out/bin/hi"
            " && ln -s ../share/word $out/bin/word"
        )
        word = environment("word", enter=run("echo 'weft_env: WORD=same'"), exit=run("true"))
        plain = derivation("tree", sh, ["sh", "-c", script], env=path, environments=[word])
        wrapped = derivation("tree", sh, ["sh", "-c", script], env=path,
                             environments=[logging(), word])
        """
    )
    outs = []
    for name in ("plain", "wrapped"):
        built = weft.build(f"{recipe}:{name}")
        assert built.returncode == 0, built.stderr
        outs.append(built.stdout.strip())
    assert outs[0] != outs[1]  # the environments are part of the derivation
    assert "wrap_build" in {m[1] for m in map(HOOK_LINE.match, weft.log(outs[1]).splitlines()) if m}
    info = weft.run("store-query", "--info", *outs)
    assert info.returncode == 0, info.stderr
    (_, plain_hash, plain_size), (_, wrapped_hash, wrapped_size) = (
        line.split("\t") for line in info.stdout.splitlines()
    )
    assert (wrapped_hash, wrapped_size) == (plain_hash, plain_size)


@pytest.mark.parametrize("where", ["build", "enter"])
def test_an_inner_exit_3_fails_the_build_with_exit_code_3(weft: Weft, where: str) -> None:
    # Under the wrapper, the builder or the inner environment's enter says `exit 3`.
    fail, ok = "echo about to fail; exit 3", "echo ok > $out"
    enter, builder = ("true", fail) if where == "build" else (fail, ok)
    recipe = weft.recipe(
        f"""
        inner = environment("inner", enter=run({enter!r}), exit=run("echo inner-exit"))
        three = derivation("three", sh, ["sh", "-c", {builder!r}], env=path,
                           environments=[logging(), inner])
        """
    )
    built = weft.build(f"{recipe}:three")
    assert built.returncode == 1
    assert "exit code 3" in built.stderr and "about to fail" in built.stderr, built.stderr
    drv = weft.drv("three")
    (attempt,) = weft.history(drv)
    assert (attempt["outcome"], attempt["exit"]) == ("exit", "3")
    log = weft.log(drv)
    # The session stopped where it failed; the exit steps ran after it all the same.
    failed = "wrap_build" if where == "build" else "wrap_env_enter inner"
    before = ["wrap_env_enter inner"] if where == "build" else []
    assert steps(log) == [
        *ran("enter logging", *before),
        f"weft: {failed}",
        f"weft: {failed} failed: exit code 3",
        *ran("wrap_env_exit inner", "exit logging"),
    ]
    assert "inner-exit" in step_lines(log, "wrap_env_exit inner")
    if where == "enter":
        assert failed in built.stderr


def test_an_inner_wrapped_exit_3_fails_a_built_build_naming_the_hook(weft: Weft) -> None:
    recipe = weft.recipe(
        """
        inner = environment("inner", exit=run("echo about to fail; exit 3"))
        exit_three = derivation("exit-three", sh, ["sh", "-c", "echo ok > $out"], env=path,
                           environments=[logging(), inner])
        """
    )
    built = weft.build(f"{recipe}:exit_three")
    assert built.returncode == 1
    failure = "failed at wrap_env_exit inner: exit code 3"
    assert failure in built.stderr, built.stderr
    drv = weft.drv("exit-three")
    # The history has the step's exit code as the attempt's (its error is in the build's).
    (attempt,) = weft.history(drv)
    assert (attempt["outcome"], attempt["exit"]) == ("exit", "3")
    log = weft.log(drv)
    assert steps(log) == [
        *ran("enter logging", "wrap_build"),
        "weft: wrap_env_exit inner",
        "weft: wrap_env_exit inner failed: exit code 3",
        *ran("exit logging"),
    ]
    assert "about to fail" in step_lines(log, "wrap_env_exit inner")


@pytest.mark.parametrize("wrapped", [True, False], ids=["wrapped", "unwrapped"])
def test_a_builder_killed_by_sigsegv_is_reported_as_a_signal(weft: Weft, wrapped: bool) -> None:
    envs = "[logging(), inner]" if wrapped else "[inner]"
    recipe = weft.recipe(
        f"""
        inner = environment("inner", enter=run("true"), exit=run("echo inner-exit"))
        segv = derivation("segv", sh, ["sh", "-c", "echo crashing; kill -SEGV $$"], env=path,
                          environments={envs})
        """
    )
    built = weft.build(f"{recipe}:segv")
    assert built.returncode == 1
    assert "SIGSEGV" in built.stderr, built.stderr
    assert not re.search(r"exit code 139\b", built.stderr), built.stderr
    (attempt,) = weft.history(weft.drv("segv"))
    assert attempt["outcome"] == "signal" and attempt["exit"] != "139", attempt
    label = "wrap_build" if wrapped else "build"
    log = weft.log(weft.drv("segv"))
    assert f"weft: {label} failed: killed by signal SIGSEGV" in steps(log)
    assert "inner-exit" in log  # and the exit steps ran


@pytest.mark.parametrize(
    ("environments", "refusal"),
    [
        (
            'environments=[environment("half", wrap_build=[sh, "true"])]',
            r"half: a wrapper defines all of wrap_env_enter, wrap_build, wrap_env_exit or none",
        ),
        (
            'environments=[logging("one"), logging("two")]',
            r"two wrappers for one build: one, two",
        ),
    ],
    ids=["only-wrap_build", "two-wrappers"],
)
def test_an_incomplete_or_second_wrapper_is_refused_and_nothing_is_built(
    weft: Weft, environments: str, refusal: str
) -> None:
    recipe = weft.recipe(
        f"""
        good = derivation("good", sh, ["sh", "-c", "echo good > $out"], env=path)
        bad = derivation("bad", sh, ["sh", "-c", "echo bad > $out"], env=path,
                         {environments})
        """
    )
    built = weft.build(f"{recipe}:good", f"{recipe}:bad")
    assert built.returncode == 1 and built.stdout == ""
    assert re.search(rf"{re.escape(recipe)}:\d+: .*{refusal}", built.stderr), built.stderr
    assert "building" not in built.stderr
    # The valid sibling was written to the store, and never built.
    assert list((weft.daemon.state / "store").glob("*-bad.drv")) == []
    outputs = weft.run("store-query", "--outputs", weft.drv("good"))
    assert outputs.returncode == 0, outputs.stderr
    valid = weft.run("store-query", "--valid", outputs.stdout.strip())
    assert valid.returncode == 1 and valid.stdout == ""


@pytest.mark.parametrize("wrapped", [False, True], ids=["unwrapped", "wrapped"])
def test_a_failing_enter_still_runs_the_exits_already_due_in_reverse(
    weft: Weft, wrapped: bool
) -> None:
    recipe = weft.recipe(
        f"""
        def env(name, enter="true"):
            return environment(name, enter=run(enter), exit=run(f"echo exit-{{name}}"))

        envs = [env("a"), env("b"), env("c", "echo c fails; exit 1"), env("d")]
        if {wrapped}:
            envs.insert(1, logging())
        broken = derivation("broken", sh, ["sh", "-c", "echo never built > $out"], env=path,
                            environments=envs)
        """
    )
    built = weft.build(f"{recipe}:broken")
    assert built.returncode == 1
    inner = "wrap_env_enter" if wrapped else "enter"
    inner_exit = "wrap_env_exit" if wrapped else "exit"
    assert f"{inner} c" in built.stderr and "exit code 1" in built.stderr, built.stderr
    log = weft.log(weft.drv("broken"))
    wrapper = ["logging"] if wrapped else []
    assert steps(log) == [
        *ran("enter a", *(f"enter {w}" for w in wrapper), f"{inner} b"),
        f"weft: {inner} c",
        f"weft: {inner} c failed: exit code 1",
        *ran(f"{inner_exit} c", f"{inner_exit} b", *(f"exit {w}" for w in wrapper), "exit a"),
    ]
    said = [line for line in log.splitlines() if line.startswith("exit-")]
    assert said == ["exit-c", "exit-b", "exit-a"]
    (attempt,) = weft.history(weft.drv("broken"))
    assert (attempt["outcome"], attempt["exit"]) == ("exit", "1")


def _left(token: str) -> list[str]:
    """The processes whose command line holds `token`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if token.encode() in cmdline:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


def test_a_timeout_lets_the_exits_run_within_the_grace_then_kills_the_tree(weft: Weft) -> None:
    token = str(900000 + uuid.uuid4().int % 99999)  # a sleep's length no other process has
    recipe = weft.recipe(
        f"""
        # A process of its own session and group, out of every step's: only the end of
        # the sandbox's pid namespace stops it.
        daemonize = "setsid sleep {token} < /dev/null > /dev/null 2>&1 &"
        hang = environment("hang", enter=run(daemonize),
                           exit=run("echo hang-exit-started; sleep {token}; echo never"))
        quick = environment("quick", exit=run("echo quick-exit-ran"))
        slow = derivation("slow", sh, ["sh", "-c", "echo building; sleep {token}"], env=path,
                          environments=[hang, quick])
        """
    )
    started = time.monotonic()
    built = weft.build("--timeout", "1", f"{recipe}:slow")
    took = time.monotonic() - started
    assert built.returncode == 1
    assert "timed out after 1 s, during build" in built.stderr, built.stderr
    # The hanging exit step held the session until the grace ran out (but for the moment
    # the runner keeps to say how it ended: at most a tenth of it), and no longer.
    assert 1 + GRACE * 0.9 <= took < 1 + GRACE + SLACK, took
    log = weft.log(weft.drv("slow"))
    # The build's step ended (stopped), the exits ran in reverse, the last one never ended.
    begun, ended, exits = steps(log)[:3], steps(log)[3], steps(log)[4:]
    assert begun == ["weft: enter hang", "weft: enter hang done", "weft: build"]
    assert ended.startswith("weft: build failed: "), ended
    assert exits == [
        *ran("exit quick"),
        "weft: exit hang",
        "weft: exit hang failed: killed by signal SIGKILL",
    ]
    assert step_lines(log, "exit quick") == ["quick-exit-ran"]
    assert "hang-exit-started" in log and "never" not in log
    deadline = time.monotonic() + 5
    while _left(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _left(token) == []


def test_an_action_over_its_timeout_gets_sigterm_and_the_exits_run(weft: Weft) -> None:
    recipe = weft.recipe(
        """
        slow = environment(
            "slow",
            enter=run("trap 'echo enter got TERM; exit 7' TERM; sleep 60 & wait", timeout=1),
            exit=run("echo slow-exit-ran"),
        )
        stuck = derivation("stuck", sh, ["sh", "-c", "echo built > $out"], env=path,
                         environments=[slow])
        """
    )
    built = weft.build(f"{recipe}:stuck")
    assert built.returncode == 1
    assert "enter slow" in built.stderr and "timed out after 1 s" in built.stderr
    log = weft.log(weft.drv("stuck"))
    assert steps(log) == [
        "weft: enter slow",
        "weft: enter slow failed: timed out after 1 s",
        *ran("exit slow"),
    ]
    assert "enter got TERM" in step_lines(log, "enter slow")
    assert step_lines(log, "exit slow") == ["slow-exit-ran"]


def test_the_shipped_examples_build_and_the_limit_fails_the_too_big_build(weft: Weft) -> None:
    built = {}
    for target in ("instrument.py", "instrument.py:plain", "limit.py"):
        out = weft.build(f"examples/environments/{target}", cwd=ROOT)
        assert out.returncode == 0, out.stderr
        built[target] = out.stdout.strip()
    assert Path(built["limit.py"]).stat().st_size == 64 * 1024  # under the limit
    instrumented = built["instrument.py"]
    assert (Path(instrumented) / "share" / "words").read_text() == (
        "store\nsession\ndaemon\nbuild\n"
    )
    hooks = [m[1] for m in map(HOOK_LINE.match, weft.log(instrumented).splitlines()) if m]
    assert hooks == ["wrap_env_enter", "wrap_build", "wrap_env_exit"]

    too_big = weft.build("examples/environments/limit.py:too_big", cwd=ROOT)
    assert too_big.returncode == 1
    assert "SIGXFSZ" in too_big.stderr, too_big.stderr
    (attempt,) = weft.history(weft.drv("too-big"))
    assert attempt["outcome"] == "signal"

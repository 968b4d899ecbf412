"""Runtimes through a real daemon: registered by the process that asks (a real one, here a
Python process that connects, starts a runtime and lingers or exits), its profile's
closure rooted while it lives and across a daemon restart, lineage and `env_from`
after the outer processes exited, durable runtimes and `forget`, secrets kept out of the
store and its database, and each user seeing only their own runtimes."""

import ast
import io
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.daemons import DaemonProc, start_daemon, stop_daemon
from daemon.cli.blocking import BlockingClient, DaemonError
from daemon.runtime import records
from daemon.runtime.envplan import Linked
from daemon.runtime.records import Record, Records, TooManyRuntimes
from daemon.runtime.watcher import open_process, start_time, ticks_now
from store.environment.profile import Profile
from store.environment.view import from_mapping
from tests.daemon_fixtures import run_as_nobody

ROOT = Path(__file__).parent.parent
UNKNOWN = "ffffffffffffffff"
# How long a runtime's end may take to be seen: a pidfd wakes the daemon at once; this is
# for a loaded machine.
SETTLE = 15.0

# A runtime's process: connect, start a runtime with the arguments given (a Python
# literal), print the reply (or the error), and linger until killed, or exit.
RUNNER = textwrap.dedent("""
    import ast, sys, time
    from daemon.cli.blocking import BlockingClient, DaemonError
    socket, args, linger = sys.argv[1], ast.literal_eval(sys.argv[2]), sys.argv[3] == "1"
    with BlockingClient(socket) as c:
        try:
            print(repr(c.call("runtime-start", **args)), flush=True)
        except DaemonError as e:
            print(repr({"code": e.code, "message": e.message}), flush=True)
    while linger:
        time.sleep(60)
""")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A dir outside pytest's (which are 0700 under /tmp) that other users can reach."""
    d = Path(tempfile.mkdtemp(prefix="weft-runtimes-", dir="/var/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def rt(open_dir: Path) -> Iterator[DaemonProc]:
    d = start_daemon(open_dir / "state", "--grace", "5")
    yield d
    stop_daemon(d)


class Runner:
    """Runtime processes started by a test, killed at its end whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, d: DaemonProc, linger: bool, **args: Any) -> tuple[dict[str, Any], int]:
        args.setdefault("env", env_pairs({"PATH": "/usr/bin:/bin", "HOME": "/root"}))
        args.setdefault("argv", [b"sleep", b"60"])
        args.setdefault("cwd", b"/")
        proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER, d.socket, repr(args), "1" if linger else "0"],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        reply = ast.literal_eval(proc.stdout.readline())
        if not linger:
            proc.wait(30)
        return reply, proc.pid

    def kill(self, pid: int) -> None:
        for proc in self.procs:
            if proc.pid == pid:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def runner() -> Iterator[Runner]:
    r = Runner()
    yield r
    r.close()


def env_pairs(env: dict[str, str]) -> list[list[bytes]]:
    return [[os.fsencode(k), os.fsencode(v)] for k, v in env.items()]


def as_dict(env: list[list[bytes]]) -> dict[bytes, bytes]:
    return {k: v for k, v in env}


def add_tool(d: DaemonProc, where: Path, name: str) -> str:
    """A store path with a `bin` directory (its connection closed: nothing pins it)."""
    tree = where / name
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / name).write_text("#!/bin/sh\n")
    with BlockingClient(d.socket) as c:
        return c.call("add-from-path", path=str(tree), name=name)["path"]


def add_profile(d: DaemonProc, name: str, members: list[str], env: dict[str, Any]) -> str:
    text = Profile(name, tuple(members), from_mapping(env)).to_json()
    with BlockingClient(d.socket) as c:
        return c.call("add-text", name=f"{name}-profile", text=text, references=members)["path"]


def roots(d: DaemonProc) -> list[str]:
    out = io.BytesIO()
    with BlockingClient(d.socket) as c:
        c.download("gc", out.write, mode="print-roots")
    return out.getvalue().decode().splitlines()


def collect(d: DaemonProc, paths: list[str]) -> int:
    """`store-gc` of `paths` (which must all be dead): how many were deleted."""
    with BlockingClient(d.socket) as c:
        return c.download("gc", io.BytesIO().write, paths=paths)["deleted"]


def call(d: DaemonProc, op: str, **args: Any) -> Any:
    with BlockingClient(d.socket) as c:
        return c.call(op, **args)


def error_of(d: DaemonProc, op: str, **args: Any) -> tuple[str, str]:
    with pytest.raises(DaemonError) as caught:
        call(d, op, **args)
    return caught.value.code, caught.value.message


def wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SETTLE
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not {what} after {SETTLE} s")
        time.sleep(0.05)


def runtime_root(d: DaemonProc, runtime_id: str) -> str:
    return str(d.state / "var" / "gcroots" / "runtimes" / runtime_id)


def test_a_runtime_roots_its_profiles_closure_while_its_process_lives(
    rt: DaemonProc, open_dir: Path, runner: Runner
) -> None:
    tool = add_tool(rt, open_dir, "tool")
    profile = add_profile(rt, "tools", [tool], {"CC": "gcc"})
    reply, pid = runner.start(rt, linger=True, profiles=[profile], name="shell")
    rid = reply["id"]
    env = as_dict(reply["env"])
    assert env[b"PATH"] == f"{tool}/bin:/usr/bin:/bin".encode()
    assert env[b"CC"] == b"gcc" and env[b"WEFT_RUNTIME"] == rid.encode()
    assert [c["name"] for c in reply["changes"]] == ["CC", "PATH"]
    assert (reply["parent"], reply["parent_status"]) == (None, "none")
    assert f"{runtime_root(rt, rid)}/0 -> {profile}" in roots(rt)
    assert f"{runtime_root(rt, rid)}/1 -> {tool}" in roots(rt)
    with pytest.raises(DaemonError) as still:
        collect(rt, [tool])
    assert still.value.code == "still-alive"
    (summary,) = call(rt, "runtimes")
    assert summary["id"] == rid and summary["alive"] and summary["name"] == "shell"
    assert summary["profiles"] == [profile] and summary["argv"] == [b"sleep", b"60"]
    shown = call(rt, "runtime-show", id=rid)
    assert (shown["pid"], shown["uid"], shown["cwd"], shown["children"]) == (pid, 0, b"/", [])

    runner.kill(pid)
    wait_for(lambda: not call(rt, "runtime-show", id=rid)["alive"], "ended")
    wait_for(lambda: not any(rid in r for r in roots(rt)), "unrooted")
    assert collect(rt, [profile, tool]) == 2


def test_a_plan_computes_the_environment_and_registers_nothing(
    daemon: DaemonProc, tmp_path: Path
) -> None:
    rt = daemon
    tool = add_tool(rt, tmp_path, "tool")
    env = env_pairs({"PATH": "/bin", "FOO": "x"})
    reply = call(rt, "runtime-plan", profiles=[tool], env=env, unset=["FOO"])
    assert reply["id"] is None
    assert as_dict(reply["env"]) == {b"PATH": f"{tool}/bin:/bin".encode()}
    assert [(c["name"], c["op"]) for c in reply["changes"]] == [
        ("PATH", "prepend"),
        ("FOO", "unset"),
    ]
    assert call(rt, "runtimes") == []
    assert os.listdir(rt.state / "var" / "gcroots" / "runtimes") == []


def test_nested_runtimes_find_their_parent_and_pristine_environments_after_they_exited(
    rt: DaemonProc, open_dir: Path, runner: Runner
) -> None:
    a = add_profile(rt, "a", [], {"A_VAR": "from-a"})
    b = add_profile(rt, "b", [], {"B_VAR": "from-b"})
    outer, _ = runner.start(rt, linger=False, profiles=[a])
    # Inside A's command: A's environment, then `export FOO=dirty`.
    inside = {**{k.decode(): v.decode() for k, v in as_dict(outer["env"]).items()}, "FOO": "dirty"}
    common = {"profiles": [b], "env": env_pairs(inside), "parent": outer["id"]}
    pristine, _ = runner.start(rt, linger=False, env_from="pristine", **common)
    got = as_dict(pristine["env"])
    assert b"FOO" not in got and b"A_VAR" not in got and got[b"B_VAR"] == b"from-b"
    assert pristine["parent_status"] == "linked"
    parent, _ = runner.start(rt, linger=False, env_from="parent", **common)
    got = as_dict(parent["env"])
    assert b"FOO" not in got and got[b"A_VAR"] == b"from-a" and got[b"B_VAR"] == b"from-b"

    third_env = {k.decode(): v.decode() for k, v in as_dict(parent["env"]).items()}
    third, _ = runner.start(
        rt, linger=False, env=env_pairs(third_env), parent=parent["id"], env_from="pristine"
    )
    lineage = call(rt, "runtime-lineage", id=third["id"])
    assert [r["id"] for r in lineage] == [third["id"], parent["id"], outer["id"]]
    assert [r["parent_status"] for r in lineage] == ["linked", "linked", "none"]
    # The outermost's caller's environment, none of A's delta: A's process has exited.
    assert as_dict(third["env"]) == {
        b"PATH": b"/usr/bin:/bin",
        b"HOME": b"/root",
        b"WEFT_RUNTIME": third["id"].encode(),
    }
    wait_for(lambda: not call(rt, "runtime-show", id=outer["id"])["alive"], "ended")
    captured = call(rt, "runtime-env", id=third["id"], pristine=True)["env"]
    assert captured == call(rt, "runtime-env", id=outer["id"])["env"]
    assert as_dict(captured) == {b"PATH": b"/usr/bin:/bin", b"HOME": b"/root"}
    assert call(rt, "runtime-show", id=outer["id"])["children"] == [pristine["id"], parent["id"]]

    call(rt, "runtime-forget", id=parent["id"])
    assert call(rt, "runtime-show", id=third["id"])["parent_status"] == "dangling"
    assert [r["id"] for r in call(rt, "runtime-lineage", id=third["id"])] == [third["id"]]
    code, message = error_of(rt, "runtime-plan", env=[], parent=parent["id"], env_from="pristine")
    assert (code, message) == (
        "not-valid",
        f"runtime {parent['id']}: no runtime of yours with this id",
    )


def test_env_from_parent_outside_any_runtime_is_a_bad_request(daemon: DaemonProc) -> None:
    rt = daemon
    code, message = error_of(rt, "runtime-plan", env=[], env_from="parent")
    assert code == "bad-request" and "no parent runtime" in message
    assert error_of(rt, "runtime-plan", env=[], env_from="nowhere")[0] == "bad-request"
    assert error_of(rt, "runtime-plan", env=[["A", "b"]])[0] == "bad-request"
    assert error_of(rt, "runtime-plan", env=[], keep=["A=B"])[0] == "bad-request"
    code, message = error_of(rt, "runtime-start", env=[], name="x" * 101)
    assert code == "bad-request" and "at most 100 printable characters" in message
    assert call(rt, "runtimes") == []


def test_profiles_that_are_not_valid_are_refused(daemon: DaemonProc) -> None:
    rt = daemon
    missing = f"{rt.store_dir}/{'0' * 32}-gone"
    assert error_of(rt, "runtime-plan", env=[], profiles=[missing])[0] == "not-valid"
    assert error_of(rt, "runtime-plan", env=[], profiles=["/usr"])[0] == "invalid-path"
    text = Profile("members", (missing,)).to_json()
    with BlockingClient(rt.socket) as c:
        bad = c.call("add-text", name="gone-profile", text=text)["path"]
    code, message = error_of(rt, "runtime-plan", env=[], profiles=[bad])
    assert (code, message) == ("not-valid", f"path {missing!r} is not valid")


def test_runtimes_are_watched_again_after_a_daemon_restart(tmp_path: Path, runner: Runner) -> None:
    state = tmp_path / "state"
    d = start_daemon(state, "--grace", "5")
    try:
        tool = add_tool(d, tmp_path, "tool")
        lives, live_pid = runner.start(d, linger=True, profiles=[tool])
        dies, dying_pid = runner.start(d, linger=True, profiles=[tool])
    finally:
        stop_daemon(d)
    runner.kill(dying_pid)
    d = start_daemon(state, "--grace", "5")
    try:
        entries = roots(d)
        assert f"{runtime_root(d, lives['id'])}/0 -> {tool}" in entries
        assert not any(dies["id"] in r for r in entries)
        assert call(d, "runtime-show", id=lives["id"])["alive"]
        assert not call(d, "runtime-show", id=dies["id"])["alive"]
        runner.kill(live_pid)
        wait_for(lambda: not call(d, "runtime-show", id=lives["id"])["alive"], "ended")
        wait_for(lambda: roots(d) == [], "unrooted")
        assert collect(d, [tool]) == 1
    finally:
        stop_daemon(d)


def test_a_durable_runtime_keeps_its_roots_until_it_is_forgotten(
    rt: DaemonProc, open_dir: Path, runner: Runner
) -> None:
    tool = add_tool(rt, open_dir, "tool")
    reply, _ = runner.start(rt, linger=False, profiles=[tool], durable=True)
    rid = reply["id"]
    wait_for(lambda: not call(rt, "runtime-show", id=rid)["alive"], "ended")
    assert call(rt, "runtime-show", id=rid)["durable"]
    assert f"{runtime_root(rt, rid)}/0 -> {tool}" in roots(rt)
    assert call(rt, "runtime-forget", id=rid) == {}
    assert roots(rt) == []
    assert error_of(rt, "runtime-show", id=rid) == (
        "not-valid",
        f"runtime {rid}: no runtime of yours with this id",
    )
    assert collect(rt, [tool]) == 1


def test_a_forgotten_live_runtime_keeps_its_roots_until_its_process_exits(
    rt: DaemonProc, open_dir: Path, runner: Runner
) -> None:
    tool = add_tool(rt, open_dir, "tool")
    reply, pid = runner.start(rt, linger=True, profiles=[tool])
    call(rt, "runtime-forget", id=reply["id"])
    assert call(rt, "runtimes") == []
    assert f"{runtime_root(rt, reply['id'])}/0 -> {tool}" in roots(rt)
    runner.kill(pid)
    wait_for(lambda: roots(rt) == [], "unrooted")


def _files_under(root: Path, skip: Path | None = None) -> Iterator[Path]:
    for dirpath, _, names in os.walk(root):
        if skip is not None and Path(dirpath).is_relative_to(skip):
            continue
        for name in names:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                yield path


def test_captured_secrets_stay_out_of_the_store_and_redacted_ones_are_never_stored(
    rt: DaemonProc, open_dir: Path, runner: Runner
) -> None:
    marker = b"weft-marker-4a1f9c0e77"
    token = b"weft-token-bd83e2f154"
    tool = add_tool(rt, open_dir, "tool")
    env = [[b"PATH", b"/bin"], [b"MARKER", marker], [b"SERVICE_API_TOKEN", token]]
    reply, _ = runner.start(rt, linger=False, profiles=[tool], env=env)
    # The command got both; what is stored has the marker only.
    assert as_dict(reply["env"])[b"SERVICE_API_TOKEN"] == token
    captured = as_dict(call(rt, "runtime-env", id=reply["id"])["env"])
    assert captured == {b"PATH": b"/bin", b"MARKER": marker}
    runtimes_dir = rt.state / "var" / "runtimes"
    with BlockingClient(rt.socket) as c:
        c.call("add-text", name="note", text="written so the database is busy")
    for path in _files_under(rt.state, skip=runtimes_dir):
        data = path.read_bytes()
        assert marker not in data and token not in data, path
    for path in _files_under(rt.state):
        assert token not in path.read_bytes(), path
    assert marker not in rt.log.read_bytes() and token not in rt.log.read_bytes()
    assert stat.S_IMODE(runtimes_dir.stat().st_mode) == 0o700
    files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in runtimes_dir.iterdir()}
    assert set(files) >= {"key", "runtimes.sqlite"} and set(files.values()) == {0o600}


def test_another_users_runtime_is_answered_exactly_like_an_unknown_one(
    rt: DaemonProc, open_dir: Path, runner: Runner
) -> None:
    mine, _ = runner.start(rt, linger=False)
    code = textwrap.dedent(f"""
        import os
        from daemon.cli.blocking import BlockingClient, DaemonError
        c = BlockingClient({rt.socket!r})
        def q(op, **args):
            try:
                return ["ok", c.call(op, **args)]
            except DaemonError as e:
                return [e.code, e.message]
        for rid in ({mine["id"]!r}, {UNKNOWN!r}):
            answers = [
                q("runtime-show", id=rid),
                q("runtime-lineage", id=rid),
                q("runtime-env", id=rid),
                q("runtime-env", id=rid, pristine=True),
                q("runtime-forget", id=rid),
                q("runtime-plan", env=[], parent=rid, env_from="pristine"),
                q("runtime-plan", env=[], parent=rid, env_from="parent"),
            ]
            print(repr(answers).replace(rid, "ID"))
        print(repr(q("runtimes")))
        env = [[k, v] for k, v in os.environb.items()]
        started = c.call("runtime-start", env=env, parent={mine["id"]!r}, argv=[b"true"])
        print(repr([started["parent"], started["parent_status"], started["id"]]))
    """)
    out = run_as_nobody(code)
    assert out.returncode == 0, out.stderr
    theirs, unknown, listed, started = out.stdout.splitlines()
    assert theirs == unknown
    expected = ["not-valid", "runtime ID: no runtime of yours with this id"]
    assert ast.literal_eval(theirs) == [expected] * 7
    assert ast.literal_eval(listed) == ["ok", []]
    parent, status, nobodys = ast.literal_eval(started)
    assert (parent, status) == (mine["id"], "dangling")
    # Each sees only their own; nobody's forget left root's runtime alone.
    assert [r["id"] for r in call(rt, "runtimes")] == [mine["id"]]
    assert error_of(rt, "runtime-show", id=nobodys)[0] == "not-valid"


# -- the records and the process checks, without a daemon --


def _record(rid: str, uid: int = 1000, ended: float | None = None, durable: bool = False) -> Record:
    return Record(
        id=rid,
        uid=uid,
        name=None,
        parent=None,
        started=time.time(),
        ended=ended,
        durable=durable,
        pid=1,
        start_time=1,
        boot_id="boot",
        profiles=(),
        argv=(),
        cwd=b"/",
    )


def test_a_user_past_the_live_limit_is_refused_and_others_are_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(records, "MAX_LIVE_PER_USER", 3)
    rec = Records(tmp_path / "runtimes")
    for n in range(3):
        rec.register(_record(f"{n:016x}"), [], [], lambda: None)
    with pytest.raises(TooManyRuntimes, match="3 runtimes running, the most one user may"):
        rec.register(_record("f" * 16), [], [], lambda: None)
    rec.register(_record("e" * 16, uid=1001), [], [], lambda: None)
    rec.end(f"{0:016x}", time.time())
    rec.register(_record("d" * 16), [], [], lambda: None)
    rec.close()


def test_the_oldest_ended_records_are_dropped_past_the_records_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(records, "MAX_RECORDS_PER_USER", 3)
    rec = Records(tmp_path / "runtimes")
    env = [(b"A", b"b")]
    rec.register(_record("a" * 16, ended=1.0, durable=True), env, env, lambda: None)
    rec.register(_record("b" * 16, ended=2.0), env, env, lambda: None)
    rec.register(_record("c" * 16, ended=3.0), env, env, lambda: None)
    rec.register(_record("d" * 16), env, env, lambda: None)
    assert [s.record.id for s in rec.summaries(1000)] == ["d" * 16, "c" * 16, "a" * 16]
    rec.register(_record("e" * 16), env, env, lambda: None)
    with pytest.raises(TooManyRuntimes, match="forget some first"):
        rec.register(_record("f" * 16), env, env, lambda: None)
    assert rec.parent(1000, "e" * 16) == Linked("e" * 16, env, env)
    rec.close()


def test_a_process_is_known_by_its_start_time_not_its_pid_alone(tmp_path: Path) -> None:
    # A command name with spaces and parentheses: the fields are those after the last ')'.
    odd = tmp_path / "a) b ) (c"
    odd.symlink_to(shutil.which("sleep") or "/bin/sleep")
    proc = subprocess.Popen([str(odd), "60"])
    try:
        began = start_time(proc.pid)
        assert began is not None and 0 < began <= ticks_now()
        opened = open_process(proc.pid, start=began)
        assert opened is not None and opened[1] == began
        os.close(opened[0])
        assert open_process(proc.pid, start=began + 1) is None
        assert open_process(proc.pid, before=began - 10) is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert start_time(proc.pid) is None

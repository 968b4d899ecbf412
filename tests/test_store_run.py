"""`store-run` and `store-runtime` end to end: the real commands, run as a user runs them
(executables on PATH, the state dir from WEFT_STATE_DIR, WEFT_RUNTIME in the
environment), against a real daemon; nested runs are real nested processes.

Members are store-added directories with a `bin/` unless a test needs recipes built
(those daemons live under /var/tmp: the sandbox mounts its own /tmp).  Every state dir
is reachable by other users, so that one test can run the commands as nobody.
"""

import json
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

from bench.daemons import DaemonProc, start_daemon, stop_daemon

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("store-run", "store-runtime", "store-add", "store-build", "store-gc", "store-query")
WRAPPER = """#!{python}
import sys
sys.path.insert(0, {root!r})
from daemon.cli import main
sys.exit(main.run({name!r}))
"""
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
RECIPES = r"""
from store.recipe import busybox, derivation, profile
bb = busybox()

def tool(name):
    script = (f"mkdir -p $out/bin && printf '#!/bin/sh\\necho {name}\\n' > $out/bin/{name}-hi"
              f" && chmod +x $out/bin/{name}-hi")
    return derivation(name, f"{bb}/bin/busybox", ["sh", "-c", script], env={"PATH": f"{bb}/bin"})

app = tool("app")
tools = tool("tools")
dev = profile("dev", [app, tools], env={"DEV_MODE": "on"})
broken = derivation("broken", f"{bb}/bin/busybox", ["sh", "-c", "echo giving up; exit 3"])
"""


class Weft:
    """A daemon, the commands on a PATH of their own, and a clean environment to run
    them in (nothing of the test runner's, lest it be inside a store-run itself)."""

    def __init__(self, base: Path, daemon: DaemonProc) -> None:
        self.base = base
        self.daemon = daemon
        self.bin = base / "bin"
        self.bin.mkdir()
        for name in COMMANDS:
            wrapper = self.bin / name
            wrapper.write_text(WRAPPER.format(python=sys.executable, root=str(ROOT), name=name))
            wrapper.chmod(0o755)
        self.path = f"{self.bin}:/usr/local/bin:/usr/bin:/bin"

    def env(self, **extra: str | bytes) -> dict[str | bytes, str | bytes]:
        base = {"PATH": self.path, "HOME": "/root", "WEFT_STATE_DIR": str(self.daemon.state)}
        return {**base, **extra}

    def run(
        self, *argv: str, env: dict | None = None, stdin: bytes = b"", nobody: bool = False
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*(NOBODY if nobody else []), str(self.bin / argv[0]), *argv[1:]],
            input=stdin,
            capture_output=True,
            env=self.env() if env is None else env,
            cwd="/",
            timeout=120,
        )

    def ok(self, *argv: str, **kw: object) -> str:
        r = self.run(*argv, **kw)  # type: ignore[arg-type]
        assert r.returncode == 0, r.stderr.decode()
        return r.stdout.decode()

    def member(self, name: str, files: dict[str, str] | None = None) -> str:
        """A store path with `bin/NAME-hi` (a script saying NAME) and `files`."""
        tree = self.base / "src" / name
        (tree / "bin").mkdir(parents=True)
        hi = tree / "bin" / f"{name}-hi"
        hi.write_text(f"#!/bin/sh\necho {name}\n")
        hi.chmod(0o755)
        for rel, text in (files or {}).items():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            (tree / rel).write_text(text)
        return self.ok("store-add", str(tree)).strip()

    def profile(self, name: str, members: list[str], values: dict) -> str:
        """A hand-written profile file, added as it is."""
        doc = {"weft-profile": 1, "name": name, "members": members}
        doc["env"] = {"version": 1, "values": values}
        text = self.base / "src" / f"{name}.json"
        text.parent.mkdir(parents=True, exist_ok=True)
        text.write_text(json.dumps(doc))
        return self.ok("store-add", "--name", name, str(text)).strip()


def _weft(under: str) -> Iterator[Weft]:
    base = Path(tempfile.mkdtemp(prefix="weft-run-", dir=under))
    try:
        base.chmod(0o755)  # pytest's own tmp dirs are 0700: nobody could not reach them
        daemon = start_daemon(base / "state")
        try:
            yield Weft(base, daemon)
        finally:
            stop_daemon(daemon)
        assert daemon.proc.returncode == 0, daemon.log.read_text()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def weft() -> Iterator[Weft]:
    yield from _weft("/tmp")


@pytest.fixture
def builder() -> Iterator[Weft]:
    yield from _weft("/var/tmp")


def _recipes(w: Weft) -> Path:
    recipes = w.base / "recipes.py"
    recipes.write_text(RECIPES)
    return recipes


def test_the_later_profiles_bin_comes_first_then_the_old_path_deduplicated(
    builder: Weft,
) -> None:
    recipes = _recipes(builder)
    app, tools = builder.ok("store-build", f"{recipes}:app", f"{recipes}:tools").split()
    old = f"{builder.bin}:/usr/bin:/bin:/usr/bin:{builder.bin}"
    argv = ["-p", f"{recipes}:app,{recipes}:tools", "--", "printenv", "PATH"]
    out = builder.ok("store-run", *argv, env=builder.env(PATH=old))
    assert out == f"{tools}/bin:{app}/bin:{builder.bin}:/usr/bin:/bin\n"
    # The command is found on the new PATH; a .drv and a link to an output name the same.
    drv = builder.ok("store-query", "--deriver", app).strip()
    (builder.base / "result").symlink_to(app)
    for target in (f"{recipes}:app", drv, str(builder.base / "result")):
        assert builder.ok("store-run", "-p", target, "--", "app-hi") == "app\n"


def test_a_profile_recipe_gives_its_members_bins_in_order_and_its_variables(
    builder: Weft,
) -> None:
    recipes = _recipes(builder)
    script = 'printenv DEV_MODE; printenv PATH; echo "$WEFT_RUNTIME"'
    r = builder.run("store-run", "-p", f"{recipes}:dev", "--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr.decode()
    mode, path, runtime = r.stdout.decode().splitlines()
    app, tools = builder.ok("store-build", f"{recipes}:app", f"{recipes}:tools").split()
    assert mode == "on"
    assert path.startswith(f"{app}/bin:{tools}/bin:")
    shown = json.loads(builder.ok("store-runtime", "--json", "--show", runtime))
    assert [p.partition("-")[2] for p in map(os.path.basename, shown["profiles"])] == ["dev"]
    assert shown["argv"] == ["sh", "-c", script]


def test_a_profile_that_fails_to_build_runs_nothing(builder: Weft) -> None:
    recipes = _recipes(builder)
    r = builder.run("store-run", "-p", f"{recipes}:app,{recipes}:broken", "--", "echo", "ran")
    assert (r.returncode, r.stdout) == (125, b"")
    assert b"broken" in r.stderr and b"failed to build" in r.stderr
    assert json.loads(builder.ok("store-runtime", "--json")) == []


def test_arguments_arrive_literally_and_the_exit_status_is_the_commands(weft: Weft) -> None:
    out = weft.ok("store-run", "--", "printf", "%s\\n", "*", "$HOME", "a b")
    assert out == "*\n$HOME\na b\n"
    assert weft.run("store-run", "--", "sh", "-c", "exit 42").returncode == 42
    # The command is the process the caller waits for: killed, it is seen as killed.
    killed = weft.run("store-run", "--", "sh", "-c", "kill -TERM $$")
    assert killed.returncode == -signal.SIGTERM


def test_a_command_writing_to_a_closed_pipe_dies_of_sigpipe_as_it_would_from_a_shell(
    weft: Weft,
) -> None:
    proc = subprocess.Popen(
        [str(weft.bin / "store-run"), "--", "yes"],
        env=weft.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"y\n"
    proc.stdout.close()
    assert proc.wait(30) == -signal.SIGPIPE, proc.stderr.read()
    proc.stderr.close()


def test_a_missing_command_exits_127_and_one_not_executable_126(weft: Weft) -> None:
    m = weft.member("m", {"bin/not-exec": "data\n"})
    r = weft.run("store-run", "-p", m, "--", "no-such-command-here")
    assert r.returncode == 127
    assert r.stderr == b"store-run: no-such-command-here: command not found\n"
    r = weft.run("store-run", "-p", m, "--", "not-exec")
    assert r.returncode == 126 and b"Permission denied" in r.stderr
    assert weft.ok("store-run", "-p", m, "--", "m-hi") == "m\n"


def test_without_a_command_the_new_environments_shell_reads_stdin(weft: Weft) -> None:
    script = b'echo "shell ${WEFT_RUNTIME:+in a runtime}"\n'
    r = weft.run("store-run", env=weft.env(SHELL="/bin/sh"), stdin=script)
    assert r.stdout == b"shell in a runtime\n", r.stderr


def test_a_nested_run_from_pristine_does_not_see_what_the_outer_command_exported(
    weft: Weft,
) -> None:
    a, b = weft.member("a"), weft.member("b")
    inner = f"export FOO=dirty; store-run -p {b} --env-from pristine -- printenv FOO"
    r = weft.run("store-run", "-p", a, "--", "sh", "-c", inner)
    # printenv's own "not set": store-run's failures exit 125 and say why on stderr.
    assert (r.returncode, r.stdout, r.stderr) == (1, b"", b"")


def test_a_nested_run_from_parent_keeps_the_outer_deltas_and_not_the_exports(
    weft: Weft,
) -> None:
    a_member, b = weft.member("a"), weft.member("b")
    a = weft.profile("a-env", [a_member], {"scalar": {"A_MARK": "from-a"}})
    show = "printenv A_MARK; printenv PATH; printenv FOO || echo no-foo"
    for mode, mark in (("parent", "from-a\n"), ("pristine", "")):
        inner = f"export FOO=dirty; store-run -p {b} --env-from {mode} -- sh -c '{show}'"
        out = weft.ok("store-run", "-p", a, "--", "sh", "-c", inner)
        assert out.startswith(mark)
        path = out.splitlines()[-2]
        assert path.startswith(f"{b}/bin:{a_member}/bin:" if mark else f"{b}/bin:{weft.bin}")
        assert out.endswith("no-foo\n")


def test_three_nested_runs_give_a_lineage_of_three(weft: Weft) -> None:
    a, b, c = weft.member("a"), weft.member("b"), weft.member("c")
    query = (
        'store-runtime --lineage "$WEFT_RUNTIME"; store-runtime --json --lineage "$WEFT_RUNTIME"'
    )
    out = weft.ok(
        "store-run", "-p", a, "--name", "one", "--",
        "store-run", "-p", b, "--name", "two", "--",
        "store-run", "-p", c, "--name", "three", "--", "sh", "-c", query,
    )  # fmt: skip
    text, _, js = out.partition("\n[")
    lines = text.splitlines()
    assert len(lines) == 3
    assert [line.split()[4] for line in lines] == ["three", "two", "one"]
    chain = json.loads("[" + js)
    assert [s["name"] for s in chain] == ["three", "two", "one"]
    assert [s["parent"] for s in chain] == [chain[1]["id"], chain[2]["id"], None]
    assert all(s["alive"] for s in chain)
    listed: list[dict] = []

    def all_ended() -> bool:
        listed[:] = json.loads(weft.ok("store-runtime", "--json"))
        return not any(s["alive"] for s in listed)

    _wait_for("the runtimes to end", all_ended)
    assert [s["name"] for s in listed] == ["three", "two", "one"]  # newest first


def test_pristine_still_works_after_the_outer_run_exited(weft: Weft) -> None:
    a, b = weft.member("a"), weft.member("b")
    outer = weft.ok(
        "store-run", "-p", a, "--", "printenv", "WEFT_RUNTIME", env=weft.env(MARK="outer")
    )
    outer = outer.strip()
    env = weft.env(MARK="changed", WEFT_RUNTIME=outer)
    script = "printenv MARK; printenv WEFT_RUNTIME"
    mark, inner = weft.ok(
        "store-run", "-p", b, "--env-from", "pristine", "--", "sh", "-c", script, env=env
    ).split()
    assert mark == "outer" and inner != outer
    lineage = json.loads(weft.ok("store-runtime", "--json", "--lineage", inner))
    assert [s["id"] for s in lineage] == [inner, outer]

    def outer_ended() -> bool:
        return not json.loads(weft.ok("store-runtime", "--json", "--show", outer))["alive"]

    _wait_for("the outer runtime to end", outer_ended)
    captured = weft.run("store-runtime", "--env", inner, "--pristine", "-0").stdout
    assert b"MARK=outer" in captured.split(b"\0")
    assert b"MARK=changed" in weft.run("store-runtime", "--env", inner).stdout.split(b"\n")


def test_another_users_runtime_id_is_refused_as_an_unknown_one(weft: Weft) -> None:
    mine = weft.ok("store-run", "--", "printenv", "WEFT_RUNTIME").strip()
    for mode in ("pristine", "parent"):
        theirs = weft.run(
            "store-run", "--env-from", mode, "--", "true",
            env=weft.env(WEFT_RUNTIME=mine), nobody=True,
        )  # fmt: skip
        assert theirs.returncode == 125  # store-run's own failure, as env(1)'s
        assert f"runtime {mine}: no runtime of yours with this id" in theirs.stderr.decode()
    unknown = weft.run("store-runtime", "--show", "nonesuch", nobody=True)
    other = weft.run("store-runtime", "--show", mine, nobody=True)
    assert unknown.returncode == other.returncode == 1
    assert other.stderr.decode().replace(mine, "X") == unknown.stderr.decode().replace(
        "nonesuch", "X"
    )
    # From their own environment, the foreign parent is only recorded, as dangling.
    own = weft.run(
        "store-run", "--", "printenv", "WEFT_RUNTIME", env=weft.env(WEFT_RUNTIME=mine), nobody=True
    )
    assert own.returncode == 0, own.stderr
    shown = json.loads(
        weft.ok("store-runtime", "--json", "--show", own.stdout.decode().strip(), nobody=True)
    )
    assert shown["parent_status"] == "dangling" and shown["uid"] == 65534
    assert mine not in weft.ok("store-runtime", nobody=True)


def _wait_for(what: str, check: object, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_running_commands_profile_closure_survives_gc_until_it_exits(builder: Weft) -> None:
    recipes = _recipes(builder)
    dev, app, tools = builder.ok(
        "store-build", *(f"{recipes}:{n}" for n in ("dev", "app", "tools"))
    ).split()
    proc = subprocess.Popen(
        [str(builder.bin / "store-run"), "-p", dev, "--", "sleep", "30"],
        env=builder.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        listed: list[dict] = []

        def started() -> bool:
            listed[:] = json.loads(builder.ok("store-runtime", "--json"))
            return bool(listed) and listed[0]["alive"]

        _wait_for("the runtime", started)
        rid = listed[0]["id"]
        assert json.loads(builder.ok("store-runtime", "--json", "--show", rid))["pid"] == proc.pid
        builder.ok("store-gc")
        assert all(os.path.exists(p) for p in (dev, app, tools))
        roots = builder.ok("store-gc", "--print-roots")
        assert f"gcroots/runtimes/{rid}/" in roots and f"-> {dev}" in roots
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    _wait_for("the roots to go", lambda: rid not in builder.ok("store-gc", "--print-roots"))
    builder.ok("store-gc")
    assert not any(os.path.exists(p) for p in (dev, app, tools))


def test_a_durable_runtimes_roots_stay_until_it_is_forgotten(weft: Weft) -> None:
    m = weft.member("m")
    rid = weft.ok("store-run", "--durable", "-p", m, "--", "printenv", "WEFT_RUNTIME").strip()
    weft.ok("store-gc")
    assert os.path.exists(m) and f"runtimes/{rid}/" in weft.ok("store-gc", "--print-roots")
    weft.ok("store-runtime", "--forget", rid)
    assert rid not in weft.ok("store-gc", "--print-roots")
    weft.ok("store-gc")
    assert not os.path.exists(m)
    gone = weft.run("store-runtime", "--show", rid)
    assert gone.returncode == 1 and b"no runtime of yours with this id" in gone.stderr


def test_a_secret_in_the_callers_environment_is_nowhere_in_the_store_or_its_database(
    weft: Weft,
) -> None:
    m = weft.member("m")
    marker, token = f"marker-{uuid.uuid4().hex}", f"token-{uuid.uuid4().hex}"
    env = weft.env(WEFT_TEST_MARKER=marker, API_TOKEN=token)
    out = weft.ok("store-run", "-p", m, "--", "printenv", "WEFT_TEST_MARKER", "API_TOKEN", env=env)
    assert out == f"{marker}\n{token}\n"  # the command gets everything
    state = weft.daemon.state
    runtimes = state / "var" / "runtimes"
    found: dict[str, list[Path]] = {marker: [], token: []}
    for path in [*state.rglob("*"), weft.daemon.log]:
        assert marker not in path.name and token not in path.name
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            for secret, where in found.items():
                if secret.encode() in data:
                    where.append(path)
    assert found[token] == []  # redacted: stored nowhere
    assert all(runtimes in p.parents for p in found[marker])
    rid = weft.ok("store-runtime", "--json")
    captured = weft.ok("store-runtime", "--env", json.loads(rid)[0]["id"]).splitlines()
    assert f"WEFT_TEST_MARKER={marker}" in captured
    assert not any(line.startswith("API_TOKEN=") for line in captured)
    assert runtimes.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o077 == 0 for p in runtimes.rglob("*") if p.is_file())


def test_a_callers_bytes_that_are_not_utf8_round_trip(weft: Weft) -> None:
    env = weft.env(WEFT_BYTES=b"\xff\xfeok")
    r = weft.run(
        "store-run", "--", "sh", "-c", 'printenv WEFT_BYTES; echo "$WEFT_RUNTIME"', env=env
    )
    assert r.returncode == 0, r.stderr
    value, rid = r.stdout.split(b"\n")[:2]
    assert value == b"\xff\xfeok"
    captured = weft.run("store-runtime", "--env", rid.decode(), "-0").stdout
    assert b"WEFT_BYTES=\xff\xfeok" in captured.split(b"\0")


def test_print_env_as_sh_evaluated_by_sh_gives_what_a_real_run_gets(weft: Weft) -> None:
    m = weft.member("m")
    p = weft.profile("p", [m], {"scalar": {"QUOTED": "it's $HOME", "HOME": None}})
    show = 'printenv PATH; printenv QUOTED; echo "home=${HOME-unset}"'
    script = weft.ok("store-run", "--print-env", "--format", "sh", "-p", p)
    assert json.loads(weft.ok("store-runtime", "--json")) == []  # nothing registered
    real = weft.ok("store-run", "-p", p, "--", "sh", "-c", show)
    assert "unset HOME\n" in script
    evaluated = subprocess.run(
        ["sh", "-c", f'eval "$1"; {show}', "sh", script], env=weft.env(), capture_output=True
    )
    assert evaluated.stdout.decode() == real == f"{m}/bin:{weft.path}\nit's $HOME\nhome=unset\n"
    table = weft.ok("store-run", "--print-env", "-p", p).splitlines()
    assert table[0].split() == ["name", "type", "op", "old", "value", "new"]
    assert ["QUOTED", "scalar", "set"] in [row.split()[:3] for row in table]
    changes = json.loads(weft.ok("store-run", "--print-env", "--json", "-p", p))
    ops = {c["name"]: c["op"] for c in changes}
    assert ops == {"QUOTED": "set", "HOME": "unset", "PATH": "prepend"}


def test_pure_keeps_only_the_usual_variables_and_those_kept(weft: Weft) -> None:
    env = weft.env(FOO="foo", BAR="bar", ZAP="zap")
    names = weft.ok(
        "store-run",
        "--pure",
        "--keep",
        "FOO",
        "--keep",
        "BAR",
        "--unset",
        "BAR",
        "--",
        "env",
        env=env,
    )
    assert {line.partition("=")[0] for line in names.splitlines()} == {
        "HOME",
        "FOO",
        "WEFT_RUNTIME",
    }
    empty = weft.ok("store-run", "--env-from", "empty", "--keep", "HOME", "--", "env", env=env)
    assert sorted(line.partition("=")[0] for line in empty.splitlines()) == ["HOME", "WEFT_RUNTIME"]


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"list": {"PATH": [{"op": "frobnicate", "value": ["/x"]}]}}, "frobnicate"),
        ({"scalar": {"NUM": 3}}, "NUM"),
        ({"scalar": {"1A": "x"}}, "1A"),
        ({"scalar": {"A-B": "x"}}, "A-B"),
        ({"list": {"A=B": [{"op": "set", "value": []}]}}, "A=B"),
    ],
)
def test_a_hand_written_profile_that_is_wrong_is_refused_naming_the_variable(
    weft: Weft, values: dict, named: str
) -> None:
    bad = weft.profile("bad", [], values)
    for argv in (["-p", bad, "--", "echo", "ran"], ["--print-env", "-p", bad]):
        r = weft.run("store-run", *argv)
        assert r.returncode == 125 and r.stdout == b""
        assert named in r.stderr.decode()
    assert json.loads(weft.ok("store-runtime", "--json")) == []


def test_usage_mistakes_exit_2(weft: Weft) -> None:
    for argv in (
        ["printenv"],
        ["--env-from", "nowhere", "--", "true"],
        ["--print-env", "--", "true"],
        ["--json", "--", "true"],
        ["-p", "a,,b", "--", "true"],
    ):
        r = weft.run("store-run", *argv)
        assert r.returncode == 2, (argv, r.stderr)


def test_the_captured_environment_is_the_callers_not_what_python_adds_at_start(
    weft: Weft,
) -> None:
    # With the C locale, Python sets LC_CTYPE=C.UTF-8 in its own environment (PEP 538):
    # neither the command nor the runtime's record may get it.
    env = {"PATH": weft.path, "WEFT_STATE_DIR": str(weft.daemon.state)}
    r = weft.run("store-run", "--", "env", env=env)
    assert r.returncode == 0, r.stderr
    names = {line.partition(b"=")[0] for line in r.stdout.splitlines()}
    assert names == {b"PATH", b"WEFT_STATE_DIR", b"WEFT_RUNTIME"}
    runtime = dict(line.split(b"=", 1) for line in r.stdout.splitlines())[b"WEFT_RUNTIME"]
    captured = weft.run("store-runtime", "--env", runtime.decode(), env=env).stdout
    assert b"LC_CTYPE" not in captured and b"WEFT_STATE_DIR=" in captured


def test_arguments_that_are_not_utf8_are_refused_or_dangling_without_a_traceback(
    weft: Weft,
) -> None:
    for argv in (["--keep", "\udcff"], ["--unset", "A\udcff"], ["--name", "n\udcff"]):
        r = weft.run("store-run", *argv, "--", "true")
        assert r.returncode == 2 and b"is not UTF-8" in r.stderr
        assert b"Traceback" not in r.stderr
    # A garbled WEFT_RUNTIME is no runtime of the caller's: dangling, and the run goes on.
    garbled = weft.run("store-run", "--", "true", env=weft.env(WEFT_RUNTIME=b"\xff\xfe"))
    assert garbled.returncode == 0, garbled.stderr


def test_a_store_path_named_like_a_recipe_is_a_member_and_is_never_run(weft: Weft) -> None:
    trap = weft.base / "src" / "tool.py"
    trap.parent.mkdir(parents=True, exist_ok=True)
    trap.write_text("raise SystemExit('EXECUTED AS A RECIPE')\n")
    path = weft.ok("store-add", str(trap)).strip()
    r = weft.run("store-run", "-p", path, "--print-env")
    assert r.returncode == 0 and b"EXECUTED" not in r.stderr, r.stderr


def test_a_script_without_a_shebang_line_runs_with_the_shell_as_env_runs_it(
    weft: Weft,
) -> None:
    script = weft.base / "plain-script"
    script.write_text("echo ran by the shell\nexit 7\n")
    script.chmod(0o755)
    r = weft.run("store-run", "--", str(script))
    assert (r.returncode, r.stdout) == (7, b"ran by the shell\n")


def test_another_users_runtime_roots_do_not_show_its_id(weft: Weft) -> None:
    m = weft.member("m")
    rid = weft.ok("store-run", "--durable", "-p", m, "--", "printenv", "WEFT_RUNTIME").strip()
    assert f"runtimes/{rid}/" in weft.ok("store-gc", "--print-roots")
    theirs = weft.run("store-gc", "--print-roots", nobody=True)
    assert theirs.returncode == 0, theirs.stderr
    assert rid.encode() not in theirs.stdout
    assert f"{{runtime of another user}} -> {m}".encode() in theirs.stdout

"""The commands as a new user meets them: --help and --version, usage errors, paths and
state dirs that name nothing, and store-build's recipes, links, limits and errors.  Every
test runs the installed commands as processes, against a real daemon where one is needed."""

import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.daemons import DaemonProc, start_daemon, stop_daemon
from daemon.cli.blocking import BlockingClient
from daemon.cli.build import evaluate
from daemon.cli.common import COMMON, VERSION, Command
from daemon.cli.daemon import DAEMON
from daemon.cli.main import COMMANDS

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent

PREAMBLE = """\
from store.recipe import busybox, derivation, source

bb = busybox()
sh = f"{bb}/bin/busybox"
env = {"PATH": f"{bb}/bin"}
"""


def command(
    name: str, *args: str, state: Path, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WEFT_STATE_DIR": str(state)}
    return subprocess.run(
        [BIN / name, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


def recipe(where: Path, body: str, name: str = "recipe.py") -> Path:
    path = where / name
    path.write_text(PREAMBLE + textwrap.dedent(body))
    return path


@pytest.fixture
def repo_daemon() -> Iterator[DaemonProc]:
    """A daemon whose state dir is inside the checkout, beside the tests: neither under
    /tmp nor /var/tmp, where the other fixtures put theirs."""
    d = Path(tempfile.mkdtemp(prefix=".state-", dir=Path(__file__).parent))
    daemon = start_daemon(d / "state")
    yield daemon
    stop_daemon(daemon)
    shutil.rmtree(d, ignore_errors=True)


def _spec(name: str) -> Command:
    module, spec_name, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), spec_name)


# Every command by the name run as, store-daemon (its own entry point) included.
SPECS = {name: _spec(name) for name in COMMANDS} | {"store-daemon": DAEMON}


def test_every_command_describes_each_of_its_flags_in_one_line(tmp_path: Path) -> None:
    for name, spec in SPECS.items():
        for ask in ("--help", "-h"):
            out = command(name, ask, state=tmp_path / "none")
            assert out.returncode == 0 and out.stdout.startswith(f"usage: {name} "), out
            options = out.stdout.split("\noptions:\n", 1)[1].splitlines()
            for flag in (*spec.flags, *COMMON):
                (line,) = [o for o in options if flag.name in o[:32].replace(",", " ").split()]
                assert len(flag.help.split()) >= 3 and line.endswith(
                    flag.help + (f" (default: {flag.default})" if flag.default else "")
                ), (name, line)
                assert not flag.short or f"{flag.short}, {flag.name}" in line
    assert not (tmp_path / "none").exists()


def test_every_command_prints_the_version_of_the_package(tmp_path: Path) -> None:
    with (ROOT / "pyproject.toml").open("rb") as f:
        assert tomllib.load(f)["project"]["version"] == VERSION
    for name in SPECS:
        out = command(name, "--version", state=tmp_path / "none")
        assert (out.returncode, out.stdout) == (0, f"{name} (weft) {VERSION}\n")


def test_an_unknown_flag_exits_2_with_the_usage(tmp_path: Path) -> None:
    for name in SPECS:
        out = command(name, "--frobnicate", state=tmp_path / "none")
        assert out.returncode == 2
        assert out.stderr.startswith(f"{name}: unknown option --frobnicate\nusage: {name} ")
        assert name == "store-daemon" or f"`{name} --help`" in out.stderr
    assert not (tmp_path / "none").exists()


def test_an_empty_path_is_refused_before_anything_is_done(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for args in (("store-add", "--name", "x", ""), ("store-log", ""), ("store-dump", "")):
        out = command(*args, state=state, cwd=tmp_path)
        assert out.returncode == 2, out
        assert "an empty path names nothing" in out.stderr
    # Refused before connecting: no daemon was started for the default state dir.
    assert not state.exists()


def test_a_mistyped_state_dir_is_not_created_and_no_daemon_starts(tmp_path: Path) -> None:
    typo, empty = tmp_path / "sate", tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "file").write_text("x")
    for named in (typo, empty):  # a dir that holds no store is no store either
        for args in (("store-add", str(tmp_path / "file")), ("store-verify",)):
            out = command(*args, "--state-dir", str(named), state=tmp_path / "default")
            assert out.returncode == 1
            assert out.stderr == (
                f"error: no store at {named}; `store-daemon --state-dir {named} --init` "
                "creates one\n"
            )
    assert not typo.exists() and os.listdir(empty) == []
    assert not (tmp_path / "default").exists()


def test_recipe_errors_name_the_file_and_line(daemon: DaemonProc, tmp_path: Path) -> None:
    (tmp_path / "helper.py").write_text("def broken():\n    return {}['missing']\n")
    cases = {
        "syntax.py": ("x = (\n", "syntax.py:6: SyntaxError: '(' was never closed"),
        "name.py": ("\n\nthing = derivation('t', sh, [bb2])\n", "name.py:8: NameError: name 'bb2'"),
        "api.py": ("src = source('not-here')\n", "api.py:6: "),
        "outputs.py": (
            "\nx = derivation('x', sh, outputs='out')\n",
            "outputs.py:7: DerivationError: x: outputs must be a list of names",
        ),
        "beside.py": ("import helper\n\nhelper.broken()\n", "helper.py:2: KeyError: 'missing'"),
    }
    for file, (body, said) in cases.items():
        path = recipe(tmp_path, body, file)
        out = command("store-build", str(path), state=daemon.state, cwd=tmp_path)
        assert out.returncode == 1, out
        assert out.stderr.startswith(f"{tmp_path}/{said}"), out.stderr
        assert "Traceback" not in out.stderr
        # The daemon's refusal, in its words, at the recipe's line.
        assert file != "api.py" or f"{tmp_path}/not-here" in out.stderr


def test_a_recipe_imports_modules_beside_it_only_while_it_runs(
    daemon: DaemonProc, tmp_path: Path
) -> None:
    (tmp_path / "weft_test_beside.py").write_text(
        "from store.recipe import derivation\n"
        "def thing():\n"
        "    return derivation('beside', '/bin/sh', ['-c', 'echo > $out'])\n"
    )
    path = recipe(tmp_path, "import weft_test_beside\n\ndefault = weft_test_beside.thing()\n")
    before = list(sys.path)
    try:
        with BlockingClient(daemon.socket) as client:
            (drv,) = evaluate(str(path), client)
    finally:
        sys.modules.pop("weft_test_beside", None)
    assert drv.endswith("-beside.drv") and os.path.exists(drv)
    assert sys.path == before


def test_a_recipe_finds_its_relative_sources_beside_it_from_any_directory(
    daemon: DaemonProc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here = tmp_path / "project"
    (here / "data").mkdir(parents=True)
    (here / "data" / "file").write_text("beside the recipe")
    path = recipe(
        here,
        "from store.recipe import derivation, source\n"
        "default = derivation('uses-data', '/bin/sh', ['-c', 'echo > $out'],"
        " inputs=[source('data')])\n",
    )
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)
    (elsewhere / "data" / "file").write_text("the wrong one, in the cwd")
    monkeypatch.chdir(elsewhere)
    with BlockingClient(daemon.socket) as client:
        (drv,) = evaluate(str(path), client)
    (src,) = json.loads(Path(drv).read_text())["inputSrcs"]
    assert Path(src, "file").read_text() == "beside the recipe"


def test_out_link_names_extra_outputs_like_nix(repo_daemon: DaemonProc, tmp_path: Path) -> None:
    tag = os.urandom(4).hex()
    path = recipe(
        tmp_path,
        f"""
        multi = derivation(
            "multi-{tag}", sh, ["sh", "-c", "echo out > $out; echo dev > $dev"],
            env=env, outputs=["out", "dev"],
        )
        other = derivation("other-{tag}", sh, ["sh", "-c", "echo other > $out"], env=env)
        """,
    )
    link = tmp_path / "result"
    out = command(
        "store-build", "-o", str(link), f"{path}:multi", f"{path}:other", state=repo_daemon.state
    )
    assert out.returncode == 0, out.stderr
    made = {p.name: p.read_text() for p in tmp_path.glob("result*")}
    assert made == {"result": "out\n", "result-dev": "dev\n", "result-2": "other\n"}
    assert all(p.is_symlink() for p in tmp_path.glob("result*"))


def test_out_link_refuses_a_file_in_its_way_before_building(
    repo_daemon: DaemonProc, tmp_path: Path
) -> None:
    tag = os.urandom(4).hex()
    body = f'default = derivation("never-{tag}", sh, ["sh", "-c", "echo > $out"], env=env)\n'
    path = recipe(tmp_path, body)
    (tmp_path / "result").write_text("precious\n")
    out = command("store-build", "-o", str(tmp_path / "result"), str(path), state=repo_daemon.state)
    assert out.returncode == 1
    assert f"error: {tmp_path}/result exists and is not a symbolic link" in out.stderr
    assert (tmp_path / "result").read_text() == "precious\n"
    built = [p for p in os.listdir(repo_daemon.store_dir) if p.endswith(f"never-{tag}")]
    assert built == []


def test_timeout_and_max_silent_time_reach_the_daemon(
    repo_daemon: DaemonProc, tmp_path: Path
) -> None:
    tag = os.urandom(4).hex()
    path = recipe(
        tmp_path,
        f"""
        quiet = derivation("quiet-{tag}", sh, ["sh", "-c", "sleep 60"], env=env)
        chatty = derivation(
            "chatty-{tag}", sh, ["sh", "-c", "while :; do echo .; sleep 0.2; done"], env=env
        )
        """,
    )
    state = repo_daemon.state
    began = time.monotonic()
    out = command(
        "store-build", "--no-retry", "--max-silent-time", "1", f"{path}:quiet", state=state
    )
    assert out.returncode == 1 and "silent for 1 s" in out.stderr, out.stderr
    out = command("store-build", "--no-retry", "--timeout", "1.5", f"{path}:chatty", state=state)
    assert out.returncode == 1 and "timed out after 1.5 s" in out.stderr, out.stderr
    assert time.monotonic() - began < 30


def test_limits_that_are_not_positive_finite_numbers_are_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for flag in ("--timeout", "--max-silent-time"):
        for value in ("nan", "inf", "-1", "0", "soon"):
            out = command("store-build", flag, value, "/nowhere.drv", state=state)
            assert out.returncode == 2
            assert f"{flag} takes a number of seconds above 0, not '{value}'" in out.stderr
    assert not state.exists()


def test_a_failed_build_is_reported_in_the_daemons_own_words(
    repo_daemon: DaemonProc, tmp_path: Path
) -> None:
    tag = os.urandom(4).hex()
    script = "echo first; echo second >&2; exit 3"
    body = f'default = derivation("fails-{tag}", sh, ["sh", "-c", "{script}"], env=env)\n'
    path = recipe(tmp_path, body)
    out = command("store-build", "--no-retry", str(path), state=repo_daemon.state)
    assert out.returncode == 1
    with BlockingClient(repo_daemon.socket, on_log=lambda e: None) as client:
        (drv,) = evaluate(str(path), client)
        (result,) = client.call("build", drvs=[drv], retries=0)
    assert "\n" in result["message"]  # the last log lines, which are printed as they are
    assert f"error: {result['message']}\n" in out.stderr


def test_store_log_follows_a_running_build(repo_daemon: DaemonProc, tmp_path: Path) -> None:
    tag = os.urandom(4).hex()
    script = "echo first; sleep 2; echo second; echo > $out"
    body = f'default = derivation("follow-{tag}", sh, ["sh", "-c", "{script}"], env=env)\n'
    with BlockingClient(repo_daemon.socket, on_log=lambda e: None) as client:
        (drv,) = evaluate(str(recipe(tmp_path, body)), client)
    env = {**os.environ, "WEFT_STATE_DIR": str(repo_daemon.state)}
    build = subprocess.Popen([BIN / "store-build", drv], stderr=subprocess.PIPE, env=env)
    try:
        assert build.stderr is not None
        for line in build.stderr:
            if line.startswith(b"building follow-"):
                break
        out = command("store-log", "--follow", drv, state=repo_daemon.state)
        assert out.returncode == 0, out.stderr
        # Both lines: what was there when it asked, and what came until the build ended.
        assert out.stdout == "first\nsecond\n"
        assert build.wait(10) == 0
    finally:
        build.kill()
        build.wait()

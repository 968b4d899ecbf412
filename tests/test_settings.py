"""`weft.toml` and `store-daemon`'s own options: a value that would make every build fail
or hang is refused at start, with the key and its range; stopping needs no valid file;
and a state dir is created only when it is the default one or `--init` asks."""

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest

from bench.daemons import start_daemon, stop_daemon
from daemon.settings import RANGES, Settings
from store.defaults import has_store
from store.layout import ConfigError

STORE_DAEMON = str(Path(sys.executable).parent / "store-daemon")


def daemon_command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [STORE_DAEMON, *args],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def elsewhere() -> Iterator[Path]:
    """A dir outside pytest's /tmp tree: state dirs should not all be of one kind."""
    d = Path(tempfile.mkdtemp(prefix="weft-settings-", dir="/var/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


OUT_OF_RANGE = {
    "build-slots = 0": "build-slots = 0 is out of range: it must be 1..65536",
    "max-jobs = -3": "max-jobs = -3 is out of range: it must be 0..65536",
    "cores = -1": "cores = -1 is out of range: it must be 0..8192",
    "build-uid-base = 0": "build-uid-base = 0 is out of range",
    "max-cpu-pressure = nan": "max-cpu-pressure = nan is out of range: it must be 0..100",
    "max-io-pressure = 101": "max-io-pressure = 101.0 is out of range: it must be 0..100",
    "load-sample-interval = 0": "load-sample-interval = 0.0 is out of range: it must be 0.05..60",
    "load-resume-fraction = 0": "load-resume-fraction = 0.0 is out of range",
    "retry-timeout-factor = inf": "retry-timeout-factor = inf is out of range: it must be 1..100",
    "retries = -1": "retries = -1 is out of range: it must be 0..100",
    "min-free = -5": "min-free = -5 is out of range",
}


@pytest.mark.parametrize("line", list(OUT_OF_RANGE))
def test_a_number_out_of_its_range_is_refused_with_the_key_and_the_range(line: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_toml(line, "/etc/weft.toml")
    assert str(refused.value).startswith("/etc/weft.toml: ")
    assert OUT_OF_RANGE[line] in str(refused.value)


WRONG = {
    "build-slots = true": "build-slots must be an integer, not bool",
    "retries = 1.5": "retries must be an integer, not float",
    "share-cpu = 1": "share-cpu must be true or false, not int",
    'trusted-users = "root"': "trusted-users must be a list, not str",
    "trusted-users = [1]": "trusted-users must be a list of non-empty strings",
    'allowed-users = [""]': "allowed-users must be a list of non-empty strings",
    'sandbox-paths = ["relative/dir"]': "'relative/dir' is not an absolute path that exists",
    'sandbox-paths = ["/no/such/dir"]': "'/no/such/dir' is not an absolute path that exists",
    'load-proc-dir = "/no/such/proc"': "'/no/such/proc' is not an absolute path that exists",
    "max-jbos = 3": "unknown setting 'max-jbos' (did you mean 'max-jobs'?)",
    "colour = 3": "unknown setting 'colour'",
    "max-jobs = 65\nbuild-slots = 64": "max-jobs = 65 is more than build-slots = 64",
    "min-free = 10\nmax-free = 5": "max-free = 5 is under min-free = 10",
    "build-uid-base = 4294967290": "past the highest uid (4294967294)",
}


@pytest.mark.parametrize("text", list(WRONG))
def test_a_setting_of_the_wrong_kind_or_at_odds_with_another_is_refused(text: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_toml(text)
    assert WRONG[text] in str(refused.value)


def test_every_number_has_a_range_and_the_defaults_are_within_them() -> None:
    defaults = Settings()
    numbers = {f.name for f in fields(Settings) if type(getattr(defaults, f.name)) in (int, float)}
    assert set(RANGES) == numbers
    for name, (low, high) in RANGES.items():
        assert low <= getattr(defaults, name) <= high, name
    fine = Settings.from_toml("max-jobs = 4\nbuild-slots = 8\nmax-cpu-pressure = 0\nmax-free = 0")
    assert (fine.max_jobs, fine.build_slots, fine.max_cpu_pressure) == (4, 8, 0.0)


def test_a_daemon_refuses_to_start_on_settings_that_would_hang_every_build(
    elsewhere: Path,
) -> None:
    state = elsewhere / "state"
    state.mkdir()
    (state / "weft.toml").write_text("build-slots = 0\n")
    run = daemon_command("--state-dir", str(state), "--init", "--foreground")
    assert run.returncode == 1
    assert "build-slots = 0 is out of range: it must be 1..65536" in run.stderr
    # Refused before anything was made.
    assert os.listdir(state) == ["weft.toml"]


def test_stop_needs_no_valid_settings_file(tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "state")
    try:
        (d.state / "weft.toml").write_text("max-jbos = 3\nthis is not toml\n")
        stopped = daemon_command("--state-dir", str(d.state), "--stop")
        assert stopped.returncode == 0, stopped.stderr
        assert "daemon stopped" in stopped.stderr
        assert d.proc.wait(15) == 0
    finally:
        stop_daemon(d)


def test_a_named_state_dir_without_a_store_is_refused_unless_init_asks(elsewhere: Path) -> None:
    typo = elsewhere / "stat"
    refused = daemon_command("--state-dir", str(typo))
    assert refused.returncode == 1
    assert f"no store at {typo}; `store-daemon --state-dir {typo} --init` creates one" in (
        refused.stderr
    )
    assert not typo.exists()
    # An existing dir is no store either: nothing is made in it.
    typo.mkdir()
    assert daemon_command("--state-dir", str(typo)).returncode == 1
    assert os.listdir(typo) == []
    made = daemon_command("--state-dir", str(typo), "--init")
    try:
        assert made.returncode == 0, made.stderr
        assert f"creating a store at {typo}" in made.stderr
        assert has_store(str(typo))
    finally:
        assert daemon_command("--state-dir", str(typo), "--stop").returncode == 0
    # Once made, naming it is enough.
    again = daemon_command("--state-dir", str(typo))
    try:
        assert again.returncode == 0, again.stderr
        assert "creating" not in again.stderr
    finally:
        assert daemon_command("--state-dir", str(typo), "--stop").returncode == 0


def test_a_state_dir_too_deep_for_its_socket_is_refused_naming_the_limit_before_anything_is_made(
    tmp_path: Path,
) -> None:
    deep = tmp_path / ("d" * 120)
    refused = daemon_command("--state-dir", str(deep), "--init")
    assert refused.returncode == 1
    assert "a Unix socket's may be at most 107" in refused.stderr
    assert "--socket" in refused.stderr
    assert not deep.exists()


def test_the_default_state_dir_is_created_when_missing(tmp_path: Path) -> None:
    default = tmp_path / "fresh" / "weft"
    env = {"WEFT_STATE_DIR": str(default)}
    started = daemon_command(env=env)
    try:
        assert started.returncode == 0, started.stderr
        assert has_store(str(default))
    finally:
        assert daemon_command("--stop", env=env).returncode == 0
    # Named, it is still the default one: what a command starting its daemon passes.
    named = daemon_command("--state-dir", str(default), env=env)
    try:
        assert named.returncode == 0, named.stderr
    finally:
        assert daemon_command("--stop", env=env).returncode == 0


def test_store_daemon_has_help_with_a_line_per_flag_and_a_version() -> None:
    shown = daemon_command("--help")
    assert shown.returncode == 0
    for flag in ("--foreground", "--init", "--stop", "--grace SECONDS", "--state-dir DIR"):
        (line,) = [x for x in shown.stdout.splitlines() if x.strip().startswith(flag)]
        assert len(line.split(maxsplit=len(flag.split()))) > len(flag.split()), line
    assert "(default: 10)" in shown.stdout
    version = daemon_command("--version")
    assert version.returncode == 0 and version.stdout.startswith("store-daemon (weft) ")
    for bad in (["--grace", "nan"], ["--grace", "-1"], ["--frobnicate"], ["extra"]):
        run = daemon_command(*bad)
        assert run.returncode == 2, bad
        assert "usage: store-daemon" in run.stderr

"""The command server and its client, `store-build` as install.sh installs it: a real C
client, a real server process forking real commands against a real daemon, seen from
the user's side (tests/test_cmdserver_wire.py has the server's own defences).

Each test has a runtime directory of its own (XDG_RUNTIME_DIR), so a server of its own,
stopped when the test ends."""

import json
import os
import resource
import signal
import subprocess
import textwrap
import time
from pathlib import Path

from tests.cmdserver_fixtures import (
    CLIENT,
    ROOT,
    Runtime,
    probe,
    servers,
    wait_for,
)


def test_the_first_command_starts_a_server_and_the_next_runs_in_it(
    runtime: Runtime, tmp_path: Path
) -> None:
    first = probe(runtime, tmp_path)
    server = runtime.serving()
    assert first["ppid"] != server
    second = probe(runtime, tmp_path)
    assert second["ppid"] == server
    # The socket's directory is the user's alone.
    assert runtime.socket().parent.stat().st_mode & 0o777 == 0o700


def test_a_command_in_the_server_has_the_clients_directory_umask_environment_limits_and_stdin(
    runtime: Runtime, tmp_path: Path
) -> None:
    probe(runtime, tmp_path)
    server = runtime.serving()
    where = tmp_path / "elsewhere"
    where.mkdir()

    def as_client() -> None:
        os.umask(0o027)
        os.chdir(where)
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, hard))

    recipe = tmp_path / "probe.py"
    out = tmp_path / "seen.json"
    done = subprocess.run(
        [CLIENT, "--socket", runtime.daemon.socket, str(recipe)],
        env={**runtime.env, "PROBE_OUT": str(out), "PROBE_MARK": "marked"},
        input="what the client reads\n",
        capture_output=True,
        text=True,
        preexec_fn=as_client,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    seen = json.loads(out.read_text())
    assert seen["ppid"] == server
    assert seen["cwd"] == str(where)
    assert seen["umask"] == 0o027
    assert seen["mark"] == "marked"
    assert seen["nofile"] == 200
    assert seen["stdin"] == "what the client reads\n"


def test_exit_codes_and_messages_come_back_through_the_client(
    runtime: Runtime, tmp_path: Path
) -> None:
    probe(runtime, tmp_path)
    runtime.serving()
    usage = runtime.run("--max-jobs", "many", "x.py")
    assert usage.returncode == 2
    assert "--max-jobs takes a whole number, not 'many'" in usage.stderr
    broken = tmp_path / "broken.py"
    broken.write_text("x = 1\nraise ValueError('no good')\n")
    failed = runtime.run(str(broken))
    assert failed.returncode == 1
    assert f"{broken}:2: ValueError: no good" in failed.stderr
    leaving = tmp_path / "leaving.py"
    leaving.write_text("import sys\nsys.exit(7)\n")
    assert runtime.run(str(leaving)).returncode == 7
    # The server outlived the command that called sys.exit, and serves the next.
    assert probe(runtime, tmp_path)["ppid"] == runtime.serving()


def _sleeper(tmp: Path) -> Path:
    recipe = tmp / "sleeper.py"
    recipe.write_text(
        textwrap.dedent(
            """\
            import os, time
            open(os.environ["PROBE_OUT"], "w").write(str(os.getpid()))
            time.sleep(60)
            """
        )
    )
    return recipe


def _start_sleeper(runtime: Runtime, tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A client whose command (in the server) sleeps, and the command's pid."""
    out = tmp / "sleeper.pid"
    client = subprocess.Popen(
        [CLIENT, "--socket", runtime.daemon.socket, str(_sleeper(tmp))],
        env={**runtime.env, "PROBE_OUT": str(out)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for(lambda: out.exists() and out.read_text())
    return client, int(out.read_text())


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def test_ctrl_c_at_the_client_interrupts_its_command(runtime: Runtime, tmp_path: Path) -> None:
    probe(runtime, tmp_path)
    server = runtime.serving()
    client, command = _start_sleeper(runtime, tmp_path)
    assert Path(f"/proc/{command}/stat").read_text().split()[3] == str(server)
    client.send_signal(signal.SIGINT)
    assert client.wait(10) == 130
    wait_for(lambda: _gone(command), 10)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_ctrl_z_stops_the_client_and_its_command_and_fg_continues_both(
    runtime: Runtime, tmp_path: Path
) -> None:
    probe(runtime, tmp_path)
    runtime.serving()
    client, command = _start_sleeper(runtime, tmp_path)
    client.send_signal(signal.SIGTSTP)
    wait_for(lambda: _state(client.pid) == "T" and _state(command) == "T", 10)
    client.send_signal(signal.SIGCONT)
    wait_for(lambda: _state(client.pid) != "T" and _state(command) != "T", 10)
    client.send_signal(signal.SIGINT)
    assert client.wait(10) == 130


def test_a_client_killed_outright_takes_its_command_with_it(
    runtime: Runtime, tmp_path: Path
) -> None:
    probe(runtime, tmp_path)
    runtime.serving()
    client, command = _start_sleeper(runtime, tmp_path)
    client.kill()
    client.wait(10)
    wait_for(lambda: _gone(command), 10)
    assert probe(runtime, tmp_path)["ppid"] == runtime.serving()


def test_a_command_killed_by_a_signal_kills_its_client_with_the_same_signal(
    runtime: Runtime, tmp_path: Path
) -> None:
    probe(runtime, tmp_path)
    runtime.serving()
    client, command = _start_sleeper(runtime, tmp_path)
    os.kill(command, signal.SIGKILL)
    assert client.wait(10) == -signal.SIGKILL


def test_a_server_whose_code_changed_declines_and_the_client_starts_a_new_one(
    runtime: Runtime, tmp_path: Path
) -> None:
    probe(runtime, tmp_path)
    old = runtime.serving()
    module = ROOT / "store" / "recipebusybox.py"
    before = module.stat()
    os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    try:
        declined = probe(runtime, tmp_path)
        # Run directly, by the client, while the old server leaves and a new one starts.
        assert declined["ppid"] != old
        wait_for(lambda: _gone(old), 10)
        new = runtime.serving()
        assert new != old
        assert probe(runtime, tmp_path)["ppid"] == new
    finally:
        os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_client_with_another_pythonpath_runs_its_command_itself(
    runtime: Runtime, tmp_path: Path
) -> None:
    probe(runtime, tmp_path)
    server = runtime.serving()
    assert probe(runtime, tmp_path, PYTHONPATH=str(tmp_path))["ppid"] != server
    assert probe(runtime, tmp_path)["ppid"] == server


def test_weft_command_server_0_runs_the_command_itself_and_starts_no_server(
    runtime: Runtime, tmp_path: Path
) -> None:
    for _ in range(2):
        probe(runtime, tmp_path, WEFT_COMMAND_SERVER="0")
    time.sleep(0.5)
    assert not servers(runtime.path)
    assert not (runtime.path / "weft").exists()

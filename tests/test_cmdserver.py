"""The command server and its client, `store-build` as install.sh installs it: a real C
client, a real server process forking real commands against a real daemon.

Each test has a runtime directory of its own (XDG_RUNTIME_DIR), so a server of its own,
stopped when the test ends."""

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.daemons import processes_naming
from cmdserver import wire
from tests.daemon_fixtures import DaemonProc, run_as_nobody

ROOT = Path(__file__).parent.parent
CLIENT = Path(sys.executable).parent / "store-build"

# A recipe that says what its process is: where it runs, with what, and under whom.
PROBE = """\
import json, os, resource, sys
json.dump({
    "pid": os.getpid(),
    "ppid": os.getppid(),
    "cwd": os.getcwd(),
    "umask": os.umask(0o22),
    "mark": os.environ.get("PROBE_MARK"),
    "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    "stdin": sys.stdin.read(),
}, open(os.environ["PROBE_OUT"], "w"))
print("to stdout")
print("to stderr", file=sys.stderr)
"""


def _wait_for(condition: Callable[[], object], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)


def _servers(runtime: Path) -> list[int]:
    """The pids of the servers whose socket is under `runtime` (not their commands,
    forks that share their command line)."""
    found = [
        pid
        for pid in processes_naming(str(runtime))
        if b"cmdserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    return [pid for pid in found if _parent(pid) not in found]


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


class Runtime:
    """A runtime directory, the environment that points the client at it, and the
    client run with it."""

    def __init__(self, path: Path, daemon: DaemonProc) -> None:
        self.path = path
        self.daemon = daemon
        self.env = {**os.environ, "XDG_RUNTIME_DIR": str(path), "WEFT_STATE_DIR": str(daemon.state)}
        self.env.pop("WEFT_COMMAND_SERVER", None)

    def run(
        self, *args: str, env: dict[str, str] | None = None, **kw: object
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CLIENT, "--socket", self.daemon.socket, *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
            **kw,  # type: ignore[arg-type]
        )

    def socket(self) -> Path:
        (sock,) = (self.path / "weft").glob("cmd-*.sock")
        return sock

    def serving(self) -> int:
        """The server's pid, once it answers (a first command starts it)."""
        _wait_for(lambda: list((self.path / "weft").glob("cmd-*.sock")) and _servers(self.path))
        _wait_for(lambda: _answers(self.socket()))
        (pid,) = _servers(self.path)
        return pid


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


@pytest.fixture
def runtime(tmp_path: Path, daemon: DaemonProc) -> Iterator[Runtime]:
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    yield Runtime(path, daemon)
    for pid in _servers(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _probe(runtime: Runtime, tmp: Path, *, stdin: str = "", **env: str) -> dict:
    recipe = tmp / "probe.py"
    recipe.write_text(PROBE)
    out = tmp / "probe.json"
    done = runtime.run(str(recipe), input=stdin, env={"PROBE_OUT": str(out), **env})
    # The probe defines no derivation: the command's usage error, after the recipe ran.
    assert done.returncode == 2, done.stderr
    assert "defines no derivation" in done.stderr
    assert done.stdout == "to stdout\n"
    assert done.stderr.startswith("to stderr\n")
    return json.loads(out.read_text())


def test_the_first_command_starts_a_server_and_the_next_runs_in_it(
    runtime: Runtime, tmp_path: Path
) -> None:
    first = _probe(runtime, tmp_path)
    server = runtime.serving()
    assert first["ppid"] != server
    second = _probe(runtime, tmp_path)
    assert second["ppid"] == server
    # The socket's directory is the user's alone.
    assert runtime.socket().parent.stat().st_mode & 0o777 == 0o700


def test_a_command_in_the_server_has_the_clients_directory_umask_environment_limits_and_stdin(
    runtime: Runtime, tmp_path: Path
) -> None:
    _probe(runtime, tmp_path)
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
    _probe(runtime, tmp_path)
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
    assert _probe(runtime, tmp_path)["ppid"] == runtime.serving()


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
    _wait_for(lambda: out.exists() and out.read_text())
    return client, int(out.read_text())


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def test_ctrl_c_at_the_client_interrupts_its_command(runtime: Runtime, tmp_path: Path) -> None:
    _probe(runtime, tmp_path)
    server = runtime.serving()
    client, command = _start_sleeper(runtime, tmp_path)
    assert Path(f"/proc/{command}/stat").read_text().split()[3] == str(server)
    client.send_signal(signal.SIGINT)
    assert client.wait(10) == 130
    _wait_for(lambda: _gone(command), 10)


def test_a_client_killed_outright_takes_its_command_with_it(
    runtime: Runtime, tmp_path: Path
) -> None:
    _probe(runtime, tmp_path)
    runtime.serving()
    client, command = _start_sleeper(runtime, tmp_path)
    client.kill()
    client.wait(10)
    _wait_for(lambda: _gone(command), 10)
    assert _probe(runtime, tmp_path)["ppid"] == runtime.serving()


def test_a_command_killed_by_a_signal_kills_its_client_with_the_same_signal(
    runtime: Runtime, tmp_path: Path
) -> None:
    _probe(runtime, tmp_path)
    runtime.serving()
    client, command = _start_sleeper(runtime, tmp_path)
    os.kill(command, signal.SIGKILL)
    assert client.wait(10) == -signal.SIGKILL


def test_a_server_whose_code_changed_declines_and_the_client_starts_a_new_one(
    runtime: Runtime, tmp_path: Path
) -> None:
    _probe(runtime, tmp_path)
    old = runtime.serving()
    module = ROOT / "store" / "recipebusybox.py"
    before = module.stat()
    os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    try:
        declined = _probe(runtime, tmp_path)
        # Run directly, by the client, while the old server leaves and a new one starts.
        assert declined["ppid"] != old
        _wait_for(lambda: _gone(old), 10)
        new = runtime.serving()
        assert new != old
        assert _probe(runtime, tmp_path)["ppid"] == new
    finally:
        os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_client_with_another_pythonpath_runs_its_command_itself(
    runtime: Runtime, tmp_path: Path
) -> None:
    _probe(runtime, tmp_path)
    server = runtime.serving()
    assert _probe(runtime, tmp_path, PYTHONPATH=str(tmp_path))["ppid"] != server
    assert _probe(runtime, tmp_path)["ppid"] == server


def test_weft_command_server_0_runs_the_command_itself_and_starts_no_server(
    runtime: Runtime, tmp_path: Path
) -> None:
    for _ in range(2):
        _probe(runtime, tmp_path, WEFT_COMMAND_SERVER="0")
    time.sleep(0.5)
    assert not _servers(runtime.path)
    assert not (runtime.path / "weft").exists()


def _raw_request(argv: list[bytes], env: list[bytes]) -> bytes:
    fields = [b"store-build", b"/", b"18", str(len(argv)).encode(), *argv, str(len(env)).encode()]
    fields += [*env, b"0"]
    body = b"".join(f + b"\0" for f in fields)
    return wire.HEAD.pack(wire.MAGIC, len(body)) + body


def test_malformed_and_stalled_requests_leave_the_server_serving_others(
    runtime: Runtime, tmp_path: Path
) -> None:
    _probe(runtime, tmp_path)
    server = runtime.serving()
    path = str(runtime.socket())
    with contextlib.ExitStack() as stack:
        stalled = stack.enter_context(socket.socket(socket.AF_UNIX))
        stalled.connect(path)
        stalled.send(wire.HEAD.pack(wire.MAGIC, 1000)[:6])
        for junk in (
            b"GET / HTTP/1.1\r\n\r\n",
            wire.HEAD.pack(wire.MAGIC, wire.MAX_REQUEST + 1),
            _raw_request([], []),  # no descriptors
        ):
            bad = stack.enter_context(socket.socket(socket.AF_UNIX))
            bad.connect(path)
            bad.sendall(junk)
            bad.settimeout(10)
            assert bad.recv(8) == b""  # closed on it, with nothing said
        started = time.monotonic()
        assert _probe(runtime, tmp_path)["ppid"] == server
        assert time.monotonic() - started < 5
    assert _servers(runtime.path) == [server]


def test_a_peer_of_another_user_is_declined(tmp_path: Path) -> None:
    # The socket's directory is the user's alone; this one is open, so that the other
    # user reaches the socket and the server's own check is what refuses.
    where = Path(tempfile.mkdtemp(prefix="weft-cmd-", dir="/var/tmp"))
    where.chmod(0o711)
    path = where / "open.sock"
    server = subprocess.Popen([sys.executable, "-m", "cmdserver", str(path)], cwd=ROOT)
    try:
        _wait_for(lambda: _answers(path))
        path.chmod(0o777)
        done = run_as_nobody(_declined_probe(path))
    finally:
        server.kill()
        shutil.rmtree(where)
    assert done.stdout.strip() == f"({int(wire.Reply.DECLINED)}, {int(wire.Declined.CREDENTIALS)})"


def _declined_probe(path: Path) -> str:
    return textwrap.dedent(
        f"""
        import array, socket, struct
        s = socket.socket(socket.AF_UNIX)
        s.connect({str(path)!r})
        fds = array.array("i", [0, 1, 2])
        s.sendmsg([{_raw_request([], [])!r}], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        print(struct.unpack("=ii", s.recv(8)))
        """
    )


def test_an_idle_server_leaves_and_takes_its_socket_with_it(tmp_path: Path) -> None:
    path = tmp_path / "idle.sock"
    server = subprocess.Popen(
        [sys.executable, "-m", "cmdserver", str(path), "--idle", "0.5"], cwd=ROOT
    )
    try:
        _wait_for(lambda: _answers(path))
        assert server.wait(20) == 0
        assert not path.exists()
    finally:
        server.kill()


def test_of_two_servers_started_at_once_one_serves_and_the_other_leaves(tmp_path: Path) -> None:
    path = tmp_path / "two.sock"
    both = [
        subprocess.Popen([sys.executable, "-m", "cmdserver", str(path)], cwd=ROOT) for _ in range(2)
    ]
    try:
        _wait_for(lambda: any(s.poll() is not None for s in both))
        (left,) = [s for s in both if s.poll() is not None]
        (stays,) = [s for s in both if s.poll() is None]
        assert left.returncode == 0
        assert _answers(path)
        stays.send_signal(signal.SIGTERM)
        assert stays.wait(10) == 0
        assert not path.exists()
    finally:
        for s in both:
            s.kill()

"""The command server's test fixtures: a runtime dir with a server of its own, the
installed client run in it, and a recipe that reports what its process is."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.daemons import processes_naming
from cmdserver import wire
from tests.daemon_fixtures import DaemonProc

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


def wait_for(condition: Callable[[], object], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)


def servers(runtime: Path) -> list[int]:
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
        wait_for(lambda: list((self.path / "weft").glob("cmd-*.sock")) and servers(self.path))
        wait_for(lambda: answers(self.socket()))
        (pid,) = servers(self.path)
        return pid


def answers(path: Path) -> bool:
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
    for pid in servers(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def probe(runtime: Runtime, tmp: Path, *, stdin: str = "", **env: str) -> dict:
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


def raw_request(argv: list[bytes], env: list[bytes]) -> bytes:
    fields = [b"store-build", b"/", b"18", str(len(argv)).encode(), *argv, str(len(env)).encode()]
    fields += [*env, b"0"]
    body = b"".join(f + b"\0" for f in fields)
    return wire.HEAD.pack(wire.MAGIC, len(body)) + body

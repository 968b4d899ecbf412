"""A real store-daemon process on a temporary state dir, for integration tests."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.cli.blocking import BlockingClient
from daemon.cli.build import DaemonRecipeStore
from store import nar
from store.recipe import Derivation, busybox, derivation, using


@dataclass
class DaemonProc:
    state: Path
    socket: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def store_dir(self) -> str:
        return str(self.state / "store")

    def rss_kib(self, field: str = "VmRSS") -> int:
        return rss_kib(self.proc.pid, field)

    def alive(self) -> bool:
        return self.proc.poll() is None


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def wait_for_socket(
    path: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}")
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            return
        except OSError:
            time.sleep(0.02)
        finally:
            s.close()
    raise TimeoutError(f"no daemon on {path}")


def start_daemon(state: Path, *extra: str) -> DaemonProc:
    state.mkdir(parents=True, exist_ok=True)
    log = state.parent / f"{state.name}-daemon.log"
    sock = str(state / "var" / "daemon.sock")
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "daemon.main",
                "--foreground",
                "--state-dir",
                str(state),
                *extra,
            ],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
        )
    wait_for_socket(sock, proc)
    return DaemonProc(state, sock, proc, log)


def stop_daemon(d: DaemonProc) -> None:
    if d.alive():
        d.proc.send_signal(signal.SIGTERM)
        try:
            d.proc.wait(15)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProc]:
    d = start_daemon(tmp_path / "state", "--grace", "5")
    yield d
    stop_daemon(d)
    assert d.proc.returncode == 0, d.log.read_text()


def archive_of(path: Path) -> bytes:
    return b"".join(nar.dump(path))


def run_as_nobody(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run Python code as uid/gid 65534 (nobody) with setpriv."""
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


@pytest.fixture
def builder_daemon() -> Iterator[DaemonProc]:
    # Not under /tmp: the sandbox mounts its own /tmp over that path.
    d = Path(tempfile.mkdtemp(prefix="weft-build-", dir="/var/tmp"))
    daemon = start_daemon(d / "state")
    yield daemon
    stop_daemon(daemon)
    shutil.rmtree(d, ignore_errors=True)


class Graph:
    def __init__(self, daemon: DaemonProc) -> None:
        self.daemon = daemon
        self.client = BlockingClient(daemon.socket)
        self.logs: list[tuple[str, int | None]] = []
        self.client.on_log = lambda e: self.logs.append((e.message, e.done))
        self._using = using(DaemonRecipeStore(self.client, daemon.store_dir))
        self._using.__enter__()
        self.bb = busybox()

    def sh(self, name: str, script: str, **kw: object) -> Derivation:
        env = {"PATH": f"{self.bb}/bin", **kw.pop("env", {})}  # type: ignore[dict-item]
        return derivation(name, f"{self.bb}/bin/busybox", ["sh", "-c", script], env=env, **kw)

    def build(self, *drvs: Derivation, **args: object) -> list[dict]:
        return self.client.call("build", drvs=[d.path for d in drvs], **args)

    def close(self) -> None:
        self._using.__exit__(None, None, None)
        self.client.close()


@pytest.fixture
def graph(builder_daemon: DaemonProc) -> Iterator[Graph]:
    g = Graph(builder_daemon)
    yield g
    g.close()

"""A real store-daemon process on a temporary state dir, for integration tests (the process
itself is `bench/daemons.py`'s, shared with the benchmarks)."""

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.daemons import DaemonProc, start_daemon, stop_daemon
from daemon.cli.blocking import BlockingClient
from daemon.cli.build import DaemonRecipeStore
from store import nar
from store.recipe import Derivation, busybox, derivation, using


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


ONE_SLOT = "build-slots = 1\nmax-jobs = 1\n"


@pytest.fixture(params=["/var/tmp", "/tmp"], ids=["state-in-var-tmp", "state-in-tmp"])
def one_slot(request: pytest.FixtureRequest) -> Iterator["Graph"]:
    """A daemon with one build slot, its state dir under /var/tmp or /tmp (whose path the
    sandbox's own /tmp then holds: the store dir's mount point is made in it)."""
    where = Path(tempfile.mkdtemp(prefix="weft-one-slot-", dir=request.param))
    where.chmod(0o755)
    state = where / "state"
    state.mkdir()
    (state / "weft.toml").write_text(ONE_SLOT)
    d = start_daemon(state)
    graph = Graph(d)
    yield graph
    graph.close()
    stop_daemon(d)
    shutil.rmtree(where, ignore_errors=True)


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

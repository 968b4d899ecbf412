"""Builds a weft daemon sends to a real farm (contrib/remote/farm: PostgreSQL, BuildGrid,
two store-workers), checked against local builds of the same graph: the same archives,
built in workers, shared through the action cache, failures and stops carried over, and
outputs that do not match their digests refused.

Output paths depend on the store dir, so every daemon here runs at the one state dir
path the workers serve (`--as-state-dir`): a test moves the last daemon's state dir away
before it starts the next.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.daemons import DaemonProc, start_daemon, stop_daemon
from store.recipe import Derivation
from tests.daemon_fixtures import Graph
from tests.remotefarm import Farm, launch_farm, needs_engine

pytestmark = needs_engine()

# A builder's process seen from the host, or gone: within a second or two of being
# asked; a generous bound for a machine busy with other tests.
PROCESS_SECONDS = 30


class Site:
    """The state dir path every daemon of the module uses in turn, and the farm."""

    def __init__(self, base: Path, farm: Farm) -> None:
        self.base = base
        self.state = base / "state"
        self.farm = farm
        self.runs = 0

    def start(self, policy: str = "all", extra: str = "") -> tuple[DaemonProc, Graph]:
        """A daemon on a fresh state dir at the path (the previous one's entries moved
        away: the directory itself is where each worker's own state dir is mounted, in
        its mount namespace, and a rename here would detach that mount)."""
        if any(self.state.iterdir()):
            self.runs += 1
            away = self.base / f"state-{self.runs}"
            away.mkdir()
            for entry in self.state.iterdir():
                entry.rename(away / entry.name)
        (self.state / "weft.toml").write_text(
            f'remote-endpoint = "{self.farm.endpoint}"\nremote-policy = "{policy}"\n{extra}'
        )
        daemon = start_daemon(self.state)
        return daemon, Graph(daemon)


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    # The state dir not under /tmp (the sandbox mounts its own /tmp there); the farm's
    # under /tmp, for a short socket path.
    base = Path(tempfile.mkdtemp(prefix="weft-rb-", dir="/var/tmp"))
    farm_dir = Path(tempfile.mkdtemp(prefix="wrb-", dir="/tmp"))
    (base / "state").mkdir()
    farm = launch_farm(farm_dir, workers=2, store_dir=base / "state" / "store")
    try:
        yield Site(base, farm)
    finally:
        farm.stop()
        shutil.rmtree(farm_dir, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def remote(site: Site) -> Iterator[Graph]:
    daemon, g = site.start()
    yield g
    g.close()
    stop_daemon(daemon)


def _graph(g: Graph, tag: str) -> list[Derivation]:
    """A diamond: two leaves, a middle using both, a top using the middle and a leaf."""
    a = g.sh(f"leaf-a-{tag}", "echo a > $out; mkdir -p $out.d", env={"T": tag})
    b = g.sh(f"leaf-b-{tag}", "mkdir $out; echo b > $out/b; ln -s b $out/link")
    mid = g.sh(f"mid-{tag}", f"cat {a.out} {b.out}/b > $out; echo {b.out} >> $out")
    top = g.sh(f"top-{tag}", f"mkdir $out; cp {mid.out} $out/m; echo {a.out} > $out/a")
    return [a, b, mid, top]


def _hashes(g: Graph, drvs: list[Derivation]) -> dict[str, str]:
    outs = [d.out for d in drvs]
    return {p: g.client.call("path-info", path=p)["nar_hash"] for p in outs}


def _command(daemon: DaemonProc, name: str, *args: str) -> list[str]:
    return [str(Path(sys.executable).parent / name), *args]


def _env(daemon: DaemonProc) -> dict[str, str]:
    return {**os.environ, "WEFT_STATE_DIR": str(daemon.state)}


def _log(daemon: DaemonProc, drv: Derivation) -> str:
    done = subprocess.run(
        _command(daemon, "store-log", drv.path),
        capture_output=True,
        text=True,
        env=_env(daemon),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _executions(farm: Farm) -> int:
    """How many leases the workers ended, by their logs."""
    return sum(farm.worker_log(i).count(": lease ") for i in range(2))


def _local_remote_cached(site: Site, make: Callable[[Graph], list[Derivation]]) -> None:
    """The graph built locally, then on the farm by a daemon with an empty store at the
    same path (the same archives, built in workers), then by another such daemon from
    the action cache (no worker ran anything)."""
    daemon, g = site.start("none")
    try:
        drvs = make(g)
        _built(g, drvs)
        local = _hashes(g, drvs)
    finally:
        g.close()
        stop_daemon(daemon)
    daemon, g = site.start("all")
    try:
        drvs = make(g)
        _built(g, drvs)
        assert _hashes(g, drvs) == local
        for d in drvs:
            assert "built remotely by worker-" in _log(daemon, d)
    finally:
        g.close()
        stop_daemon(daemon)
    before = _executions(site.farm)
    assert before >= len(drvs)
    logged = daemon.log.read_text().count("from the action cache")
    daemon, g = site.start("all")
    try:
        drvs = make(g)
        _built(g, drvs)
        assert _hashes(g, drvs) == local
        for d in drvs:
            assert "from the action cache, built remotely by worker-" in _log(daemon, d)
    finally:
        g.close()
        stop_daemon(daemon)
    assert _executions(site.farm) == before
    assert daemon.log.read_text().count("from the action cache") == logged + len(drvs)


def test_a_graph_built_on_the_farm_equals_a_local_build_and_the_cache_serves_it(
    site: Site,
) -> None:
    _local_remote_cached(site, lambda g: _graph(g, "diamond"))


def _built(g: Graph, drvs: list[Derivation]) -> None:
    results = g.build(*drvs, max_jobs=4, retries=0)
    assert [r["status"] for r in results] == ["built"] * len(drvs), results


def test_a_builder_exiting_3_on_a_worker_fails_with_exit_code_3(remote: Graph) -> None:
    drv = remote.sh("exit-three", "echo about to fail; exit 3")
    [r] = remote.build(drv, retries=0)
    assert r["status"] == "failed"
    assert "failed with exit code 3" in r["message"]
    assert "about to fail" in r["message"]
    assert not Path(drv.out).exists()


def _running(marker: str) -> bool:
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    return found.returncode == 0


def _until(condition: object, what: str) -> None:
    deadline = time.monotonic() + PROCESS_SECONDS
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_a_remote_timeout_stops_the_remote_build(remote: Graph) -> None:
    drv = remote.sh("too-slow", "sleep 31.25; echo never > $out")
    [r] = remote.build(drv, retries=0, timeout=3)
    assert r["status"] == "failed"
    assert "timed out" in r["message"], r
    _until(lambda: not _running("sleep 31.25"), "the remote builder still runs")
    assert not Path(drv.out).exists()


def test_a_client_that_goes_away_stops_the_remote_build(remote: Graph) -> None:
    drv = remote.sh("abandoned", "sleep 32.75; echo never > $out")
    daemon = remote.daemon
    client = subprocess.Popen(
        _command(daemon, "store-build", "--no-retry", drv.path),
        env=_env(daemon),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _until(lambda: _running("sleep 32.75"), "the remote builder never started")
    finally:
        client.kill()  # the request ends with its connection
        client.wait()
    _until(lambda: not _running("sleep 32.75"), "the remote builder still runs")
    assert not Path(drv.out).exists()


def test_a_tampered_output_blob_is_refused_and_nothing_registered(site: Site) -> None:
    content = b"tamper me %f\n" % time.time()
    daemon, g = site.start()
    try:
        drv = g.sh("tampered", f"printf '{content.decode()}' > $out")
        _built(g, [drv])
    finally:
        g.close()
        stop_daemon(daemon)
    blob = site.farm.blob_path(hashlib.sha256(content).hexdigest())
    assert blob.exists(), blob
    blob.chmod(0o644)
    blob.write_bytes(content.replace(b"tamper", b"TAMPER"))
    daemon, g = site.start()
    try:
        drv = g.sh("tampered", f"printf '{content.decode()}' > $out")
        [r] = g.build(drv, retries=0)
        assert r["status"] == "failed", r
        assert "refused" in r["message"], r
        assert not g.client.call("is-valid", paths=[drv.out])
        assert not Path(drv.out).exists()
        # What was downloaded went with the failure, not left for the next start.
        tmp = Path(drv.out).parent / ".tmp"
        assert not [e for e in os.listdir(tmp) if e.endswith(".remote")]
    finally:
        g.close()
        stop_daemon(daemon)


def test_a_worker_killed_mid_build_leaves_the_build_to_another_and_nothing_partial(
    site: Site, remote: Graph
) -> None:
    marker = f"weft-survivor-{time.monotonic_ns()}"
    # Long enough for the kill to land mid-build on a busy machine (seen, then killed).
    drv = remote.sh("survivor", f"echo {marker} > $out.part; sleep 6; mv $out.part $out")
    results: list[dict] = []
    caller = threading.Thread(target=lambda: results.extend(remote.build(drv, retries=0)))
    caller.start()
    try:
        _until(lambda: _running(marker), "the remote builder never started")
    finally:
        first = _building(site.farm, drv)
        if first is not None:
            site.farm.kill_worker(first)
        caller.join(PROCESS_SECONDS * 4)
    assert first is not None, "no worker says it builds"
    [r] = results
    assert r["status"] == "built", r
    assert Path(drv.out).read_text() == f"{marker}\n"
    assert f"built remotely by worker-{1 - first}" in _log(remote.daemon, drv)


def _building(farm: Farm, drv: Derivation) -> int | None:
    """Which worker says it builds `drv`."""
    return next((i for i in (0, 1) if f"building {drv.path}" in farm.worker_log(i)), None)


def test_a_stopped_engine_means_a_local_build_with_a_warning(site: Site) -> None:
    # Last in the module: the engine stays stopped.
    site.farm.stop_engine()
    daemon, g = site.start()
    try:
        drv = g.sh("engine-down", "echo here > $out")
        _built(g, [drv])
        notes = [m for m, _ in g.logs]
        assert any("warning: the remote engine is unreachable" in n for n in notes), notes
        assert "built remotely" not in _log(daemon, drv)
    finally:
        g.close()
        stop_daemon(daemon)

"""store-worker against a real BuildGrid: a one-machine farm (contrib/remote/farm) whose
workers serve the store dir of a real weft daemon, and Actions prepared as that daemon
prepares them (the remote/ library: the `.drv`'s closure uploaded, its input root, its
Command and Action), executed through the engine."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from bench.daemons import start_daemon, stop_daemon
from daemon.cli.storegraph import fetch_graph
from remote.action import add_action, command_for, platform_for
from remote.cas import Cas
from remote.channel import open_channel
from remote.digests import Blobs, Digest, node_of
from remote.errors import Cancelled
from remote.execution import Execution, Stage
from remote.inputs import input_root
from remote.wire import reapi_pb2
from store.recipe import Derivation
from tests.daemon_fixtures import Graph
from tests.remotefarm import Farm, launch_farm, needs_engine

pytestmark = needs_engine()

# A builder's process seen from the host, or gone: the worker's private daemon starts
# (or kills) it within a second or two; a generous bound for a loaded machine.
PROCESS_SECONDS = 30
# A build that must still be running when the test stops its worker: from seeing its
# builder to the kill or SIGTERM is a log read and a signal, well under this on a busy
# machine (the build then runs again, whole, on the other worker).
HELD_SECONDS = 4
# An Execute of a trivial build takes well under a second; a lease lost with a killed
# worker waits for the farm's bot timeout (10 s) first.
EXECUTE_SECONDS = 120


class Remote:
    """A weft daemon's side of the farm: its graph of derivations and the engine."""

    def __init__(self, graph: Graph, farm: Farm) -> None:
        self.graph = graph
        self.farm = farm
        self.channel = open_channel(farm.endpoint)
        self.cas = Cas(self.channel)
        self.execution = Execution(self.channel)

    def action(
        self, d: Derivation, timeout: float | None = None, forged: dict[str, str] | None = None
    ) -> Digest:
        """The Action of `d` as a daemon makes it, its blobs uploaded; `forged` puts what is
        on disk elsewhere in the input root at a store path (store path -> that path)."""
        store_dir = self.graph.daemon.store_dir
        closure = fetch_graph(self.graph.client, [d.path]).paths
        blobs = Blobs()
        nodes = {p: node_of(p, blobs) for p in closure}
        for path, disk in (forged or {}).items():
            nodes[path] = node_of(disk, blobs)
        root = input_root(store_dir, nodes, d.path, blobs)
        platform = platform_for(store_dir)
        args = [d.drv.builder, *d.drv.args]
        command = command_for(args, d.drv.env, d.outputs.values(), platform)
        digest = add_action(blobs, command, root, timeout)
        self.cas.upload(blobs)
        return digest

    def execute(
        self, action: Digest, *, skip_cache: bool = False, seconds: float = EXECUTE_SECONDS
    ) -> reapi_pb2.ExecuteResponse:
        """Execute, failing the test (not hanging it) if no answer comes in `seconds`."""
        outcome: list[reapi_pb2.ExecuteResponse | BaseException] = []

        def run() -> None:
            try:
                outcome.append(self.execution.execute(action, skip_cache=skip_cache))
            except BaseException as e:
                outcome.append(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(seconds)
        assert outcome, f"no answer to Execute in {seconds} s"
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def close(self) -> None:
        self.channel.close()


@pytest.fixture(scope="module")
def daemon_dir() -> Iterator[Path]:
    # Not under /tmp: the sandbox mounts its own /tmp over that path.
    d = Path(tempfile.mkdtemp(prefix="weft-rw-", dir="/var/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def remote(daemon_dir: Path) -> Iterator[Remote]:
    daemon = start_daemon(daemon_dir / "state")
    farm_dir = Path(tempfile.mkdtemp(prefix="wrk-", dir="/tmp"))
    farm = launch_farm(farm_dir, workers=1, store_dir=daemon.store_dir)
    graph = Graph(daemon)
    r = Remote(graph, farm)
    yield r
    r.close()
    graph.close()
    farm.stop()
    stop_daemon(daemon)
    shutil.rmtree(farm_dir, ignore_errors=True)


def builder_pids(marker: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def wait_until(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + PROCESS_SECONDS
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_a_derivation_built_by_a_worker_comes_back_with_outputs_log_and_worker(
    remote: Remote,
) -> None:
    d = remote.graph.sh("hello", "echo building hello; mkdir $out; echo hi > $out/greeting")
    response = remote.execute(remote.action(d))
    assert response.status.code == 0, response.status
    result = response.result
    assert result.exit_code == 0
    assert result.execution_metadata.worker == "worker-0"
    assert b"building hello" in remote.cas.read(result.stdout_digest)
    [out] = result.output_directories
    assert out.path == d.out.lstrip("/")
    tree = reapi_pb2.Tree.FromString(remote.cas.read(out.tree_digest))
    [greeting] = tree.root.files
    assert greeting.name == "greeting"
    assert remote.cas.read(greeting.digest) == b"hi\n"
    assert f"building {d.path}" in remote.farm.worker_log(0)


def test_a_build_on_an_output_built_by_the_daemon_gets_it_with_its_references(
    remote: Remote,
) -> None:
    """The input closure holds an output addressed by its derivation (imported trusted)
    that refers to a source: the worker registers both, and the build reads through it."""
    g = remote.graph
    lib = g.sh(
        "lib", f"mkdir -p $out/bin; echo 'echo from lib' > $out/bin/hello; ln -s {g.bb} $out/bb"
    )
    [built] = g.build(lib)
    assert built["status"] == "built"
    app = g.sh("app", f"{g.bb}/bin/sh {lib.out}/bin/hello > $out", env={"LIB": lib.out})
    response = remote.execute(remote.action(app))
    assert response.result.exit_code == 0, remote.cas.read(response.result.stdout_digest)
    [out] = response.result.output_files
    assert remote.cas.read(out.digest) == b"from lib\n"
    state = remote.farm.dir / "workers" / "0" / "state"
    assert os.path.islink(state / "store" / os.path.basename(lib.out) / "bb")


def test_a_second_build_with_the_same_inputs_imports_nothing(remote: Remote) -> None:
    d = remote.graph.sh("again", "echo $RANDOM > $out")
    action = remote.action(d)
    first = remote.execute(action)
    second = remote.execute(action, skip_cache=True)
    assert first.result.exit_code == second.result.exit_code == 0
    assert not second.cached_result
    lines = [line for line in remote.farm.worker_log(0).splitlines() if d.path in line]
    built = [line for line in lines if "building" in line]
    assert len(built) == 2, lines
    assert "0 imported" not in built[0] and built[1].endswith(", 0 imported)")


def test_a_builder_exiting_3_gives_exit_code_3_and_is_not_cached(remote: Remote) -> None:
    d = remote.graph.sh("three", "echo about to fail; exit 3")
    action = remote.action(d)
    response = remote.execute(action)
    assert response.status.code == 0
    assert response.result.exit_code == 3
    assert b"about to fail" in remote.cas.read(response.result.stdout_digest)
    assert not response.result.output_files and not response.result.output_directories
    assert remote.execution.cached(action) is None
    again = remote.execute(action)
    assert not again.cached_result and again.result.exit_code == 3


def test_a_cancelled_operation_stops_the_build_on_the_worker(remote: Remote) -> None:
    marker = f"weft-cancel-{os.getpid()}-{time.monotonic_ns()}"
    d = remote.graph.sh("long", f"echo {marker}; sleep 600; touch $out")
    action = remote.action(d)
    names: list[str] = []
    outcome: list[BaseException | object] = []

    def on_stage(stage: Stage, name: str) -> None:
        names.append(name)

    def run() -> None:
        try:
            outcome.append(remote.execution.execute(action, on_stage=on_stage))
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    wait_until("the builder to start", lambda: bool(builder_pids(marker)))
    remote.execution.cancel(names[-1])
    t.join(PROCESS_SECONDS)
    assert isinstance(outcome[0], Cancelled), outcome
    wait_until("the builder to be killed", lambda: not builder_pids(marker))
    wait_until("the worker to hear of it", lambda: "build stopped" in remote.farm.worker_log(0))
    # The worker is free again: it takes the next lease.
    d2 = remote.graph.sh("after-cancel", "echo fine > $out")
    assert remote.execute(remote.action(d2)).result.exit_code == 0


def test_an_action_over_its_timeout_is_stopped_and_reported_as_deadline_exceeded(
    remote: Remote,
) -> None:
    marker = f"weft-timeout-{os.getpid()}-{time.monotonic_ns()}"
    d = remote.graph.sh("slow", f"echo {marker}; sleep 600; touch $out")
    response = remote.execute(remote.action(d, timeout=1))
    assert response.status.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert "timed out" in response.status.message
    assert marker.encode() in remote.cas.read(response.result.stdout_digest)
    wait_until("the builder to be killed", lambda: not builder_pids(marker))


def test_an_input_root_at_odds_with_the_workers_store_or_unproven_fails_the_lease(
    remote: Remote, tmp_path: Path
) -> None:
    g = remote.graph
    fake = tmp_path / "fake"
    fake.write_text("not what the store holds\n")
    d = g.sh("victim", "echo ok > $out")
    # A build first, so that busybox is valid in the worker's store whatever ran before.
    assert remote.execute(remote.action(g.sh("warm", "echo > $out"))).result.exit_code == 0
    # The same name as busybox with other contents.
    response = remote.execute(remote.action(d, forged={g.bb: str(fake)}))
    assert response.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "with other contents" in response.status.message
    # A path named like a build output that no derivation of the closure builds.
    stranger = f"{g.daemon.store_dir}/{'a' * 32}-stranger"
    response = remote.execute(remote.action(d, forged={stranger: str(fake)}))
    assert response.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "neither content-addressed" in response.status.message
    # The very output to build: it would make the build "valid" with the engine's contents.
    response = remote.execute(remote.action(d, forged={d.out: str(fake)}))
    assert response.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "neither content-addressed" in response.status.message
    store = remote.farm.dir / "workers" / "0" / "state" / "store"
    assert not (store / os.path.basename(d.out)).exists()
    assert not (store / os.path.basename(stranger)).exists()
    assert (store / os.path.basename(g.bb) / "bin" / "busybox").exists()


@pytest.fixture
def two_workers(daemon_dir: Path, remote: Remote) -> Iterator[Remote]:
    farm_dir = Path(tempfile.mkdtemp(prefix="wrk2-", dir="/tmp"))
    farm = launch_farm(farm_dir, workers=2, store_dir=remote.graph.daemon.store_dir)
    r = Remote(remote.graph, farm)
    yield r
    r.close()
    farm.stop()
    shutil.rmtree(farm_dir, ignore_errors=True)


def _held_on_one_worker(
    r: Remote, tag: str, name: str
) -> tuple[str, list[object], threading.Thread, int]:
    """A build held running on one of the two workers, executed in a thread: its marker,
    where the thread puts the response, the thread, and which worker builds it."""
    marker = f"weft-{tag}-{os.getpid()}-{time.monotonic_ns()}"
    d = r.graph.sh(name, f"echo {marker}; sleep {HELD_SECONDS}; echo done > $out")
    action = r.action(d)
    outcome: list[object] = []
    t = threading.Thread(target=lambda: outcome.append(r.execution.execute(action)), daemon=True)
    t.start()
    wait_until("the builder to start", lambda: bool(builder_pids(marker)))
    first = next(i for i in (0, 1) if f"building {d.path}" in r.farm.worker_log(i))
    return marker, outcome, t, first


def test_a_worker_killed_mid_build_has_its_lease_given_to_another(two_workers: Remote) -> None:
    r = two_workers
    marker, outcome, t, first = _held_on_one_worker(r, "killed", "survivor")
    r.farm.kill_worker(first)
    wait_until("the killed worker's builder to die", lambda: not builder_pids(marker) or outcome)
    t.join(PROCESS_SECONDS * 4)
    [response] = outcome
    assert isinstance(response, reapi_pb2.ExecuteResponse)
    assert response.status.code == 0 and response.result.exit_code == 0
    assert response.result.execution_metadata.worker == f"worker-{1 - first}"


def test_the_worker_stops_on_sigterm_handing_back_its_lease(two_workers: Remote) -> None:
    r = two_workers
    _, outcome, t, first = _held_on_one_worker(r, "term", "handed-back")
    r.farm.stop_worker(first)
    t.join(PROCESS_SECONDS * 2)
    [response] = outcome
    assert isinstance(response, reapi_pb2.ExecuteResponse)
    assert response.result.exit_code == 0
    assert response.result.execution_metadata.worker == f"worker-{1 - first}"


def test_a_worker_started_alone_runs_its_own_daemon_in_its_own_namespace(
    remote: Remote, daemon_dir: Path
) -> None:
    """The worker's store is its own state dir, shown at the daemon's: the daemon's store
    has none of what the worker imported or built."""
    d = remote.graph.sh("private", "echo mine > $out")
    assert remote.execute(remote.action(d)).result.exit_code == 0
    assert not os.path.exists(d.out)
    assert remote.graph.client.call("is-valid", paths=[d.out]) == []


def test_worker_state_dir_holds_the_outputs(remote: Remote) -> None:
    d = remote.graph.sh("kept", "echo kept > $out")
    assert remote.execute(remote.action(d)).result.exit_code == 0
    state = remote.farm.dir / "workers" / "0" / "state"
    assert (state / "store" / os.path.basename(d.out)).read_text() == "kept\n"


def test_a_worker_outlives_an_engine_restart_and_builds_again(remote: Remote) -> None:
    errors = remote.farm.worker_log(0).count(": engine: ")
    remote.farm.stop_engine()
    # The worker meets the engine gone (its long poll fails), and waits.
    wait_until("the engine's error", lambda: remote.farm.worker_log(0).count(": engine: ") > errors)
    remote.farm.start_engine()
    d = remote.graph.sh("after-restart", "echo back > $out")
    response = remote.execute(remote.action(d))
    assert response.result.exit_code == 0
    assert response.result.execution_metadata.worker == "worker-0"


def test_a_worker_with_max_jobs_2_builds_two_leases_at_once_and_stops_cleanly(
    remote: Remote, tmp_path: Path
) -> None:
    """Started by hand (not by the farm), under another engine of its own: a plain
    `store-worker` command, its state dir elsewhere (under pytest's tmp dir)."""
    farm_dir = Path(tempfile.mkdtemp(prefix="wrk3-", dir="/tmp"))
    farm = launch_farm(farm_dir, workers=0, store_dir=remote.graph.daemon.store_dir)
    log = tmp_path / "worker.log"
    argv = [os.path.join(os.path.dirname(sys.executable), "store-worker")]
    argv += ["--endpoint", farm.endpoint, "--state-dir", str(tmp_path / "w"), "--name", "pair"]
    argv += ["--as-state-dir", str(remote.graph.daemon.state), "--max-jobs", "2"]
    with log.open("wb") as out:
        worker = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    r = Remote(remote.graph, farm)
    try:
        markers = [f"weft-pair-{i}-{os.getpid()}-{time.monotonic_ns()}" for i in range(2)]
        # Long enough for the second lease to come while the first builds, imports and all.
        actions = [
            r.action(r.graph.sh(f"pair{i}", f"echo {m}; sleep 5; echo {i} > $out"))
            for i, m in enumerate(markers)
        ]
        outcome: list[object] = []
        threads = [
            threading.Thread(target=lambda a=a: outcome.append(r.execute(a)), daemon=True)
            for a in actions
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(EXECUTE_SECONDS)
        assert len(outcome) == 2
        # Both leases taken before either ended.  (Not "both builders at once": the private
        # daemon's own admission may hold a build back while the machine is loaded.)
        lines = log.read_text().splitlines()
        building = [i for i, line in enumerate(lines) if ": building " in line]
        ended = [i for i, line in enumerate(lines) if ": exit " in line]
        assert len(building) == 2 and len(ended) == 2 and building[1] < ended[0], lines
        for response in outcome:
            assert isinstance(response, reapi_pb2.ExecuteResponse)
            assert response.result.execution_metadata.worker == "pair"
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(PROCESS_SECONDS)
        r.close()
        farm.stop()
        shutil.rmtree(farm_dir, ignore_errors=True)
    assert code == 0, log.read_text()

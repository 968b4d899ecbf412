"""Execute through a real engine (`remote/execution.py`), with a farm that has no worker so
every action stays queued: the stages seen, the operation cancelled by name, the stream
taken up again after the engine restarts, an action cache hit answered at once, and an
engine that is gone told apart from one that refuses."""

import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from remote.action import add_action, command_for, platform_for
from remote.cas import Cas
from remote.channel import open_channel
from remote.digests import Blobs, Digest, sha256_digest, to_proto
from remote.errors import Cancelled, RemoteError, RemoteUnavailable
from remote.execution import Execution, Stage, outcome
from remote.inputs import input_root
from remote.wire import reapi_pb2, reapi_pb2_grpc
from tests.remotefarm import Farm, needs_engine, start_farm

pytestmark = needs_engine()

STORE = "/var/tmp/weft-remote-exec/store"
# Long enough for a loaded machine to show the first stage, short enough to fail fast.
SEEN_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    with start_farm(tmp_path_factory.mktemp("farm"), workers=0, store_dir=STORE) as farm:
        yield farm


def _action(cas: Cas, tag: str) -> Digest:
    """An action (uploaded with its inputs) that no worker will ever take."""
    blobs = Blobs()
    root = input_root(STORE, {}, f"{STORE}/x.drv", blobs)
    platform = platform_for(STORE)
    command = command_for(["/bin/sh", "-c", f"echo {tag}"], {}, [f"{STORE}/out"], platform)
    digest = add_action(blobs, command, root, 30)
    cas.upload(blobs)
    return digest


@contextmanager
def _clients(farm: Farm) -> Iterator[tuple[Cas, Execution]]:
    with open_channel(farm.endpoint) as channel:
        yield Cas(channel), Execution(channel)


class _Running:
    """One execute in a thread, its stages and its end."""

    def __init__(self, execution: Execution, action: Digest) -> None:
        self.stages: list[tuple[Stage, str]] = []
        self.queued = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(execution, action))
        self.thread.start()

    def _on_stage(self, stage: Stage, name: str) -> None:
        self.stages.append((stage, name))
        if stage is Stage.QUEUED:
            self.queued.set()

    def _run(self, execution: Execution, action: Digest) -> None:
        try:
            execution.execute(action, on_stage=self._on_stage)
        except BaseException as e:
            self.error = e


def test_a_queued_action_is_cancelled_by_its_name(farm: Farm) -> None:
    with _clients(farm) as (cas, execution):
        running = _Running(execution, _action(cas, "cancelled"))
        assert running.queued.wait(SEEN_TIMEOUT), running.error
        name = running.stages[-1][1]
        execution.cancel(name)
        running.thread.join(SEEN_TIMEOUT)
        assert not running.thread.is_alive()
        assert isinstance(running.error, Cancelled)


def test_the_stream_is_taken_up_again_after_the_engine_restarts(farm: Farm) -> None:
    with _clients(farm) as (cas, execution):
        running = _Running(execution, _action(cas, "restarted"))
        assert running.queued.wait(SEEN_TIMEOUT), running.error
        name = running.stages[-1][1]
        first = _stream_of(execution, name)
        farm.stop_engine()
        farm.start_engine()
        # Still waiting on the same operation, through a WaitExecution stream of its own.
        assert _wait_for(lambda: _stream_of(execution, name) not in (None, first)), running.error
        assert running.thread.is_alive(), running.error
        execution.cancel(name)
        running.thread.join(SEEN_TIMEOUT)
        assert isinstance(running.error, Cancelled)


def _stream_of(execution: Execution, name: str) -> object:
    with execution._lock:
        return execution._streams.get(name)


def _wait_for(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + SEEN_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_an_action_the_engine_refuses_is_an_error_not_an_unreachable_engine(farm: Farm) -> None:
    # The Action was never uploaded: the engine answers, and no local fallback may hide it.
    with _clients(farm) as (_, execution), pytest.raises(RemoteError) as refused:
        execution.execute(sha256_digest(b"an action never uploaded"))
    assert not isinstance(refused.value, RemoteUnavailable), refused.value


def test_a_cached_result_answers_execute_at_once(farm: Farm) -> None:
    with _clients(farm) as (cas, execution):
        action = _action(cas, "cached")
        result = reapi_pb2.ActionResult(exit_code=0)
        result.execution_metadata.worker = "worker-9"
        reapi_pb2_grpc.ActionCacheStub(cas.channel).UpdateActionResult(
            reapi_pb2.UpdateActionResultRequest(
                action_digest=to_proto(action), action_result=result
            )
        )
        response = execution.execute(action)
        assert response.cached_result
        assert outcome(response).execution_metadata.worker == "worker-9"
        assert execution.cached(action) == result


def test_an_engine_that_is_gone_is_unavailable() -> None:
    where = Path(tempfile.mkdtemp(prefix="weft-gone-", dir="/var/tmp"))
    try:
        _gone(where)
    finally:
        shutil.rmtree(where, ignore_errors=True)


def _gone(where: Path) -> None:
    with start_farm(where / "farm", workers=0, store_dir=STORE) as farm:
        farm.stop_engine()
        with _clients(farm) as (cas, execution):
            with pytest.raises(RemoteUnavailable):
                cas.missing([sha256_digest(b"x")])
            with pytest.raises(RemoteUnavailable):
                execution.execute(sha256_digest(b"an action"))


def test_a_caller_may_cancel_from_its_first_stage(farm: Farm) -> None:
    with _clients(farm) as (cas, execution):
        action = _action(cas, "cancelled early")

        def at_once(stage: Stage, name: str) -> None:
            execution.cancel(name)

        with pytest.raises(Cancelled):
            execution.execute(action, on_stage=at_once)

"""Running an Action on the engine: Execute's stream of Operations, followed to its end.

The stream may break while the action goes on running (the engine restarted, a proxy
dropped the connection): then `WaitExecution` picks the same operation up again, a few
times, before the engine counts as gone.  `cancel` asks the engine to stop an operation
(`CancelOperation`) and ends the local stream too, so a caller that gave up never waits on
an engine that does not answer.
"""

import enum
import threading
import time
from collections.abc import Callable

import grpc

from remote.digests import DigestLike, checked, to_proto
from remote.errors import ActionFailed, Cancelled, RemoteError, RemoteUnavailable, translate
from remote.wire import operations_pb2, operations_pb2_grpc, reapi_pb2, reapi_pb2_grpc

# How often a broken stream is taken up again with WaitExecution, and the pause before
# each try (doubled each time): together about half a minute for an engine to come back.
WAIT_RETRIES = 5
WAIT_PAUSE = 1.0
# A unary call (cache lookup, cancel) that takes longer is an engine that is not answering.
CALL_TIMEOUT = 60.0
# Codes after which the operation may still be running and worth waiting for again.
_RESUMABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
)
_OK = 0


class Stage(enum.IntEnum):
    """ExecutionStage.Value: where the engine says an operation is."""

    UNKNOWN = 0
    CACHE_CHECK = 1
    QUEUED = 2
    EXECUTING = 3
    COMPLETED = 4


OnStage = Callable[[Stage, str], None]


class Execution:
    def __init__(self, channel: grpc.Channel, instance: str = "") -> None:
        self.instance = instance
        self._execution = reapi_pb2_grpc.ExecutionStub(channel)
        self._cache = reapi_pb2_grpc.ActionCacheStub(channel)
        self._operations = operations_pb2_grpc.OperationsStub(channel)
        self._lock = threading.Lock()
        self._streams: dict[str, grpc.Call] = {}
        self._cancelled: set[str] = set()

    def execute(
        self,
        action_digest: DigestLike,
        *,
        skip_cache: bool = False,
        on_stage: OnStage | None = None,
    ) -> reapi_pb2.ExecuteResponse:
        """Execute the action and wait for its end; `on_stage(stage, operation name)` on
        each change of stage (the name is what `cancel` takes).  The ExecuteResponse as the
        engine sent it (see `outcome`); Cancelled if cancelled, RemoteUnavailable if the
        engine went away for good, RemoteError for an operation that ended in an error."""
        request = reapi_pb2.ExecuteRequest(
            instance_name=self.instance,
            action_digest=to_proto(checked(action_digest)),
            skip_cache_lookup=skip_cache,
            digest_function=reapi_pb2.DigestFunction.SHA256,
        )
        follower = _Follower(on_stage)
        call = self._execution.Execute(request)
        tries = 0
        try:
            while True:
                done = self._follow(call, follower)
                if done is not None:
                    return _response(done)
                if follower.name is None or tries >= WAIT_RETRIES:
                    raise follower.error or RemoteUnavailable("the Execute stream ended early")
                time.sleep(WAIT_PAUSE * 2**tries)
                tries += 1
                with self._lock:
                    if follower.name in self._cancelled:
                        raise Cancelled(f"operation {follower.name} cancelled")
                wait = reapi_pb2.WaitExecutionRequest(name=follower.name)
                call = self._execution.WaitExecution(wait)
        finally:
            # Ends a stream left open (a callback that raised, an interrupt): the engine
            # holds a thread for each one.  A no-op on a stream that has ended.
            call.cancel()
            if follower.name is not None:
                with self._lock:
                    self._streams.pop(follower.name, None)
                    self._cancelled.discard(follower.name)

    def _follow(self, call: grpc.Call, follower: "_Follower") -> operations_pb2.Operation | None:
        """The stream's final Operation, or None if it broke in a way worth waiting again."""
        registered = False
        try:
            for operation in call:
                if not registered:
                    registered = True
                    with self._lock:
                        self._streams[operation.name] = call
                        if operation.name in self._cancelled:
                            call.cancel()
                follower.see(operation)
                if operation.done:
                    return operation
        except grpc.RpcError as e:
            with self._lock:
                cancelled = follower.name in self._cancelled
            if cancelled or e.code() == grpc.StatusCode.CANCELLED:
                raise Cancelled(f"operation {follower.name} cancelled") from None
            follower.error = translate(e, "Execute")
            if e.code() not in _RESUMABLE:
                raise follower.error from None
        return None

    def cancel(self, name: str) -> None:
        """Ask the engine to cancel operation `name`, and end our stream of it (its
        `execute` raises Cancelled).  The local stream ends even if the engine is gone."""
        with self._lock:
            call = self._streams.get(name)
            if call is not None:  # only names in flight: the set stays bounded
                self._cancelled.add(name)
        try:
            self._operations.CancelOperation(
                operations_pb2.CancelOperationRequest(name=name), timeout=CALL_TIMEOUT
            )
        except grpc.RpcError as e:
            raise translate(e, f"CancelOperation {name}") from None
        finally:
            if call is not None:
                call.cancel()

    def cached(self, action_digest: DigestLike) -> reapi_pb2.ActionResult | None:
        """The action cache's result for the action, or None."""
        request = reapi_pb2.GetActionResultRequest(
            instance_name=self.instance,
            action_digest=to_proto(checked(action_digest)),
            digest_function=reapi_pb2.DigestFunction.SHA256,
        )
        try:
            return self._cache.GetActionResult(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise translate(e, "GetActionResult") from None


class _Follower:
    """What one execution has seen: its operation's name, its stage, the last error."""

    def __init__(self, on_stage: OnStage | None) -> None:
        self.on_stage = on_stage
        self.name: str | None = None
        self.stage: Stage | None = None
        self.error: RemoteError | None = None

    def see(self, operation: operations_pb2.Operation) -> None:
        """Note an Operation: its name, and its stage if new (told to `on_stage`)."""
        self.name = operation.name
        metadata = reapi_pb2.ExecuteOperationMetadata()
        if operation.metadata.Unpack(metadata):
            stage = _stage(metadata.stage)
            if stage != self.stage:
                self.stage = stage
                if self.on_stage is not None:
                    self.on_stage(stage, operation.name)


def _stage(value: int) -> Stage:
    try:
        return Stage(value)
    except ValueError:
        return Stage.UNKNOWN


def _response(operation: operations_pb2.Operation) -> reapi_pb2.ExecuteResponse:
    if operation.HasField("error"):
        error = operation.error
        if error.code == grpc.StatusCode.CANCELLED.value[0]:
            raise Cancelled(f"operation {operation.name} cancelled: {error.message}")
        raise RemoteError(f"operation {operation.name} failed: {error.message} (code {error.code})")
    response = reapi_pb2.ExecuteResponse()
    if not operation.response.Unpack(response):
        raise RemoteError(f"operation {operation.name} ended without an ExecuteResponse")
    if response.status.code == grpc.StatusCode.CANCELLED.value[0]:
        raise Cancelled(f"operation {operation.name} cancelled: {response.status.message}")
    return response


def outcome(response: reapi_pb2.ExecuteResponse) -> reapi_pb2.ActionResult:
    """The ActionResult of a successful execution; ActionFailed for a non-OK status (a
    timeout is DEADLINE_EXCEEDED) or a non-zero exit code, with the result if any."""
    result = response.result if response.HasField("result") else None
    if response.status.code != _OK:
        raise ActionFailed(
            f"remote execution failed: {response.status.message or response.message}"
            f" (status {response.status.code})",
            exit_code=result.exit_code if result is not None else None,
            status_code=response.status.code,
            result=result,
        )
    if result is None:
        raise RemoteError("remote execution ended without a result")
    if result.exit_code != 0:
        raise ActionFailed(
            f"builder exited with code {result.exit_code}",
            exit_code=result.exit_code,
            result=result,
        )
    return result

"""The remote library's errors, and gRPC's errors mapped onto them.

Callers act on the kind of failure, not on gRPC status codes: an engine that cannot be
reached means "build locally instead" (`RemoteUnavailable`); a server that refuses or
fails a call is a `RemoteError` carrying the server's own message; what comes back wrong
(a blob whose hash differs, a hostile name) is an `OutputError`, and nothing of it may be
registered; an action that ran and failed is an `ActionFailed`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from remote.wire import reapi_pb2


class RemoteError(Exception):
    """A remote call failed; the message is the server's (or says what went wrong)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class RemoteUnavailable(RemoteError):
    """The engine cannot be reached (refused, gone, not answering) or takes no more work
    now: build locally."""


class NotRepresentable(RemoteError):
    """A path cannot be expressed in REAPI (a name or symlink target that is not UTF-8, a
    file that is neither regular, directory nor symlink): the build stays local."""


class BlobMissing(RemoteError):
    """The CAS does not have a blob it was asked for."""


class DigestMismatch(RemoteError):
    """A blob's bytes do not hash to its digest (tampered, truncated or too long)."""


class OutputError(RemoteError):
    """An action's outputs cannot be taken: missing, corrupt, or unsafe to materialise."""


class Cancelled(RemoteError):
    """An execution was cancelled (by `Execution.cancel`, or by the server)."""


class ActionFailed(RemoteError):
    """The action ran (or was run) and failed: a non-zero exit code, or a non-OK status
    such as DEADLINE_EXCEEDED (the action's timeout).  `result` is what the engine sent
    back, when it sent one (its `stdout_digest` is the log)."""

    def __init__(
        self,
        message: str,
        *,
        exit_code: int | None = None,
        status_code: int = 0,
        result: reapi_pb2.ActionResult | None = None,
    ) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.status_code = status_code
        self.result = result

    @property
    def timed_out(self) -> bool:
        return self.status_code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


# Codes that mean the engine cannot serve us now, and the caller had better build locally:
# not there (refused, gone), not answering within our deadline, or out of threads for more
# Execute streams (BuildGrid's RESOURCE_EXHAUSTED).  Never an action's own timeout: that
# comes back inside an ExecuteResponse, not as a call's status.
_UNAVAILABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


def translate(error: grpc.RpcError, what: str) -> RemoteError:
    """The library's error for a failed gRPC call; `what` names the call for the message."""
    code = error.code() if isinstance(error, grpc.Call) else None
    details = (error.details() if isinstance(error, grpc.Call) else None) or str(error)
    message = f"{what}: {details}"
    if code in _UNAVAILABLE:
        return RemoteUnavailable(message, code)
    if code == grpc.StatusCode.NOT_FOUND:
        return BlobMissing(message, code)
    if code == grpc.StatusCode.CANCELLED:
        return Cancelled(message, code)
    return RemoteError(f"{message} ({code.name if code else 'unknown status'})", code)

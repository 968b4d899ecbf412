"""One lease, start to end: the Action read, its inputs made valid in the private store,
the `.drv` built there, the outputs uploaded and the ActionResult made.

What goes back follows REAPI: a build that ran, succeeded or not, is status OK with the
builder's exit code (BuildGrid caches only what the farm's action cache is configured to:
`cache-failed-actions: no`, and a daemon takes a cached failure for a miss); a build over
its time limit is DEADLINE_EXCEEDED; an input root that cannot be used is
FAILED_PRECONDITION (not retried: another worker would meet the same); a failure of the
worker itself (its store, its daemon) is INTERNAL, which BuildGrid retries, perhaps on
another worker.
"""

import threading
import time
from collections.abc import Callable

import grpc

from daemon.cli.blocking import DaemonError
from remote.action import STORE_DIR_PROPERTY
from remote.cas import Cas
from remote.errors import (
    BlobMissing,
    DigestMismatch,
    NotRepresentable,
    OutputError,
    RemoteError,
)
from remote.outputs import result_for
from remote.wire import bots_pb2, reapi_pb2, status_pb2
from worker.build import PrivateDaemon, WorkerCancelled, run_build
from worker.inputs import InputError, Materialiser
from worker.session import completed_lease, say


def _status(code: grpc.StatusCode, message: str = "") -> status_pb2.Status:
    return status_pb2.Status(code=code.value[0], message=message)


class LeaseRunner:
    """Runs leases for the bot session (its `Runner`)."""

    def __init__(
        self,
        cas: Cas,
        materialiser: Materialiser,
        daemon: PrivateDaemon,
        name: str,
        store_dir: str,
        view_ok: Callable[[], bool] = lambda: True,
    ) -> None:
        self.cas = cas
        self.view_ok = view_ok
        self.materialiser = materialiser
        self.daemon = daemon
        self.name = name
        self.store_dir = store_dir

    def __call__(self, lease: bots_pb2.Lease, cancelled: threading.Event) -> bots_pb2.Lease:
        start = time.monotonic()
        try:
            result, status = self._run(lease, cancelled)
        except WorkerCancelled:
            return self._fail(lease, grpc.StatusCode.CANCELLED, "build stopped")
        except (InputError, OutputError) as e:
            return self._fail(lease, grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except (BlobMissing, DigestMismatch, NotRepresentable) as e:
            # A blob missing is the client's to upload again (REAPI); a corrupt one, or an
            # output REAPI cannot hold, would be the same for any other worker.
            return self._fail(lease, grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except RemoteError as e:
            return self._fail(lease, grpc.StatusCode.INTERNAL, f"the CAS: {e}")
        except (DaemonError, OSError, RuntimeError) as e:
            return self._fail(lease, grpc.StatusCode.INTERNAL, f"worker failure: {e}")
        took = time.monotonic() - start
        say(f"store-worker {self.name}: lease {lease.id}: exit {result.exit_code}, {took:.2f} s")
        return completed_lease(lease.id, status, result)

    def _fail(self, lease: bots_pb2.Lease, code: grpc.StatusCode, message: str) -> bots_pb2.Lease:
        say(f"store-worker {self.name}: lease {lease.id}: {message}")
        return completed_lease(lease.id, _status(code, f"{self.name}: {message}"), None)

    def _action(self, lease: bots_pb2.Lease) -> reapi_pb2.Action:
        action = reapi_pb2.Action()
        if lease.payload.Is(reapi_pb2.Action.DESCRIPTOR):
            lease.payload.Unpack(action)
            return action
        digest = reapi_pb2.Digest()
        if not lease.payload.Unpack(digest):
            raise InputError(f"a lease payload of type {lease.payload.type_url!r}")
        action.ParseFromString(self.cas.read(digest))
        return action

    def _run(
        self, lease: bots_pb2.Lease, cancelled: threading.Event
    ) -> tuple[reapi_pb2.ActionResult, status_pb2.Status]:
        action = self._action(lease)
        command = reapi_pb2.Command()
        command.ParseFromString(self.cas.read(action.command_digest))
        platform = {
            p.name: p.value for p in (*command.platform.properties, *action.platform.properties)
        }
        if platform.get(STORE_DIR_PROPERTY, self.store_dir) != self.store_dir:
            raise InputError(
                f"{self.name} serves store dir {self.store_dir}, not {platform[STORE_DIR_PROPERTY]}"
            )
        if not self.view_ok():
            # The bind mount is gone: the path would show the host's store (the worker stops).
            raise RuntimeError(f"{self.store_dir} no longer shows this worker's store")
        # One connection for the whole lease: its temporary roots keep the inputs, and then
        # the outputs, from the private daemon's collector until the result is uploaded.
        with self.daemon.client() as client:
            inputs = self.materialiser.prepare(client, action.input_root_digest, self.store_dir)
            say(
                f"store-worker {self.name}: lease {lease.id}: building {inputs.drv} "
                f"({len(inputs.paths)} inputs, {inputs.imported} imported)"
            )
            report = run_build(client, inputs.drv, _seconds(action), cancelled)
            outputs = {}
            if report.exit_code == 0:
                outputs = {p: "/" + p for p in command.output_paths}
                client.call_many([("add-temp-root", {"path": path}) for path in outputs.values()])
            result = result_for(self.cas, outputs, report.exit_code, report.log, self.name)
        if report.timed_out:
            return result, _status(grpc.StatusCode.DEADLINE_EXCEEDED, report.message)
        return result, _status(grpc.StatusCode.OK)


def _seconds(action: reapi_pb2.Action) -> float | None:
    """The Action's timeout, None when it has none (the daemon's own limits apply)."""
    if not action.HasField("timeout"):
        return None
    return action.timeout.ToTimedelta().total_seconds() or None

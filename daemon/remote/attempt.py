"""One attempt at a build on the remote engine, with the outcome contract of a local one
(`daemon/build/attempt.py`): the outputs registered through the same `Finish`, or a
`BuildError` with the builder's exit code and its log's last lines.

In a worker thread: the outputs looked at again under their locks, the closure to send
(the `.drv`'s own, for the worker to register, and its inputs'), and the action
(`request.py`).  Then, under the executor's limiter: what the CAS lacks uploaded,
`Execute` streamed to its end (a cancellation or the timeout cancels the operation), the
log read and told, the outputs read into the store's temporary area, every blob
re-hashed; and the same `Finish` as a local build's (BLAKE3, the reference scan against
the input closure, a fixed output's hash).

A result from the action cache that failed is taken for a miss: an engine that caches
failures must not make a flaky failure permanent.  What cannot go remote raises
`StayLocal` before the build is anybody's: a name REAPI cannot carry, or an engine that
cannot be reached (then with `unreachable`, for the warning).
"""

import functools
import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio

from daemon.build.attempt import Inputs
from daemon.build.errors import BuildError
from daemon.build.events import LogLine, Note
from daemon.build.job import Job
from daemon.build.logs import LogTail
from daemon.build.outputs import Finish
from daemon.build.request import BuildOptions
from daemon.build.room import Room
from daemon.remote.executor import Engine, RemoteExecutor
from daemon.remote.policy import StayLocal, printable, unoffloadable
from daemon.remote.request import Prepared, prepare
from daemon.sched.retry import Cause
from remote.digests import Digest
from remote.errors import (
    ActionFailed,
    NotRepresentable,
    OutputError,
    RemoteError,
    RemoteUnavailable,
)
from remote.execution import Execution, Stage, outcome
from remote.outputs import fetch_outputs, read_log
from remote.wire import reapi_pb2
from store.derivation import Derivation, drv_name

logger = logging.getLogger("weft.remote")

T = TypeVar("T")

# How long a cancellation waits for the engine to take it: the builder goes on until the
# worker hears, and an engine that does not answer this fast is not answering.
CANCEL_WAIT = 10.0
# How long past the build's own timeout the daemon waits before it stops waiting: the
# worker enforces the timeout itself and reports it, and the queue and the transfers
# before and after the builder count here too.
TIMEOUT_MARGIN = 120.0


class _Operation:
    """The operation an Execute stream follows, once the engine named it (told from the
    stream's worker thread).  A build given up on before the engine named its operation
    has it cancelled from that thread as soon as it is named: else the stream's thread
    and the build on the farm would run on to their end."""

    def __init__(self, execution: Execution, drv_path: str) -> None:
        self.execution = execution
        self.drv_path = drv_path
        self.name = ""
        self._abandoned = False
        self._cancelled = False
        self._lock = threading.Lock()

    def staged(self, stage: Stage, name: str) -> None:
        with self._lock:
            self.name = name or self.name
            late = self._abandoned and self.name and not self._cancelled
            self._cancelled = self._cancelled or bool(late)
        if late:
            _cancel_now(self.execution, self.name, self.drv_path)

    def abandon(self) -> str:
        """The operation given up on: its name if known, for the caller to cancel it;
        "" and it is cancelled once named."""
        with self._lock:
            self._abandoned = True
            self._cancelled = bool(self.name)
            return self.name


def _cancel_now(execution: Execution, name: str, drv_path: str) -> None:
    # In a worker thread; an engine that cannot be told is logged, the stream ends anyway.
    try:
        execution.cancel(name)
    except RemoteError as e:
        logger.warning("%s: cancelling %s: %s", drv_path, name, e)


class RemoteAttempt:
    def __init__(
        self,
        room: Room,
        remote: RemoteExecutor,
        job: Job,
        drv: Derivation,
        inputs: Inputs,
        opts: BuildOptions,
        finish: Finish,
    ) -> None:
        self.room = room
        self.remote = remote
        self.job = job
        self.drv = drv
        self.inputs = inputs
        self.opts = opts
        self.finish = finish
        self.builder = f"builder for '{job.drv_path}'"
        self.log = LogTail()
        self.done = False  # the outputs are registered

    async def run(self, needed: Callable[[], bool], finished: Callable[[], None]) -> None:
        """Build on the engine, unless `needed` (called first, in a worker thread) says
        otherwise; `finished()` once the outputs are registered.  BuildError if the build
        failed; StayLocal if it cannot go remote."""
        prepared = await self.room.workers.long(self._prepare, needed)
        if prepared is None:
            # The outputs are there already (made meanwhile, or a fixed output's
            # content found): done, as a local attempt is; the caller waits for
            # `finished`.
            self.done = True
            finished()
            return
        engine = await self._call(self.remote.engine)
        self.room.live.add(self.job.drv_path, self.log)
        try:
            await self._call(self._upload, engine, prepared)
            run = self.job.run
            if run is not None:
                run.spawned = True  # an attempt worth its history record
            result = await self._execute(engine, prepared.action_digest)
            tmp = self.room.store.tmp.new_entry(".remote")
            try:
                built = await self._call(self._fetch, engine, result, tmp)
                await self.room.workers.long(self.finish, built, prepared.closure)
            finally:
                # Shielded, as what follows: short, and not to be left for the next start.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(functools.partial(shutil.rmtree, tmp, True))
            if run is not None:
                run.succeeded = True
            self.done = True
            finished()
        finally:
            self.log.end()
            if self.log.size:
                with trio.CancelScope(shield=True):
                    await self._store_log()
            self.room.live.remove(self.job.drv_path, self.log)

    def _prepare(self, needed: Callable[[], bool]) -> Prepared | None:
        # One worker-thread trip for all of it, as a local attempt's.
        if not needed():
            return None
        store = self.room.store
        closure = self.inputs.closures.compute(self.inputs.paths)
        sent = sorted(set(store.closure([self.job.drv_path])) | set(closure))
        why = unoffloadable(store.store_dir, sent)
        if why:
            raise StayLocal(why)
        try:
            return prepare(
                store,
                self.job.drv_path,
                self.drv,
                closure,
                sent,
                self.room.cores,
                self.opts,
                self.remote.platform,
            )
        except NotRepresentable as e:
            # A name inside a path or a symlink's target not in UTF-8, a special file.
            raise StayLocal(f"built locally: {printable(str(e))}") from None
        except UnicodeEncodeError:
            # A lone surrogate (a JSON escape) in the builder, its arguments or its
            # environment: a Command's strings are UTF-8.
            why = "its builder, arguments or environment are not UTF-8, which REAPI cannot carry"
            raise StayLocal(f"built locally: {why}") from None

    async def _call(self, fn: Callable[..., T], *args: object, abandon: bool = False) -> T:
        """A library call: an engine gone is a fallback, outputs that cannot be taken a
        refusal, anything else the engine says a setup failure."""
        try:
            return await self.remote.call(fn, *args, abandon=abandon)
        except RemoteUnavailable as e:
            raise StayLocal(str(e), unreachable=True) from None
        except OutputError as e:
            what = f"outputs of '{drv_name(self.job.drv_path)}' from the remote engine refused"
            raise BuildError(f"{what}: {e}", Cause.REFUSED) from None
        except (RemoteError, ValueError) as e:
            raise BuildError(f"{self.builder}: the remote engine: {e}", Cause.SETUP) from None

    def _upload(self, engine: Engine, prepared: Prepared) -> None:
        missing = engine.cas.missing(prepared.blobs.digests())
        if missing:
            engine.cas.upload(prepared.blobs, only=missing)

    async def _execute(self, engine: Engine, action: Digest) -> reapi_pb2.ActionResult:
        """The action's result, its log told and kept; BuildError if the build failed."""
        response = await self._stream(engine, action, False)
        if response.cached_result and (response.status.code or response.result.exit_code):
            # A failure the engine cached: a miss.
            response = await self._stream(engine, action, True)
        try:
            result = outcome(response)
        except ActionFailed as e:
            await self._tell_log(engine, e.result, response.cached_result)
            raise self._failure(e) from None
        except RemoteError as e:
            raise BuildError(f"{self.builder}: the remote engine: {e}", Cause.SETUP) from None
        await self._tell_log(engine, result, response.cached_result)
        return result

    async def _stream(
        self, engine: Engine, action: Digest, skip_cache: bool
    ) -> reapi_pb2.ExecuteResponse:
        """One Execute stream to its end; a cancellation, or the timeout, cancels the
        operation."""
        operation = _Operation(engine.execution, self.job.drv_path)
        execute = functools.partial(
            engine.execution.execute, action, skip_cache=skip_cache, on_stage=operation.staged
        )
        with trio.move_on_after(self.opts.timeout + TIMEOUT_MARGIN):
            try:
                # Abandoned when cancelled: the stream ends once the operation is.
                return await self._call(execute, abandon=True)
            except trio.Cancelled:
                with trio.CancelScope(shield=True):
                    await self._cancel(engine, operation)
                raise
        message = f"{self.builder} timed out after {self.opts.timeout:g} seconds"
        raise BuildError(f"{message} (remote, waiting for the engine)", Cause.TIMEOUT)

    def _failure(self, e: ActionFailed) -> BuildError:
        if e.timed_out:
            message = f"{self.builder} timed out after {self.opts.timeout:g} seconds"
            return BuildError(message + self.log.tail(), Cause.TIMEOUT)
        if e.exit_code:
            message = f"{self.builder} failed with exit code {e.exit_code}{self.log.tail()}"
            return BuildError(message, Cause.EXIT, e.exit_code)
        return BuildError(f"{self.builder} failed remotely: {e}{self.log.tail()}", Cause.SETUP)

    async def _cancel(self, engine: Engine, operation: _Operation) -> None:
        """Cancel the operation within `CANCEL_WAIT` (once named, if the engine has not
        named it yet).  Not under the executor's limiter: its threads may all be taken,
        and a cancellation must not wait for one."""
        name = operation.abandon()
        if not name:
            return
        cancel = functools.partial(_cancel_now, engine.execution, name, self.job.drv_path)
        with trio.move_on_after(CANCEL_WAIT):
            await trio.to_thread.run_sync(cancel, abandon_on_cancel=True)

    async def _tell_log(
        self, engine: Engine, result: reapi_pb2.ActionResult | None, cached: bool
    ) -> None:
        """Where it was built, then the builder's log, told line by line and kept."""
        if result is None:
            return
        worker = result.execution_metadata.worker or "an unnamed worker"
        if cached:
            logger.info("%s: from the action cache", self.job.drv_path)
            note = f"{drv_name(self.job.drv_path)}: from the action cache (built by {worker})"
            await self.job.tell(Note(note, self.job.drv_path))
        data = f"{'from the action cache, ' if cached else ''}built remotely by {worker}\n".encode()
        try:
            data += await self.remote.call(read_log, engine.cas, result, self.opts.max_log_size)
        except RemoteError as e:
            data += f"(the build's log could not be read: {e})\n".encode()
        for line in self.log.add(data):
            await self.job.tell(LogLine(self.job.drv_path, line))

    def _fetch(
        self, engine: Engine, result: reapi_pb2.ActionResult, tmp: Path
    ) -> dict[str, tuple[str, str]]:
        """The outputs read into `tmp`, in the store's temporary area: {output: (where,
        store path)}."""
        os.mkdir(tmp, 0o700)
        built = {
            name: (str(tmp / os.path.basename(out.path)), out.path)
            for name, out in self.drv.outputs.items()
        }
        fetch_outputs(engine.cas, result, {path: where for where, path in built.values()})
        return built

    async def _store_log(self) -> None:
        try:
            await self.room.workers.background(
                self.room.logs.store, self.job.drv_path, self.log.data
            )
        except OSError as e:
            logger.warning("%s: storing the log: %s", self.job.drv_path, e)

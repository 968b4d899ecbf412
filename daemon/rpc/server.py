"""The trio layer: accept clients, drive the protocol core, run requests concurrently.

Each connection has a reader task (bytes in, events out, requests started as tasks so one
connection can pipeline), a writer task (frames queued by any task, sent coalesced), and
one task per request in flight.  Blocking store calls never run on the event loop: small
queries (path info and the like) are taken from each read in batches and go to
`QueryBatcher`, which runs what all connections asked for in one worker-thread trip;
everything else runs in its own worker thread.
"""

import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from daemon.build.builder import Builder
from daemon.gc.collector import Collector
from daemon.proc.cpus import UNSHARED, Cpus
from daemon.proc.locks import LockService
from daemon.proc.spawner import SpawnerService
from daemon.rpc.auth import Peer, identify, peer_credentials
from daemon.rpc.errors import OpError, error_for
from daemon.wire import protocol as p
from store.layout import Settings, StateDir
from store.store import Store

log = logging.getLogger("weft.daemon")

MAX_IN_FLIGHT = 1024
# Queued output above this makes the tasks that produce it wait for the socket.
HIGH_WATER = 4 << 20
# Log lines (progress, builders' output) wait this long for company, unless a reply or
# 64 KiB of them are queued: a client following a chain of quick builds then wakes once
# per batch rather than twice per build, which on a small machine takes CPU the builds
# need.  A person watching sees no difference.
LOG_DELAY = 0.025
LOG_BATCH = 64 << 10
RECEIVE_SIZE = 1 << 20
AGENT = "weft-daemon/0.1"
T = TypeVar("T")


class QueryBatcher:
    """Runs small store queries in batches, one worker-thread trip per batch.

    A thread trip costs tens of microseconds; a path-info lookup costs a few.  Work that
    arrives, from any connection, while a batch runs goes together in the next one, and
    each piece's `done` callback gets its result back on the event loop.
    """

    def __init__(self) -> None:
        self._queue: deque[tuple[Callable[[], Any], Callable[[Any], None]]] = deque()
        self._running = False

    def submit(self, work: Callable[[], T], done: Callable[[T], None]) -> None:
        self._queue.append((work, done))
        if not self._running:
            self._running = True
            trio.lowlevel.spawn_system_task(self._drain)

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = list(self._queue)
                self._queue.clear()
                results = await trio.to_thread.run_sync(_run_all, [work for work, _ in batch])
                for (_, done), result in zip(batch, results, strict=True):
                    done(result)
        finally:
            self._running = False


def _run_all(works: list[Callable[[], Any]]) -> list[Any]:
    return [work() for work in works]


class Upload:
    """Data a client streams for one request, pulled by the handler, paced by credit."""

    def __init__(self, conn: "ClientConnection", stream_id: int) -> None:
        self._conn = conn
        self._id = stream_id
        self._chunks: deque[bytes] = deque()
        self._eof = False
        self._started = False
        self._lot = trio.lowlevel.ParkingLot()

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._lot.unpark_all()

    def end(self) -> None:
        self._eof = True
        self._lot.unpark_all()

    async def receive(self) -> bytes:
        """The next chunk, or b"" at the end of the stream."""
        if not self._started:
            self._started = True
            await self._conn.send(p.Credit(self._id, p.DEFAULT_WINDOW))
        while not self._chunks and not self._eof:
            await self._lot.park()
        if not self._chunks:
            return b""
        data = self._chunks.popleft()
        await self._conn.send(p.Credit(self._id, len(data)))
        return data

    def blocking_reader(self) -> Callable[[int], bytes]:
        """A `read(n)` for a worker thread, each call a trip back to the event loop."""
        pending = b""

        def read(n: int) -> bytes:
            nonlocal pending
            if not pending:
                pending = trio.from_thread.run(self.receive)
            out, pending = pending[:n], pending[n:]
            return out

        return read


class RequestContext:
    """What an operation handler may do with the connection it serves."""

    def __init__(self, conn: "ClientConnection", req: p.Request) -> None:
        self.conn = conn
        self.daemon = conn.daemon
        self.peer = conn.peer
        self.id = req.id
        self.args = req.args

    async def log(self, message: str, done: int | None = None, total: int | None = None) -> None:
        await self.conn.send(p.Log(self.id, message, done, total))

    def upload(self) -> Upload:
        up = Upload(self.conn, self.id)
        self.conn.uploads[self.id] = up
        return up

    async def send_data(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            credit = await self.conn.wait_credit(self.id)
            piece = view[: min(credit, p.MAX_CHUNK)]
            await self.conn.send(p.Data(self.id, bytes(piece)))
            view = view[len(piece) :]

    async def end_data(self) -> None:
        await self.conn.send(p.End(self.id))


@dataclass(frozen=True)
class Operation:
    """An async handler, or a `query`: a quick blocking store call, run in batches."""

    fn: Callable[[RequestContext], Awaitable[Any]] | None = None
    query: Callable[[Store, dict[str, Any]], Any] | None = None
    trusted_only: bool = False


class ClientConnection:
    def __init__(self, daemon: "Daemon", stream: trio.SocketStream, peer: Peer) -> None:
        self.daemon = daemon
        self.stream = stream
        self.peer = peer
        self.proto = p.Connection(p.Role.SERVER)
        self.uploads: dict[int, Upload] = {}
        self._out: list[bytes] = []
        self._out_size = 0
        self._urgent = False  # something queued that is not a log line: send at once
        self._have_output = trio.lowlevel.ParkingLot()
        self._drained = trio.lowlevel.ParkingLot()
        self._credit = trio.lowlevel.ParkingLot()
        self._running = 0
        self._finished = trio.lowlevel.ParkingLot()
        self._closed = False

    def __str__(self) -> str:
        return f"client pid {self.peer.pid} ({self.peer.user})"

    def send_nowait(self, event: p.Event) -> None:
        """Queue a frame for the writer task; on a closed connection it is dropped."""
        if self._closed:
            return
        frame = self.proto.send(event)
        self._out.append(frame)
        self._out_size += len(frame)
        if not isinstance(event, p.Log) or self._out_size >= LOG_BATCH:
            self._urgent = True
            self._have_output.unpark_all()
        elif len(self._out) == 1:
            self._have_output.unpark_all()  # the writer then waits for company

    async def send(self, event: p.Event) -> None:
        """Queue a frame, then wait while too much output is queued: backpressure."""
        if self._closed:
            raise trio.ClosedResourceError("connection closed")
        self.send_nowait(event)
        while self._out_size > HIGH_WATER and not self._closed:
            await self._drained.park()

    async def wait_credit(self, stream_id: int) -> int:
        while (credit := self.proto.send_credit(stream_id)) == 0:
            if self._closed:
                raise trio.ClosedResourceError("connection closed")
            await self._credit.park()
        return credit

    async def serve(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                try:
                    await self._reader(nursery)
                finally:
                    # The client is gone or broke the protocol: its requests are moot.
                    await self._flush_quietly()
                    nursery.cancel_scope.cancel()
        finally:
            self._closed = True
            self.daemon.store.pins.release(self)
            await self.stream.aclose()

    async def _flush_quietly(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            while self._out:
                await trio.sleep(0.001)

    async def _writer(self) -> None:
        try:
            while True:
                while not self._out:
                    await self._have_output.park()
                if not self._urgent:
                    with trio.move_on_after(LOG_DELAY):
                        await self._have_output.park()
                data = b"".join(self._out)
                self._out.clear()
                self._out_size = 0
                self._urgent = False
                self._drained.unpark_all()
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._closed = True
            self._out.clear()
            self._drained.unpark_all()
            self._credit.unpark_all()

    async def _reader(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            self.proto.receive_data(data)
            queries: list[tuple[p.Request, Operation]] = []
            try:
                while (event := self.proto.next_event()) is not None:
                    op = self._queryable(event)
                    if op is not None:
                        queries.append((event, op))  # type: ignore[arg-type]
                    else:
                        await self._dispatch(event, nursery)
            except p.ProtocolError as e:
                log.info("client pid %d: protocol error: %s", self.peer.pid, e)
                await self.send(p.Error(None, p.Code.PROTOCOL, str(e)))
                return
            finally:
                if queries:
                    await self._reserve(len(queries))
                    self._run_queries(queries)

    def _queryable(self, event: p.Event) -> Operation | None:
        """The operation if `event` is a query this peer may run, to batch with others."""
        if not isinstance(event, p.Request) or self.daemon.draining:
            return None
        op = self.daemon.operations.get(event.op)
        if op is None or op.query is None or (op.trusted_only and not self.peer.trusted):
            return None
        return op

    async def _reserve(self, n: int) -> None:
        """Wait until `n` more requests may run: a client cannot queue unbounded work."""
        while self._running and self._running + n > MAX_IN_FLIGHT:
            await self._finished.park()
        self._running += n

    def _release(self, n: int) -> None:
        self._running -= n
        self._finished.unpark_all()

    def _run_queries(self, batch: list[tuple[p.Request, Operation]]) -> None:
        store = self.daemon.store

        def work() -> list[p.Event]:
            replies: list[p.Event] = []
            for req, op in batch:
                try:
                    replies.append(p.Reply(req.id, op.query(store, req.args)))  # type: ignore[misc]
                except Exception as e:
                    replies.append(self._error_reply(req, e))
            return replies

        def done(replies: list[p.Event]) -> None:
            # Replies to queries skip backpressure: at most MAX_IN_FLIGHT are ever queued.
            for reply in replies:
                self.send_nowait(reply)
            self.daemon.in_flight -= len(batch)
            self._release(len(batch))

        self.daemon.in_flight += len(batch)
        self.daemon.queries.submit(work, done)

    def _error_reply(self, req: p.Request, e: Exception) -> p.Error:
        code, message, details = error_for(e)
        if code == p.Code.INTERNAL:
            log.error("request %s %r failed", req.id, req.op, exc_info=e)
        return p.Error(req.id, code, message, details)

    async def _dispatch(self, event: p.Event, nursery: trio.Nursery) -> None:
        if isinstance(event, p.Hello):
            version = self.proto.choose_version(event)
            if version is None:
                raise p.ProtocolError(
                    f"no common protocol version (client offers {event.versions})"
                )
            await self.send(p.Welcome(version, AGENT))
        elif isinstance(event, p.Request):
            await self._reserve(1)
            nursery.start_soon(self._handle, event)
        elif isinstance(event, p.BadRequest):
            await self.send(p.Error(event.id, p.Code.BAD_REQUEST, event.message))
        elif isinstance(event, p.Data):
            up = self.uploads.get(event.id)
            if up is not None:
                up.feed(event.data)
        elif isinstance(event, p.End):
            up = self.uploads.get(event.id)
            if up is not None:
                up.end()
        elif isinstance(event, p.Credit):
            self._credit.unpark_all()
        else:
            raise p.ProtocolError(f"a client may not send {type(event).__name__}")

    async def _handle(self, req: p.Request) -> None:
        try:
            reply: p.Event
            try:
                if self.daemon.draining:
                    raise OpError(p.Code.SHUTTING_DOWN, "the daemon is shutting down")
                op = self.daemon.operations.get(req.op)
                if op is None:
                    raise OpError(p.Code.UNKNOWN_OP, f"unknown operation {req.op!r}")
                if op.trusted_only and not self.peer.trusted:
                    raise OpError(
                        p.Code.PERMISSION,
                        f"{req.op!r} is for trusted users; {self.peer.user} is not one",
                    )
                self.daemon.in_flight += 1
                try:
                    if op.fn is not None:
                        result = await op.fn(RequestContext(self, req))
                    else:
                        assert op.query is not None
                        store, query = self.daemon.store, op.query
                        result = await trio.to_thread.run_sync(query, store, req.args)
                finally:
                    self.daemon.in_flight -= 1
                reply = p.Reply(req.id, result)
            except trio.Cancelled:
                with trio.CancelScope(shield=True):
                    await self._try_send(p.Error(req.id, p.Code.SHUTTING_DOWN, "request cancelled"))
                raise
            except Exception as e:
                reply = self._error_reply(req, e)
            await self._try_send(reply)
        finally:
            self.uploads.pop(req.id, None)
            self._release(1)

    async def _try_send(self, event: p.Event) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.send(event)


class Daemon:
    def __init__(
        self,
        state: StateDir,
        store: Store,
        settings: Settings,
        operations: dict[str, Operation],
        locks: LockService | None = None,
        spawner: SpawnerService | None = None,
        cpus: Cpus = UNSHARED,
    ) -> None:
        self.state = state
        self.locks = locks
        self.spawner = spawner
        self.cpus = cpus
        self.collector = Collector(store, settings)
        self.builder = (
            Builder(state, store, settings, locks, spawner, self.collector, self.cpus)
            if locks is not None and spawner is not None
            else None
        )
        self.store = store
        self.settings = settings
        self.queries = QueryBatcher()
        self.draining = False
        self.in_flight = 0
        self.connections: set[ClientConnection] = set()
        self.operations = operations
        self.shutdown_requested = trio.Event()

    async def serve(
        self,
        listener: trio.SocketListener,
        grace: float = 10.0,
        on_draining: Callable[[], object] = lambda: None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until `shutdown_requested` is set, then drain for up to `grace` seconds."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._accept_loop, listener, nursery)
            if self.builder is not None:
                nursery.start_soon(self.builder.load.run)
            task_status.started()
            await self.shutdown_requested.wait()
            self.draining = True
            await listener.aclose()
            on_draining()
            with trio.move_on_after(grace):
                while self.in_flight:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except trio.ClosedResourceError:
                return
            except OSError as e:
                # EMFILE and friends: back off rather than spin or die.
                log.warning("accept failed: %s", e)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._serve_client, stream)

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        pid, uid, gid = peer_credentials(stream.socket)  # type: ignore[arg-type]
        peer = identify(pid, uid, gid, self.settings)
        if peer is None:
            conn = p.Connection(p.Role.SERVER)
            message = f"user {uid} is not in allowed-users"
            with trio.move_on_after(1):
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(conn.send(p.Error(None, p.Code.PERMISSION, message)))
            await stream.aclose()
            return
        conn = ClientConnection(self, stream, peer)
        self.connections.add(conn)
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)

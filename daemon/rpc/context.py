"""What an operation handler gets: its request's arguments, the client, the services, and
ways to answer (log lines, a data stream) and to read an upload.

A client must not be able to hold what others need by sending nothing.  An upload takes
a worker thread only once its first bytes are here; the threads that wait on what a
client supplies have a pool of their own (`Workers.feed`), of which one user gets at
most `FEEDS_PER_USER`; and a stream that moves nothing for `STREAM_IDLE` fails.
"""

from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import trio

from daemon.rpc.auth import Peer
from daemon.rpc.batcher import QueryBatcher
from daemon.rpc.errors import OpError
from daemon.rpc.hub import ReadHub
from daemon.rpc.services import Services
from daemon.wire import protocol as p

T = TypeVar("T")
# A stream that moves nothing this long (an upload's client sends no byte, a download's
# grants no credit) fails with `timed-out`, and what was uploaded is dropped: the client
# is gone or hostile, and an upload holds a worker thread while it waits.  Two minutes
# outlast a pipe fed by a slow download (`curl ... | store-add --nar`).
STREAM_IDLE = 120.0
# Calls waiting on one user's data or files at once: half the pool (`FEED_CALLS`), so
# one user stalling every one of theirs leaves the other half to everyone else.
FEEDS_PER_USER = 8


class PerUser:
    """At most `limit` calls of one user at once; a user's limiter lives while in use, so
    there are never more than the users being served."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._by_uid: dict[int, trio.CapacityLimiter] = {}

    @asynccontextmanager
    async def of(self, uid: int) -> AsyncIterator[None]:
        limiter = self._by_uid.setdefault(uid, trio.CapacityLimiter(self.limit))
        try:
            async with limiter:
                yield
        finally:
            if not limiter.borrowed_tokens and not limiter.statistics().tasks_waiting:
                self._by_uid.pop(uid, None)


class Serving:
    """What every connection shares: the services, the operations, the query batcher,
    the hub idle connections wait in, the per-user limits, and whether the daemon is
    draining."""

    def __init__(
        self,
        services: Services,
        operations: dict[str, "Operation"],
        stream_idle: float = STREAM_IDLE,
    ) -> None:
        self.services = services
        self.operations = operations
        self.queries = QueryBatcher()
        self.hub = ReadHub()
        self.feeds = PerUser(FEEDS_PER_USER)
        self.stream_idle = stream_idle
        self.draining = False
        self.in_flight = 0
        self.shutdown_requested = trio.Event()


def stalled(stream_id: int, what: str, idle: float) -> OpError:
    return OpError(
        p.Code.TIMED_OUT,
        f"stream {stream_id}: the client {what} for {idle:g} s; the request is abandoned",
    )


class _NoData(Exception):
    """A consumer tried without data wanted some."""


def _no_data(n: int) -> bytes:
    raise _NoData


class Channel(Protocol):
    """The connection a request came on, as its handler sees it."""

    serving: Serving
    peer: Peer
    uploads: dict[int, "Upload"]

    async def send(self, event: p.Event) -> None: ...

    async def wait_credit(self, stream_id: int) -> int: ...


class Upload:
    """Data a client streams for one request, pulled by the handler, paced by credit;
    a wait for the next chunk longer than `idle` fails the request."""

    def __init__(self, conn: "Channel", stream_id: int, idle: float) -> None:
        self._conn = conn
        self._id = stream_id
        self._idle = idle
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

    async def arrived(self) -> None:
        """Grant the first credit, and wait for the first chunk or the end."""
        if not self._started:
            self._started = True
            await self._conn.send(p.Credit(self._id, p.DEFAULT_WINDOW))
        with trio.move_on_after(self._idle):
            while not self._chunks and not self._eof:
                await self._lot.park()
            return
        raise stalled(self._id, "sent nothing", self._idle)

    async def receive(self) -> bytes:
        """The next chunk, or b"" at the end of the stream."""
        await self.arrived()
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

    def __init__(self, conn: "Channel", req: p.Request) -> None:
        self.conn = conn
        self.server = conn.serving
        self.services = conn.serving.services
        self.peer = conn.peer
        self.id = req.id
        self.args = req.args

    async def log(
        self,
        message: str,
        done: int | None = None,
        total: int | None = None,
        kind: str | None = None,
        drv: str | None = None,
    ) -> None:
        await self.conn.send(p.Log(self.id, message, done, total, kind, drv))

    async def from_client(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a worker thread that may wait on what the client supplies (its
        upload, its files): in the pool for such calls, within the user's share of it."""
        async with self.server.feeds.of(self.peer.uid):
            return await self.services.workers.feed(fn, *args)

    async def read_upload(
        self, consume: Callable[[Callable[[int], bytes]], T], may_need_none: bool = False
    ) -> T:
        """`consume(read)` of the client's upload, in a worker thread taken only once the
        first bytes are here.  `may_need_none`: `consume` may answer without reading (a
        path already valid); it is tried first, in a short trip, with no data."""
        up = Upload(self.conn, self.id, self.server.stream_idle)
        self.conn.uploads[self.id] = up
        if may_need_none:
            try:
                return await trio.to_thread.run_sync(consume, _no_data)
            except _NoData:
                pass
        await up.arrived()
        return await self.from_client(consume, up.blocking_reader())

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
    """An async handler, or a `query`: a quick blocking store call, run in batches, given
    the daemon's `Services` (its store, and the cache of path infos).  A query may have a
    `many` form: the query of many requests' arguments at once (one read
    of the database), answering each with its result or the exception that is its error,
    in order; should it raise, each request is asked alone (`batcher.py`)."""

    fn: Callable[[RequestContext], Awaitable[Any]] | None = None
    query: Callable[[Services, dict[str, Any]], Any] | None = None
    many: Callable[[Services, list[dict[str, Any]]], list[Any]] | None = None
    trusted_only: bool = False

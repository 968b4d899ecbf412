"""What an operation handler gets: its request's arguments, the client, the services, and
ways to answer (log lines, a data stream) and to read an upload."""

from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from daemon.rpc.auth import Peer
from daemon.rpc.batcher import QueryBatcher
from daemon.rpc.services import Services
from daemon.wire import protocol as p
from store.store import Store


class Serving:
    """What every connection shares: the services, the operations, the query batcher,
    and whether the daemon is draining."""

    def __init__(self, services: Services, operations: dict[str, "Operation"]) -> None:
        self.services = services
        self.operations = operations
        self.queries = QueryBatcher()
        self.draining = False
        self.in_flight = 0
        self.shutdown_requested = trio.Event()


class Channel(Protocol):
    """The connection a request came on, as its handler sees it."""

    serving: Serving
    peer: Peer
    uploads: dict[int, "Upload"]

    async def send(self, event: p.Event) -> None: ...

    async def wait_credit(self, stream_id: int) -> int: ...


class Upload:
    """Data a client streams for one request, pulled by the handler, paced by credit."""

    def __init__(self, conn: "Channel", stream_id: int) -> None:
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

"""An async client for trio programs: many requests in flight on one connection.

    async with connect(socket_path) as client:
        info = await client.call("path-info", path=p)

A reader task routes every event to the request it belongs to, so calls from many tasks
share the connection and complete in whatever order the daemon answers them.
"""

from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from daemon.cli.blocking import DaemonError
from daemon.wire import protocol as p

# One read from the daemon's socket: a quarter of a data chunk (`MAX_CHUNK`) or a few
# thousand small replies, in one call.
RECEIVE_SIZE = 256 << 10


class _Pending:
    """Events for one request, queued by the reader task for the task that made it."""

    __slots__ = ("closed", "events", "lot")

    def __init__(self) -> None:
        self.events: deque[p.Event] = deque()
        self.lot = trio.lowlevel.ParkingLot()
        self.closed = False

    def put(self, event: p.Event) -> None:
        self.events.append(event)
        self.lot.unpark_all()

    def close(self) -> None:
        self.closed = True
        self.lot.unpark_all()

    async def get(self) -> p.Event | None:
        while not self.events:
            if self.closed:
                return None
            await self.lot.park()
        return self.events.popleft()


class AsyncClient:
    def __init__(self, stream: trio.SocketStream, on_log: Callable[[p.Log], object]) -> None:
        self._stream = stream
        self._proto = p.Connection(p.Role.CLIENT)
        self._send_lock = trio.Lock()
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self._broken: BaseException | None = None
        self.on_log = on_log

    async def _send(self, *events: p.Event) -> None:
        async with self._send_lock:
            await self._stream.send_all(b"".join(self._proto.send(e) for e in events))

    async def _handshake(self) -> None:
        await self._send(p.Hello(agent="weft-async-client"))
        event = await self._receive_one()
        if isinstance(event, p.Error):
            raise DaemonError(event.code, event.message, event.details)

    async def _receive_one(self) -> p.Event:
        while (event := self._proto.next_event()) is None:
            data = await self._stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise ConnectionError("the daemon closed the connection")
            self._proto.receive_data(data)
        return event

    async def _reader(self) -> None:
        try:
            while True:
                event = await self._receive_one()
                rid = getattr(event, "id", None)
                if rid is None and isinstance(event, p.Error):
                    raise DaemonError(event.code, event.message, event.details)
                pending = self._pending.get(rid)  # type: ignore[arg-type]
                if pending is not None:
                    pending.put(event)
        except (
            ConnectionError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            p.ProtocolError,
            DaemonError,
        ) as e:
            self._broken = e
            for pending in self._pending.values():
                pending.close()

    async def _request(
        self, op: str, args: dict[str, Any], credit: int = 0
    ) -> tuple[int, _Pending]:
        if self._broken is not None:
            raise ConnectionError(f"connection to the daemon is broken: {self._broken}")
        self._next_id += 1
        rid = self._next_id
        pending = self._pending[rid] = _Pending()
        # The request and the credit for the data it will get back go in one write.
        events: list[p.Event] = [p.Request(rid, op, args)]
        if credit:
            events.append(p.Credit(rid, credit))
        await self._send(*events)
        return rid, pending

    async def _events(self, rid: int, pending: _Pending) -> AsyncIterator[p.Event]:
        try:
            while (event := await pending.get()) is not None:
                if isinstance(event, p.Log):
                    self.on_log(event)
                elif isinstance(event, p.Error):
                    raise DaemonError(event.code, event.message, event.details)
                else:
                    yield event
                    if isinstance(event, p.Reply):
                        return
            raise ConnectionError(f"connection to the daemon lost: {self._broken}")
        finally:
            self._pending.pop(rid, None)

    async def call(self, op: str, **args: Any) -> Any:
        rid, pending = await self._request(op, args)
        try:
            while (event := await pending.get()) is not None:
                if isinstance(event, p.Reply):
                    return event.result
                if isinstance(event, p.Error):
                    raise DaemonError(event.code, event.message, event.details)
                if isinstance(event, p.Log):
                    self.on_log(event)
            raise ConnectionError(f"connection to the daemon lost: {self._broken}")
        finally:
            del self._pending[rid]

    async def upload(self, op: str, chunks: AsyncIterator[bytes], **args: Any) -> Any:
        """Stream `chunks` as the request's data, paced by the daemon's credit."""
        rid, waiting = await self._request(op, args)
        pending = b""
        done = False
        async for event in self._events(rid, waiting):
            if isinstance(event, p.Reply):
                return event.result
            while not done and self._proto.send_credit(rid):
                if not pending:
                    pending = await anext(chunks, b"")
                    if not pending:
                        done = True
                        await self._send(p.End(rid))
                        break
                n = min(len(pending), self._proto.send_credit(rid), p.MAX_CHUNK)
                await self._send(p.Data(rid, pending[:n]))
                pending = pending[n:]
        raise AssertionError("unreachable")

    async def download(
        self, op: str, write: Callable[[bytes], Awaitable[object]], **args: Any
    ) -> Any:
        """Receive the request's data into `write`, granting credit as it is consumed."""
        rid, pending = await self._request(op, args, credit=p.DEFAULT_WINDOW)
        async for event in self._events(rid, pending):
            if isinstance(event, p.Data):
                await write(event.data)
                await self._send(p.Credit(rid, len(event.data)))
            elif isinstance(event, p.Reply):
                return event.result
        raise AssertionError("unreachable")


@asynccontextmanager
async def connect(
    socket_path: str, on_log: Callable[[p.Log], object] = lambda e: None
) -> AsyncIterator[AsyncClient]:
    stream = await trio.open_unix_socket(socket_path)
    try:
        client = AsyncClient(stream, on_log)
        await client._handshake()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._reader)
            yield client
            nursery.cancel_scope.cancel()
    finally:
        await stream.aclose()

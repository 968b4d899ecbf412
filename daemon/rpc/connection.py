"""One client connection: a reader task, a writer task, and a task per request in flight.

The reader feeds bytes to the protocol core and starts a task per request, so one
connection can pipeline; small queries taken from one read go to the `QueryBatcher`
together.  The writer sends whatever frames are queued in one write.  Every limit here
bounds what one client can make the daemon hold.

With a thousand clients each waiting for its answer before it asks again, what a request
costs the event loop besides its own work is what sets the latency, so the common case
takes no task switch: an idle connection waits in the `ReadHub` rather than in its reader
task, and the hub's task reads it and starts its queries itself; a reply goes straight
to the socket when nothing is queued before it, rather than through the writer task.
The reader and writer tasks take over whatever has to wait (a limit, backpressure, a
request other than a query, a socket that is full).
"""

import contextlib
import enum
import logging
import os
from typing import Any

import trio

from daemon.rpc.auth import Peer
from daemon.rpc.batcher import Calls
from daemon.rpc.context import Operation, RequestContext, Serving, Upload, stalled
from daemon.rpc.errors import OpError, error_for
from daemon.rpc.output import HIGH_WATER, Output
from daemon.wire import protocol as p

log = logging.getLogger("weft.daemon")

# Requests one connection may have running at once, a request counting until its reply is
# written to the socket; its reader stops reading beyond that.  Nix's daemon serves one
# request per connection at a time; 1,024 lets a client pipeline a whole closure's
# path-info queries in one go while bounding the tasks it can start and the replies it
# can leave unread (a client that never reads held 568 MB of them when replies freed
# their place as they were queued).
MAX_IN_FLIGHT = 1024
# One read from a client's socket: a 1 MiB upload chunk (`MAX_CHUNK`) in one call.
RECEIVE_SIZE = 1 << 20
AGENT = "weft-daemon/0.1"
# What the hub's reads land in before the protocol core copies them: one for every
# connection, as the hub reads one connection at a time, in one thread.
_RECEIVED = bytearray(RECEIVE_SIZE)
# Made once: a view and a list made at every read cost a small request a tenth of its
# reading.  The view pins the buffer's size, which never changes.
_RECEIVED_VIEW = memoryview(_RECEIVED)
_RECEIVED_INTO = [_RECEIVED]


class Handed(enum.Enum):
    """Why the hub hands a connection back to its reader task (or an exception: a fault
    in the hub's reading, a protocol error among them, raised in the reader)."""

    END = "the connection is closed, or broken"
    EVENTS = "events are left for the reader"


class ClientConnection:
    def __init__(self, serving: Serving, stream: trio.SocketStream, peer: Peer) -> None:
        self.serving = serving
        self.stream = stream
        self.peer = peer
        self.proto = p.Connection(p.Role.SERVER)
        self.uploads: dict[int, Upload] = {}
        self._credit = trio.lowlevel.ParkingLot()
        self._running = 0
        self._finished = trio.lowlevel.ParkingLot()
        self._reserving = 0  # tasks parked in `_finished`, counted: asking the lot costs more
        self.output = Output(stream, self.proto, self._release, self._output_taken, str(self))
        self._fd = stream.socket.fileno()
        self._handed: Handed | Exception | None = None
        self._woken = trio.lowlevel.ParkingLot()  # the reader, while the hub watches
        self._held: p.Event | None = None  # taken from the core by the hub, for the reader

    def __str__(self) -> str:
        return f"client pid {self.peer.pid} ({self.peer.user})"

    def send_nowait(self, event: p.Event, slots: int = 0) -> bool:
        return self.output.send_nowait(event, slots)

    async def send(self, event: p.Event, slots: int = 0) -> None:
        await self.output.send(event, slots)

    async def wait_credit(self, stream_id: int) -> int:
        """The credit the client granted `stream_id`, once there is some: a download holds
        an open file meanwhile, so a client that grants none for `stream_idle` fails it."""
        idle = self.serving.stream_idle
        with trio.move_on_after(idle):
            while (credit := self.proto.send_credit(stream_id)) == 0:
                if self.output.closed:
                    raise trio.ClosedResourceError("connection closed")
                await self._credit.park()
            return credit
        raise stalled(stream_id, "granted no credit", idle)

    async def serve(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.output.writer)
                try:
                    await self._reader(nursery)
                finally:
                    # The client is gone or broke the protocol: its requests are moot.
                    await self.output.flush()
                    self._close_output()
                    nursery.cancel_scope.cancel()
        finally:
            self._close_output()
            self.serving.services.store.pins.release(self)
            await self.stream.aclose()

    def _close_output(self) -> None:
        """Nothing more will be written: whatever waits for room, or for credit, is woken
        to find the connection closed."""
        self.output.close()
        self._credit.unpark_all()
        self._finished.unpark_all()

    def _output_taken(self) -> None:
        self._finished.unpark_all()
        if self.output.closed:
            self._credit.unpark_all()

    async def _reader(self, nursery: trio.Nursery) -> None:
        while True:
            queries: list[tuple[p.Request, Operation]] = []
            try:
                if not await self._wait_for_input():
                    return
                while (event := self._next_event()) is not None:
                    op = self._queryable(event)
                    if op is None:
                        await self._dispatch(event, nursery)
                        continue
                    queries.append((event, op))  # type: ignore[arg-type]
                    if self._running + len(queries) >= MAX_IN_FLIGHT:
                        # One read holds tens of thousands of small queries: no more than
                        # the limit leave at once.
                        await self._run_queries(queries)
                        queries = []
            except p.ProtocolError as e:
                log.info("client pid %d: protocol error: %s", self.peer.pid, e)
                await self._try_send(p.Error(None, p.Code.PROTOCOL, str(e)))
                return
            finally:
                if queries:
                    await self._run_queries(queries)

    async def _wait_for_input(self) -> bool:
        """Leave the connection to the hub until it hands it back: True with events for
        the reader, False at the connection's end; the hub's fault is raised here."""
        hub = self.serving.hub
        self._handed = None
        hub.watch(self._fd, self._on_readable, self._hand_back)
        try:
            while self._handed is None:
                await self._woken.park()
        finally:
            hub.unwatch(self._fd)
        handed, self._handed = self._handed, None
        if isinstance(handed, Exception):
            raise handed
        return handed is Handed.EVENTS

    def _hand_back(self, why: Handed | Exception) -> None:
        self.serving.hub.unwatch(self._fd)
        self._handed = why
        self._woken.unpark_all()

    def _on_readable(self) -> None:
        """In the hub's task: read what came, and start the queries at its front while
        they need no waiting; anything else goes to the reader task."""
        try:
            size = os.readv(self._fd, _RECEIVED_INTO)
        except BlockingIOError:
            return
        except OSError:
            size = 0
        if not size:
            self._hand_back(Handed.END)
            return
        self.proto.receive_data(_RECEIVED_VIEW[:size])
        try:
            if not self._start_ready_queries():
                self._hand_back(Handed.EVENTS)
        except p.ProtocolError as e:
            self._hand_back(e)

    def _start_ready_queries(self) -> bool:
        """Start the queries among the events received for as long as they may start at
        once; False when an event is left (held) for the reader task."""
        queries: list[tuple[p.Request, Operation]] = []
        try:
            while (event := self.proto.next_event()) is not None:
                op = self._queryable(event)
                if op is None or not self._has_room(len(queries) + 1):
                    self._held = event
                    return False
                queries.append((event, op))  # type: ignore[arg-type]
            return True
        finally:
            if queries:
                self._running += len(queries)
                self._start_queries(queries)

    def _next_event(self) -> p.Event | None:
        held, self._held = self._held, None
        return held if held is not None else self.proto.next_event()

    def _queryable(self, event: p.Event) -> Operation | None:
        """The operation if `event` is a query this peer may run, to batch with others."""
        if not isinstance(event, p.Request) or self.serving.draining:
            return None
        op = self.serving.operations.get(event.op)
        if op is None or op.query is None or (op.trusted_only and not self.peer.trusted):
            return None
        return op

    def _has_room(self, n: int) -> bool:
        """Whether `n` more requests may run now, the client having read most of what
        was sent to it: a client cannot queue unbounded work or unbounded replies."""
        return self.output.closed or not (
            (self._running and self._running + n > MAX_IN_FLIGHT) or self.output.size > HIGH_WATER
        )

    async def _reserve(self, n: int) -> None:
        """Wait until `n` more requests may run (`_has_room`)."""
        while not self._has_room(n):
            self._reserving += 1
            try:
                await self._finished.park()
            finally:
                self._reserving -= 1
        self._running += n

    def _release(self, n: int) -> None:
        self._running -= n
        if self._reserving:  # waking nobody costs trio's ParkingLot microseconds
            self._finished.unpark_all()

    async def _run_queries(self, batch: list[tuple[p.Request, Operation]]) -> None:
        """Run `batch` in the query batcher, once there is room for it."""
        await self._reserve(len(batch))
        self._start_queries(batch)

    def _start_queries(self, batch: list[tuple[p.Request, Operation]]) -> None:
        """Run `batch`, whose places are reserved, in the query batcher."""

        def done(answers: list[Any]) -> None:
            # Replies to queries skip backpressure: each keeps its place among
            # MAX_IN_FLIGHT until written, so no more are ever queued.
            self.serving.in_flight -= len(batch)
            replies = [
                self._error_reply(req, answer)
                if isinstance(answer, Exception)
                else p.Reply(req.id, answer)
                for (req, _), answer in zip(batch, answers, strict=True)
            ]
            taken = self.output.send_answers(replies)
            if taken < len(batch):
                self._release(len(batch) - taken)

        self.serving.in_flight += len(batch)
        calls = Calls(self.serving.services, [(op, req.args) for req, op in batch])
        self.serving.queries.submit(calls, done)

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
            await self._try_send(p.Welcome(version, AGENT))
        elif isinstance(event, p.Request):
            await self._reserve(1)
            nursery.start_soon(self._handle, event)
        elif isinstance(event, p.BadRequest):
            await self._try_send(p.Error(event.id, p.Code.BAD_REQUEST, event.message))
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
        handed = False  # the reply, queued, holds the request's place until written
        try:
            reply: p.Event
            try:
                reply = p.Reply(req.id, await self._run(req))
            except trio.Cancelled:
                # Queued, never waited for: the writer may be cancelled too, and a wait
                # for it to drain would never end, nor would the connection's task.
                cancelled = p.Error(req.id, p.Code.SHUTTING_DOWN, "request cancelled")
                handed = self.send_nowait(cancelled, slots=1)
                raise
            except Exception as e:
                reply = self._error_reply(req, e)
            # No wait for the client to read it: the place it holds is the bound.
            handed = self.send_nowait(reply, slots=1)
        finally:
            self.uploads.pop(req.id, None)
            if not handed:
                self._release(1)

    async def _run(self, req: p.Request) -> object:
        if self.serving.draining:
            raise OpError(p.Code.SHUTTING_DOWN, "the daemon is shutting down")
        op = self.serving.operations.get(req.op)
        if op is None:
            raise OpError(p.Code.UNKNOWN_OP, f"unknown operation {req.op!r}")
        if op.trusted_only and not self.peer.trusted:
            raise OpError(
                p.Code.PERMISSION,
                f"{req.op!r} is for trusted users; {self.peer.user} is not one",
            )
        self.serving.in_flight += 1
        try:
            if op.fn is not None:
                return await op.fn(RequestContext(self, req))
            assert op.query is not None
            return await trio.to_thread.run_sync(op.query, self.serving.services, req.args)
        finally:
            self.serving.in_flight -= 1

    async def _try_send(self, event: p.Event) -> None:
        """Send `event` unless the connection is closed: the reader, and a request's
        task, go on to their end either way (the reader then finds EOF)."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.send(event)

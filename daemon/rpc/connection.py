"""One client connection: a reader task, a writer task, and a task per request in flight.

The reader feeds bytes to the protocol core and starts a task per request, so one
connection can pipeline; small queries taken from one read go to the `QueryBatcher`
together.  The writer sends whatever frames are queued in one write.  Every limit here
bounds what one client can make the daemon hold.
"""

import contextlib
import logging

import trio

from daemon.rpc.auth import Peer
from daemon.rpc.context import Operation, RequestContext, Serving, Upload, stalled
from daemon.rpc.errors import OpError, error_for
from daemon.wire import protocol as p

log = logging.getLogger("weft.daemon")

# Requests one connection may have running at once, a request counting until its reply is
# written to the socket; its reader stops reading beyond that.  Nix's daemon serves one
# request per connection at a time; 1,024 lets a client pipeline a whole closure's
# path-info queries in one go while bounding the tasks it can start and the replies it
# can leave unread (a client that never reads held 568 MB of them when replies freed
# their place as they were queued).
MAX_IN_FLIGHT = 1024
# Queued output above this makes the tasks that produce it wait for the socket, and the
# reader start no request: one frame at the protocol's limit (`MAX_FRAME`, 4 MiB) may
# always be queued.
HIGH_WATER = 4 << 20
# Log lines (progress, builders' output) wait this long for company, unless a reply or
# 64 KiB of them are queued: a client following a chain of quick builds then wakes once
# per batch rather than twice per build, which on a small machine takes CPU the builds
# need.  A person watching sees no difference.
LOG_DELAY = 0.025
LOG_BATCH = 64 << 10
# One read from a client's socket: a 1 MiB upload chunk (`MAX_CHUNK`) in one call.
RECEIVE_SIZE = 1 << 20
# A closing connection's last frames (a protocol error's reply, say) get this long to
# go out, polled at this interval: a client that stopped reading cannot hold the task.
FLUSH_GRACE = 1.0
FLUSH_POLL = 0.001
AGENT = "weft-daemon/0.1"


class ClientConnection:
    def __init__(self, serving: Serving, stream: trio.SocketStream, peer: Peer) -> None:
        self.serving = serving
        self.stream = stream
        self.peer = peer
        self.proto = p.Connection(p.Role.SERVER)
        self.uploads: dict[int, Upload] = {}
        self._out: list[bytes] = []
        self._out_size = 0
        self._out_slots = 0  # requests whose replies are queued: they count until written
        self._urgent = False  # something queued that is not a log line: send at once
        self._have_output = trio.lowlevel.ParkingLot()
        self._drained = trio.lowlevel.ParkingLot()
        self._credit = trio.lowlevel.ParkingLot()
        self._running = 0
        self._finished = trio.lowlevel.ParkingLot()
        self._closed = False

    def __str__(self) -> str:
        return f"client pid {self.peer.pid} ({self.peer.user})"

    def send_nowait(self, event: p.Event, slots: int = 0) -> bool:
        """Queue a frame for the writer task, with the places among `MAX_IN_FLIGHT` of the
        `slots` requests it answers, given back once it is written.  On a closed
        connection it is dropped: False, and the places stay the caller's."""
        if self._closed:
            return False
        frame = self._frame(event)
        if frame is None:
            return False
        self._out.append(frame)
        self._out_size += len(frame)
        self._out_slots += slots
        if not isinstance(event, p.Log) or self._out_size >= LOG_BATCH:
            self._urgent = True
            self._have_output.unpark_all()
        elif len(self._out) == 1:
            self._have_output.unpark_all()  # the writer then waits for company
        return True

    def _frame(self, event: p.Event) -> bytes | None:
        """`event`'s frame, or what stands in for it when it would exceed `MAX_FRAME` (a
        reply of 80,000 referrers, a huge log line): raising instead would end the task
        that sends, which for a query's reply is the batcher's, a system task, whose
        exception ends the daemon.  None: nothing stands in, and nothing is sent."""
        try:
            return self.proto.send(event)
        except p.FrameTooLarge as e:
            log.warning("%s: %s too large for a frame: %s", self, type(event).__name__, e)
            smaller = p.within_frame(event, e.size)
        if smaller is None:
            return None
        try:
            return self.proto.send(smaller)
        except p.FrameTooLarge:
            log.error("%s: %r still too large; dropped", self, type(smaller).__name__)
            return None

    async def send(self, event: p.Event, slots: int = 0) -> None:
        """Queue a frame, then wait while too much output is queued: backpressure."""
        if self._closed:
            raise trio.ClosedResourceError("connection closed")
        self.send_nowait(event, slots)
        while self._out_size > HIGH_WATER and not self._closed:
            await self._drained.park()

    async def wait_credit(self, stream_id: int) -> int:
        """The credit the client granted `stream_id`, once there is some: a download holds
        an open file meanwhile, so a client that grants none for `stream_idle` fails it."""
        idle = self.serving.stream_idle
        with trio.move_on_after(idle):
            while (credit := self.proto.send_credit(stream_id)) == 0:
                if self._closed:
                    raise trio.ClosedResourceError("connection closed")
                await self._credit.park()
            return credit
        raise stalled(stream_id, "granted no credit", idle)

    async def serve(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                try:
                    await self._reader(nursery)
                finally:
                    # The client is gone or broke the protocol: its requests are moot.
                    await self._flush_quietly()
                    self._close_output()
                    nursery.cancel_scope.cancel()
        finally:
            self._close_output()
            self.serving.services.store.pins.release(self)
            await self.stream.aclose()

    def _close_output(self) -> None:
        """Nothing more will be written (the writer is about to be cancelled): whatever
        waits for the writer to take output, or for credit, is woken to find it closed,
        and sends that follow, a cancelled request's last error among them, are dropped
        rather than left waiting on a writer that is gone."""
        self._closed = True
        self._drained.unpark_all()
        self._credit.unpark_all()
        self._finished.unpark_all()

    async def _flush_quietly(self) -> None:
        with trio.move_on_after(FLUSH_GRACE) as scope:
            scope.shield = True
            while self._out:
                await trio.sleep(FLUSH_POLL)

    async def _writer(self) -> None:
        slots = 0
        try:
            while True:
                while not self._out:
                    await self._have_output.park()
                if not self._urgent:
                    with trio.move_on_after(LOG_DELAY):
                        await self._have_output.park()
                data, slots = b"".join(self._out), self._out_slots
                self._out.clear()
                self._out_size = self._out_slots = 0
                self._urgent = False
                self._drained.unpark_all()
                self._finished.unpark_all()
                await self.stream.send_all(data)
                self._release(slots)
                slots = 0
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._closed = True
            self._out.clear()
            self._release(slots + self._out_slots)
            self._out_size = self._out_slots = 0
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

    def _queryable(self, event: p.Event) -> Operation | None:
        """The operation if `event` is a query this peer may run, to batch with others."""
        if not isinstance(event, p.Request) or self.serving.draining:
            return None
        op = self.serving.operations.get(event.op)
        if op is None or op.query is None or (op.trusted_only and not self.peer.trusted):
            return None
        return op

    async def _reserve(self, n: int) -> None:
        """Wait until `n` more requests may run, and the client has read most of what was
        sent to it: a client cannot queue unbounded work or unbounded replies."""
        while not self._closed and (
            (self._running and self._running + n > MAX_IN_FLIGHT) or self._out_size > HIGH_WATER
        ):
            await self._finished.park()
        self._running += n

    def _release(self, n: int) -> None:
        self._running -= n
        self._finished.unpark_all()

    async def _run_queries(self, batch: list[tuple[p.Request, Operation]]) -> None:
        """Run `batch` in the query batcher, once there is room for it."""
        await self._reserve(len(batch))
        store = self.serving.services.store

        def work() -> list[p.Event]:
            replies: list[p.Event] = []
            for req, op in batch:
                try:
                    replies.append(p.Reply(req.id, op.query(store, req.args)))  # type: ignore[misc]
                except Exception as e:
                    replies.append(self._error_reply(req, e))
            return replies

        def done(replies: list[p.Event]) -> None:
            # Replies to queries skip backpressure: each keeps its place among
            # MAX_IN_FLIGHT until written, so no more are ever queued.
            self.serving.in_flight -= len(batch)
            for reply in replies:
                if not self.send_nowait(reply, slots=1):
                    self._release(1)

        self.serving.in_flight += len(batch)
        self.serving.queries.submit(work, done)

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
            store, query = self.serving.services.store, op.query
            return await trio.to_thread.run_sync(query, store, req.args)
        finally:
            self.serving.in_flight -= 1

    async def _try_send(self, event: p.Event) -> None:
        """Send `event` unless the connection is closed: the reader, and a request's
        task, go on to their end either way (the reader then finds EOF)."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.send(event)

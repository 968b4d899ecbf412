"""What one connection sends: frames written at once when nothing is queued before them,
else queued for the connection's writer task, which sends whatever is queued in one write.

A reply written from where it was made (the query batcher's task, a request's task)
saves the event loop two task switches a request: waking the writer, and the checkpoint
after its write.  Whatever does not fit in the socket, and whatever comes while some is
queued, goes through the writer, in order.  Log lines wait a little for company
(`LOG_DELAY`) unless something else is queued.
"""

import logging
import os
from collections.abc import Callable

import trio

from daemon.wire import protocol as p

log = logging.getLogger("weft.daemon")
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
# A closing connection's last frames (a protocol error's reply, say) get this long to
# go out, polled at this interval: a client that stopped reading cannot hold the task.
FLUSH_GRACE = 1.0
FLUSH_POLL = 0.001


class Output:
    """The sending side of one connection.  `release(n)` gives back the places among the
    requests in flight of `n` requests whose replies are written; `taken()` is called
    when the writer takes queued output (there is room again), and when the socket
    breaks (`closed`: nothing will be)."""

    def __init__(
        self,
        stream: trio.SocketStream,
        proto: p.Connection,
        release: Callable[[int], None],
        taken: Callable[[], None],
        name: str,
    ) -> None:
        self.stream = stream
        self.proto = proto
        self.closed = False
        self.size = 0  # bytes queued for the writer
        self._release = release
        self._taken = taken
        self._name = name
        self._fd = stream.socket.fileno()
        self._out: list[bytes] = []
        self._slots = 0  # requests whose replies are queued: they count until written
        self._urgent = False  # something queued that is not a log line: send at once
        self._sending = False  # the writer is in send_all: nothing may overtake its data
        self._have_output = trio.lowlevel.ParkingLot()
        self._drained = trio.lowlevel.ParkingLot()

    def send_nowait(self, event: p.Event, slots: int = 0) -> bool:
        """Write or queue `event`'s frame, with the places among `MAX_IN_FLIGHT` of the
        `slots` requests it answers, given back once it is written.  On a closed
        connection it is dropped: False, and the places stay the caller's."""
        if self.closed:
            return False
        frame = self._frame(event)
        if frame is None:
            return False
        self._put(frame, slots, not isinstance(event, p.Log))
        return True

    def send_answers(self, answers: list[p.Event]) -> int:
        """`send_nowait` of the final answers to as many requests, each holding its
        request's place, in one write (a client that pipelined them gets them together):
        how many were taken; the places of the others stay the caller's."""
        if self.closed:
            return 0
        if len(answers) == 1:  # a client that asks one thing at a time: most of them
            frame = self._frame(answers[0])
            if frame is None:
                return 0
            self._put(frame, 1, True)
            return 1
        frames = [frame for answer in answers if (frame := self._frame(answer)) is not None]
        if frames:
            self._put(frames[0] if len(frames) == 1 else b"".join(frames), len(frames), True)
        return len(frames)

    def _put(self, frame: bytes, slots: int, urgent: bool) -> None:
        if urgent and not self._out and not self._sending:
            # Written without waiting; what did not fit is the writer's.  A broken socket
            # leaves it all to the writer, whose write fails the same way and closes the
            # connection.
            try:
                written = os.write(self._fd, frame)
            except OSError:
                written = 0
            if written == len(frame):
                if slots:
                    self._release(slots)
                return
            frame = frame[written:]
        self._out.append(frame)
        self.size += len(frame)
        self._slots += slots
        if urgent or self.size >= LOG_BATCH:
            self._urgent = True
            self._have_output.unpark_all()
        elif len(self._out) == 1:
            self._have_output.unpark_all()  # the writer then waits for company

    async def send(self, event: p.Event, slots: int = 0) -> None:
        """Send `event`, then wait while too much output is queued: backpressure."""
        if self.closed:
            raise trio.ClosedResourceError("connection closed")
        self.send_nowait(event, slots)
        while self.size > HIGH_WATER and not self.closed:
            await self._drained.park()

    def _frame(self, event: p.Event) -> bytes | None:
        """`event`'s frame, or what stands in for it when it would exceed `MAX_FRAME` (a
        reply of 80,000 referrers, a huge log line): raising instead would end the task
        that sends, which for a query's reply is the batcher's, a system task, whose
        exception ends the daemon.  None: nothing stands in, and nothing is sent."""
        try:
            return self.proto.send(event)
        except p.FrameTooLarge as e:
            log.warning("%s: %s too large for a frame: %s", self._name, type(event).__name__, e)
            smaller = p.within_frame(event, e.size)
        if smaller is None:
            return None
        try:
            return self.proto.send(smaller)
        except p.FrameTooLarge:
            log.error("%s: %r still too large; dropped", self._name, type(smaller).__name__)
            return None

    def close(self) -> None:
        """Nothing more will be written (the writer is about to be cancelled): whatever
        waits for the writer to take output is woken to find it closed, and sends that
        follow are dropped rather than left waiting on a writer that is gone."""
        self.closed = True
        self._drained.unpark_all()

    async def flush(self) -> None:
        """Wait, for `FLUSH_GRACE` at most, until what is queued is written."""
        with trio.move_on_after(FLUSH_GRACE) as scope:
            scope.shield = True
            while self._out:
                await trio.sleep(FLUSH_POLL)

    async def writer(self) -> None:
        """The writer task: whatever is queued, in one write each time."""
        slots = 0
        try:
            while True:
                while not self._out:
                    await self._have_output.park()
                if not self._urgent:
                    with trio.move_on_after(LOG_DELAY):
                        await self._have_output.park()
                data, slots = b"".join(self._out), self._slots
                self._out.clear()
                self.size = self._slots = 0
                self._urgent = False
                self._drained.unpark_all()
                self._taken()
                self._sending = True
                await self.stream.send_all(data)
                self._sending = False
                self._release(slots)
                slots = 0
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.closed = True
            self._out.clear()
            self._release(slots + self._slots)
            self.size = self._slots = 0
            self._drained.unpark_all()
            self._taken()

"""One task that waits on every idle client connection at once.

Trio's own way, a reader task per connection in `receive_some`, costs each request, with
1,000 clients that each send as soon as they are answered: a recv that finds nothing, an
epoll_ctl re-arming the one-shot registration, a wake-up of the reader task, and the recv
that reads the request.  Here an idle connection's socket stays registered, level-triggered,
in an epoll instance of our own, which one task waits on as one of trio's fds: one wake-up
and one epoll_wait serve every connection that has something, and each costs one read.
What the read brings is handled in the hub's task when it needs no waiting (queries, with
room for them); anything else wakes the connection's own reader task, which handles it
and then gives the connection back (`connection.py`).

The hub runs as a trio system task, so that no connection's end cancels the others'
waits; an exception that leaves it would end the daemon, so a callback that raises stops
the watch and goes to `on_fault`, which ends that connection only.
"""

import contextlib
import logging
import select
from collections.abc import Callable
from dataclasses import dataclass

import trio

log = logging.getLogger("weft.daemon")
# Connections read in one turn of the hub's task before it lets other tasks run: a turn
# of 256 small requests takes a few milliseconds, and the level-triggered registration
# reports those left over at the next turn, after the ones served now (epoll's ready list
# is a queue), so every connection gets its turn.
TURN = 256


@dataclass(frozen=True)
class Watch:
    """What the hub calls for one fd."""

    on_readable: Callable[[], None]
    on_fault: Callable[[Exception], None]


class ReadHub:
    """Idle connections' sockets, and what to call when one has something to read."""

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._watched: dict[int, Watch] = {}

    def watch(
        self, fd: int, on_readable: Callable[[], None], on_fault: Callable[[Exception], None]
    ) -> None:
        """Call `on_readable()` from the hub's task whenever `fd` is readable, until
        `unwatch(fd)`; should it raise, the watch ends and `on_fault` gets the exception.
        The first watch starts the task."""
        if self._epoll is None:
            self._epoll = select.epoll()
            trio.lowlevel.spawn_system_task(self._run, self._epoll)
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except FileExistsError:
            # Registered under an earlier owner of this number, closed while watched.
            self._epoll.modify(fd, select.EPOLLIN)
        self._watched[fd] = Watch(on_readable, on_fault)

    def unwatch(self, fd: int) -> None:
        """Stop watching `fd` (before it is closed, so that its number, reused, is not
        taken for it); watching nothing is fine."""
        if self._watched.pop(fd, None) is not None and self._epoll is not None:
            # A closed fd has left the set by itself: nothing is left to remove.
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)

    def watching(self, fd: int) -> bool:
        return fd in self._watched

    async def _run(self, epoll: select.epoll) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, _ in epoll.poll(0, TURN):
                    # An earlier callback of this turn may have unwatched it.
                    watch = self._watched.get(fd)
                    if watch is None:
                        continue
                    try:
                        watch.on_readable()
                    except Exception as e:
                        self._fault(fd, watch, e)
        finally:
            self._epoll = None
            self._watched.clear()
            epoll.close()

    def _fault(self, fd: int, watch: Watch, e: Exception) -> None:
        """`watch`'s callback raised `e`: its watch ends, and its owner is told."""
        if self._watched.get(fd) is watch:
            self.unwatch(fd)
        try:
            watch.on_fault(e)
        except Exception:
            log.exception("the fault of fd %d's watch could not be handed on", fd)

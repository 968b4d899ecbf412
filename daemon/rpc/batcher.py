"""Small store queries from every connection, run in batches: one worker-thread trip each.

A thread trip costs tens of microseconds; a path-info lookup costs a few.  The queue is
bounded by the connections' own limit on requests in flight (`connection.MAX_IN_FLIGHT`
each): a query is submitted only once its connection reserved room for it.

The batches run in a trio system task, so that no connection's end cancels another's
queries; an exception that leaves a system task ends the whole daemon.  So nothing here
raises: a piece of work or a `done` that fails is logged, and the rest go on.
"""

import logging
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")
log = logging.getLogger("weft.daemon")


class QueryBatcher:
    """Work that arrives, from any connection, while a batch runs goes together in the
    next one, and each piece's `done` callback gets its result back on the event loop.
    A piece whose `work` raises gets no `done`: `work` answers its own failures."""

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
                    _finish(done, result)
        finally:
            self._running = False


class _Failed:
    """A piece of work that raised, in place of its result."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _finish(done: Callable[[Any], None], result: Any) -> None:
    try:
        if isinstance(result, _Failed):
            raise result.error
        done(result)
    except Exception:
        log.exception("a batched query failed; the daemon goes on")


def _run_all(works: list[Callable[[], Any]]) -> list[Any]:
    results: list[Any] = []
    for work in works:
        try:
            results.append(work())
        except Exception as e:
            results.append(_Failed(e))
    return results

"""Small store queries from every connection, run in batches: one worker-thread trip each.

A thread trip costs tens of microseconds; a path-info lookup costs a few.  The queue is
bounded by the connections' own limit on requests in flight (`connection.MAX_IN_FLIGHT`
each): a query is submitted only once its connection reserved room for it.

Requests' queries come as `Calls`, and all those of a batch run together: the requests of
one operation that has a `many` form (one read of the database for any number of
requests) share one call of it, whichever connections they came on.  With a thousand
clients asking at once, that call, not a thousand lookups one after another, is what
the worker thread spends its time on.

The batches run in a trio system task, so that no connection's end cancels another's
queries; an exception that leaves a system task ends the whole daemon.  So nothing here
raises: a piece of work or a `done` that fails is logged, and the rest go on.
"""

import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

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


class Query(Protocol):
    """What the batcher needs of an operation (`context.Operation`)."""

    @property
    def query(self) -> Callable[[Any, dict[str, Any]], Any] | None: ...

    @property
    def many(self) -> Callable[[Any, list[dict[str, Any]]], list[Any]] | None: ...


class Calls:
    """Queries of requests, each an operation and its arguments, asked of `services` (the
    daemon's `Services`: its store, and the caches of what the store answered): as work
    for the batcher, each request's result, or the exception that is its answer."""

    def __init__(self, services: Any, calls: list[tuple[Query, dict[str, Any]]]) -> None:
        self.services = services
        self.calls = calls

    def __call__(self) -> list[Any]:
        return _run_together([self])[0]


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
    together = [work for work in works if isinstance(work, Calls)]
    answers = iter(_run_together(together))
    results: list[Any] = []
    for work in works:
        if isinstance(work, Calls):
            results.append(next(answers))
            continue
        try:
            results.append(work())
        except Exception as e:
            results.append(_Failed(e))
    return results


def _run_together(works: list[Calls]) -> list[list[Any]]:
    """The answers of every call of `works`, those of one `many` in one call of it."""
    answers: list[list[Any]] = [[None] * len(work.calls) for work in works]
    # By the `many` and the services (their identity: each daemon's are one, with one
    # store, and the requests of two daemons' stores never share a read).
    groups: dict[tuple[Any, int], list[tuple[int, int]]] = {}
    for w, work in enumerate(works):
        for c, (op, args) in enumerate(work.calls):
            if op.many is not None:
                groups.setdefault((op.many, id(work.services)), []).append((w, c))
            else:
                answers[w][c] = _one(work.services, op, args)
    for (many, _), places in groups.items():
        if len(places) == 1:  # alone: its own query, not a many of one
            w, c = places[0]
            answers[w][c] = _one(works[w].services, *works[w].calls[c])
            continue
        services = works[places[0][0]].services
        calls = [works[w].calls[c] for w, c in places]
        for (w, c), answer in zip(places, _many(many, services, calls), strict=True):
            answers[w][c] = answer
    return answers


def _one(services: Any, op: Query, args: dict[str, Any]) -> Any:
    try:
        assert op.query is not None
        return op.query(services, args)
    except Exception as e:
        return e


def _many(
    many: Callable[[Any, list[dict[str, Any]]], list[Any]],
    services: Any,
    calls: list[tuple[Query, dict[str, Any]]],
) -> list[Any]:
    """`many`'s answers to `calls`; should it raise (one request's bad argument fails the
    call), each request is asked alone, and gets its own answer or error."""
    try:
        answers = many(services, [args for _, args in calls])
        if len(answers) == len(calls):
            return answers
        log.error("%r answered %d of %d requests", many, len(answers), len(calls))
    except Exception:
        pass
    return [_one(services, op, args) for op, args in calls]

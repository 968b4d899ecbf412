"""Dependents start once an input's outputs are placed, while their registration commits:
a latency trick, on probation (issue 18).

`Store.add_outputs` renames a build's outputs into the store, then commits the write
transaction that registers them.  Its `placed` callback, called in the worker thread
between the two (`placed_callback`), tells the loop; the request's dependents of the build
may start from then on (`EarlyStart.inputs_placed`) rather than after the commit.

Invariant: nothing is registered that refers to a path whose registration did not commit.
A dependent that started early registers its own outputs only once each input's
registration is settled (`EarlyStart.inputs_settled`, through `Hooks.may_register`), and
fails as "dependency failed" if one did not commit.

The trick is this module and its calls: in graph.py, the `EarlyStart` made in
`GraphRun._load`, `inputs_placed` in `_settle`, `placed` in `_one` and `_Hooks.placed`,
`inputs_settled` in `_Hooks.may_register`; in shared.py, `placed_callback`.  Without them,
dependents wait for their inputs' `finished`, `may_register` objects to nothing, and
`Register` gets no `placed`.
"""

from collections.abc import Callable, Collection, Mapping

import trio

from daemon.build.closures import Closures
from daemon.build.outputs import Placed
from store.records import PathInfo


class EarlyStart:
    """One request's view of whose outputs are in place (`placed`) and whose registration
    is settled (its `finished` events: registered, failed, or given up); no I/O."""

    def __init__(
        self, inputs: Mapping[str, Collection[str]], finished: Mapping[str, trio.Event]
    ) -> None:
        self._inputs = inputs
        self._finished = finished
        self._placed = {p: trio.Event() for p in inputs}

    def placed(self, path: str) -> None:
        """`path`'s outputs are in place, or it ended without any: its dependents may go
        on."""
        self._placed[path].set()

    async def inputs_placed(self, path: str) -> None:
        """Wait until every input of `path` is placed (or settled)."""
        for dep in self._inputs[path]:
            await self._placed[dep].wait()

    async def inputs_settled(self, path: str) -> None:
        """Wait until every input of `path` is settled (registered or failed)."""
        for dep in self._inputs[path]:
            if not self._finished[dep].is_set():  # else no checkpoint: no latency
                await self._finished[dep].wait()


def placed_callback(closures: Closures, hook: Callable[[], None]) -> Placed:
    """A build's `placed` for `Store.add_outputs` (called in its worker thread): the
    request learns the outputs' closures, and `hook` is called on the loop.  Made on the
    loop."""
    loop = trio.lowlevel.current_trio_token()

    def placed(infos: list[PathInfo]) -> None:
        closures.add_outputs(infos)
        loop.run_sync_soon(hook)

    return placed

"""Output locks taken ahead, for chains: a latency trick, on probation (issue 18).

On a chain, each build would start with two waits on its path: the locker's round trip
for its output locks, and a worker-thread trip to look, under them, whether its outputs
are still missing.  So while a derivation's inputs build, once every input's builder runs
(the daemon has time then, and no lock is held long for nothing), its request takes its
output locks without waiting, and looks whether the outputs are missing; its build then
starts with neither wait.  If another owner holds one of the locks, nothing is taken: the
build locks the usual way.  The locks are the derivation's (`outputs.build_owner`),
whichever request builds it, so that locks one request took serve another's build.

What was found holds only until a build of the derivation ends (another request's may
have made the outputs): `FoundMissing` keeps it as a token per derivation, which the end
of any build of it drops.

The trick is this module and its calls: in graph.py, the `Started` made in
`GraphRun._load` and set in `_one` and `_Hooks.spawned`, and `LocksAhead.take` in `_one`;
in shared.py, `found.build_ended` in `Jobs.build` and `found.holds` (and the locks not
taken again) in `_Attempts._run`; `Job.when_spawned` for the requests that join a build;
`Room.ahead`.  Without them, every build locks its outputs and looks
(`Register.needed`).
"""

import contextlib
from collections.abc import Iterable

import trio

from daemon.build.outputs import build_owner, lock_files
from daemon.proc.locks import LockError, LockService
from store.derivation import Derivation
from store.store import Store


class Reservation:
    """A derivation's output locks, taken ahead by a request."""


class FoundMissing:
    """The derivations whose outputs a request found missing under the locks it took
    ahead, each with its reservation; no I/O."""

    def __init__(self) -> None:
        self._found: dict[str, Reservation] = {}

    def mark(self, path: str, reservation: Reservation) -> None:
        self._found[path] = reservation

    def holds(self, path: str, reservation: Reservation | None) -> bool:
        """Whether what `reservation` found still holds: its build need not look again."""
        return reservation is not None and self._found.get(path) is reservation

    def forget(self, path: str, reservation: Reservation) -> None:
        if self._found.get(path) is reservation:
            del self._found[path]

    def build_ended(self, path: str) -> None:
        """A build of `path` ended: a request that found its outputs missing before must
        look again."""
        self._found.pop(path, None)


class Started:
    """One request's derivations whose builder runs, or that are settled without one."""

    def __init__(self, paths: Iterable[str]) -> None:
        self._events = {p: trio.Event() for p in paths}

    def set(self, path: str) -> None:
        self._events[path].set()

    async def wait(self, paths: Iterable[str]) -> None:
        for path in paths:
            await self._events[path].wait()


class LocksAhead:
    """The daemon's locks taken ahead, across requests."""

    def __init__(self, locks: LockService, store: Store) -> None:
        self.locks = locks
        self.store = store
        self.found = FoundMissing()

    async def take(
        self, stack: contextlib.AsyncExitStack, path: str, drv: Derivation, started: Started
    ) -> Reservation | None:
        """Once every input of `path` has its builder running, lock its outputs without
        waiting, held until `stack` closes, and look whether they are still missing.
        None: another owner holds a lock; the build locks the usual way."""
        await started.wait(drv.input_drvs)
        try:
            await stack.enter_async_context(
                self.locks.exclusive(lock_files(drv), build_owner(path), wait=False, delete=True)
            )
        except LockError:
            return None
        reservation = Reservation()
        if drv.is_fixed_output:
            # Its content may be in the store under another name: the build looks.
            return reservation
        # Marked before looking, so that a build of it ending meanwhile clears it.
        self.found.mark(path, reservation)
        stack.callback(self.found.forget, path, reservation)
        outs = [o.path for o in drv.outputs.values()]
        if len(await trio.to_thread.run_sync(self.store.valid_paths, outs)) == len(outs):
            self.found.forget(path, reservation)
        return reservation

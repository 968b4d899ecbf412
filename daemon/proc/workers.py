"""Where the daemon's blocking calls run: worker threads, each kind with its CPU policy.

Nothing slow runs on the event loop.  Every call into the store that may run long goes
through one of three methods here, which pick where it runs (`cpus.py` says why):

- `long`: the daemon's own work on store contents at length (a build's outputs
  registered, a collection's deletions): spread over every CPU the daemon was allowed
  while it lasts, so that it neither waits for the loop nor makes the loop wait;
- `client`: the same for work a client asked for (an upload, a dump, verify,
  optimise), and at most `CLIENT_CALLS` at once: an upload holds its thread while it
  waits for the client's data, and clients that stall must not take every thread;
- `background`: work off the path of any build (a build's log stored, its history
  record): at the lowest priority, so that the loop takes the shared CPU back at once.

Short look-ups (path info, validity) go to `trio.to_thread.run_sync` directly, or in
batches through `rpc/batcher.py`: they take less time than moving a thread would.
"""

from collections.abc import Callable
from typing import TypeVar, TypeVarTuple, Unpack

import trio

from daemon.proc.cpus import UNSHARED, Cpus

T = TypeVar("T")
Ts = TypeVarTuple("Ts")
# Long calls clients may have running at once.  Trio's own pool allows 40 threads; with
# 16 held by stalled uploads, 24 remain for queries, builds and collections.
CLIENT_CALLS = 16


class Workers:
    def __init__(self, cpus: Cpus = UNSHARED, client_calls: int = CLIENT_CALLS) -> None:
        self.cpus = cpus
        self._clients = trio.CapacityLimiter(client_calls)

    async def long(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        return await trio.to_thread.run_sync(self.cpus.spread(fn), *args)

    async def client(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        return await trio.to_thread.run_sync(self.cpus.spread(fn), *args, limiter=self._clients)

    async def background(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        return await trio.to_thread.run_sync(self.cpus.background(fn), *args)

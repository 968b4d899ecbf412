"""Where the daemon's blocking calls run: worker threads, each kind with its CPU policy.

Nothing slow runs on the event loop.  Every call into the store that may run long goes
through one of four methods here, which pick where it runs (`cpus.py` says why):

- `long`: the daemon's own work on store contents at length (a build's outputs
  registered, a collection's deletions): spread over every CPU the daemon was allowed
  while it lasts, so that it neither waits for the loop nor makes the loop wait;
- `client`: the same for store work a client asked for (a dump, verify, optimise), at
  most `CLIENT_CALLS` at once;
- `feed`: work that waits on what a client supplies (an upload's bytes, the files
  `add-from-path` reads as the client), in a pool of its own of `FEED_CALLS`: a client
  can stall such a call (a trickle of bytes, a FUSE file that never answers), and
  stalled ones must take no thread that queries, builds or other work need;
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
# Long store calls clients may have running at once: with trio's own pool of 40 threads
# (queries, builds, collections), more than two CPUs' worth of disk work each way.
CLIENT_CALLS = 16
# Calls waiting on clients' data at once.  Each is a thread, mostly asleep: 16 let that
# many uploads stream in parallel, which a disk cannot outrun, and 40 stalled uploaders
# (the attack that once took every thread of trio's pool) take none of the others'.
FEED_CALLS = 16


class Workers:
    def __init__(
        self, cpus: Cpus = UNSHARED, client_calls: int = CLIENT_CALLS, feed_calls: int = FEED_CALLS
    ) -> None:
        self.cpus = cpus
        self._clients = trio.CapacityLimiter(client_calls)
        self._feeds = trio.CapacityLimiter(feed_calls)

    async def long(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        return await trio.to_thread.run_sync(self.cpus.spread(fn), *args)

    async def client(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        return await trio.to_thread.run_sync(self.cpus.spread(fn), *args, limiter=self._clients)

    async def feed(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        return await trio.to_thread.run_sync(self.cpus.spread(fn), *args, limiter=self._feeds)

    async def background(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        return await trio.to_thread.run_sync(self.cpus.background(fn), *args)

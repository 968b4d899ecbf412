"""The daemon's garbage collector: one collection at a time, all of it off the event loop.

`store.gc` does the work in a worker thread (marking and deletion are long calls:
`daemon/proc/workers.py`); this layer serialises collections, applies
`weft.toml`'s keep settings, answers `store-gc`'s modes, and runs the automatic collection
that builds ask for when free space is under `min-free`.

A collection answers once its dead paths are out of the store (unregistered, and renamed
out of it): their space comes back after, at the disk's pace, in the collector's
`Reclaimer` (`store/gc/reclaim.py`), whose threads run at the lowest priority.  A
collection asked for space (`--max-freed`, or the automatic one before builds) waits for
it.  docs/gc.md says why.
"""

import logging
import os
from dataclasses import dataclass
from enum import Enum

import trio

from daemon.proc.workers import Workers
from daemon.settings import Settings
from store import gc
from store.gc.reclaim import Reclaimer
from store.store import Store

log = logging.getLogger("weft.gc")


class GCMode(Enum):
    """What a `store-gc` request does; the values are the `mode` on the wire."""

    COLLECT = "collect"
    DRY_RUN = "dry-run"  # what COLLECT would delete, up to `max_freed` by archive size
    PRINT_DEAD = "print-dead"
    PRINT_LIVE = "print-live"
    PRINT_ROOTS = "print-roots"


@dataclass(frozen=True, slots=True)
class RootsFound:
    roots: list[gc.Root]


@dataclass(frozen=True, slots=True)
class LivePaths:
    paths: list[str]  # sorted


@dataclass(frozen=True, slots=True)
class DeadPaths:
    paths: list[str]  # sorted
    nar_bytes: int  # their archive sizes, summed


# What `Collector.run` answers, by mode: COLLECT deletes (`gc.GCResult`), the others list.
GCOutcome = gc.GCResult | RootsFound | LivePaths | DeadPaths


class Collector:
    def __init__(self, store: Store, settings: Settings, workers: Workers) -> None:
        self.store = store
        self.settings = settings
        self.workers = workers
        self._lock = trio.Lock()
        self.reclaimer = Reclaimer(
            lambda: gc.remove_unused_links(store), wrap=workers.cpus.background
        )

    async def run(
        self, mode: GCMode, max_freed: int | None = None, only: list[str] | None = None
    ) -> GCOutcome:
        """One `store-gc` request: with `only`, about those paths (all of which must be
        dead); with `max_freed`, deleting (or, for DRY_RUN, listing) until that many bytes
        would be freed."""
        for path in only or ():
            self.store.parse(path)
        if mode is GCMode.PRINT_ROOTS:
            return RootsFound(await self.roots())
        if mode is GCMode.COLLECT:
            return await self.collect(max_freed, only)
        full = await self.plan()
        if mode is GCMode.PRINT_LIVE:
            return LivePaths(sorted(full.live))
        chosen = full
        if only is not None:
            chosen = await self.workers.long(gc.restrict, full, only, self.store)
        dead = gc.simulate(chosen, max_freed) if mode is GCMode.DRY_RUN else chosen.dead
        return DeadPaths(sorted(dead), sum(chosen.sizes[p] for p in dead))

    async def plan(self) -> gc.Plan:
        store, s = self.store, self.settings
        return await self.workers.long(lambda: gc.plan(store, s.keep_outputs, s.keep_derivations))

    async def roots(self) -> list[gc.Root]:
        return await self.workers.long(gc.find_roots, self.store)

    async def collect(
        self, max_freed: int | None = None, only: list[str] | None = None
    ) -> gc.GCResult:
        """Delete dead paths (or only those of `only`, all of which must be dead); with
        `max_freed`, once that much space is back (else once the paths are out of the
        store, the space coming back after)."""
        wait = max_freed is not None
        async with self._lock:
            with self.store.pins.collecting():
                full = await self.plan()
                if only is None:
                    chosen = full
                else:
                    chosen = await self.workers.long(gc.restrict, full, only, self.store)
                return await self.workers.long(
                    gc.delete, self.store, chosen, max_freed, None, self.reclaimer, wait
                )

    def free_bytes(self) -> int:
        st = os.statvfs(self.store.store_dir)
        return st.f_bavail * st.f_frsize

    async def auto_collect(self) -> gc.GCResult | None:
        """Collect before builds when free space is under `min-free`, up to `max-free`."""
        min_free = self.settings.min_free
        if min_free <= 0 or self.free_bytes() >= min_free:
            return None
        async with self._lock:
            # Another request's collection may have just freed enough.
            free = self.free_bytes()
            if free >= min_free:
                return None
            max_free = self.settings.max_free
            want = max_free - free if max_free > 0 else None
            with self.store.pins.collecting():
                full = await self.plan()
                result = await self.workers.long(
                    gc.delete, self.store, full, want, None, self.reclaimer, True
                )
        log.info(
            "automatic collection: %d paths deleted, %d bytes freed",
            len(result.deleted),
            result.bytes_freed,
        )
        return result

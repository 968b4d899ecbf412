"""Repair: what `store-verify --repair` does with the paths verification found bad.

A missing or corrupt path whose deriver is valid is built again and put in place of the
old contents (`Builder.repair`, which ends in `Store.add_outputs(..., repair=True)`).  A
missing path nothing can rebuild is forgotten, unless a valid path refers to it (that
would break a closure); a corrupt one is reported: its content cannot be made again.
"""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from daemon.build.builder import Builder
from daemon.build.events import Event
from store.store import Store, StoreError

# Where the notes of a repair go (the client's log, for `store-verify`).
Note = Callable[[str], Awaitable[None]]


@dataclass(slots=True)
class RepairReport:
    repaired: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # missing and forgotten
    unrepairable: list[tuple[str, str]] = field(default_factory=list)  # (path, why)


class Repairer:
    def __init__(self, store: Store, builder: Builder) -> None:
        self.store = store
        self.builder = builder

    async def repair(self, missing: list[str], corrupt: list[str], note: Note) -> RepairReport:
        """Rebuild bad outputs from their derivations; forget missing paths nothing needs."""
        store = self.store
        groups = await trio.to_thread.run_sync(store.by_deriver, [*missing, *corrupt])
        report = RepairReport()
        gone = set(missing)
        for path in groups.orphans:
            if path not in gone:
                report.unrepairable.append(
                    (path, "a corrupted source cannot be rebuilt: add it again")
                )
                continue
            try:
                await trio.to_thread.run_sync(store.invalidate, path)
                report.removed.append(path)
            except StoreError as e:
                report.unrepairable.append((path, f"missing, and cannot be forgotten: {e}"))

        async def listener(event: Event) -> None:
            await note(event.message)

        for drv, paths in groups.rebuildable.items():
            error = await self.builder.repair(drv, listener)
            if error is None:
                report.repaired += paths
            else:
                report.unrepairable += [(p, f"rebuild failed: {error}") for p in paths]
        return report

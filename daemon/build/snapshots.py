"""The daemon's side of build snapshots (docs/snapshots.md): the rules a request meets,
and the running builds a commit can reach.

The store keeps the snapshots and their records (`store/snapshots.py`, copied in and out
by `store/snapshotfs.py`); the attempts make and restore them as they stop and start
(`stops.py`).  What the operations ask goes through `SnapshotService`:

- `effective`: the scopes a build request gets, its own over weft.toml's, both pairs
  under the subset rule;
- `check_resume`: whether a request may start from a snapshot: only a committed one (a
  paused one is its evicted build's own; a path with no record was not made by a build);
  a `full` one only into the derivation its record names; a `data` one into another
  derivation only for trusted users (what it holds was written by someone else's build);
- `commit_running`: a snapshot of a build running now, through the attempt that runs it
  (registered here while its builder runs);
- `list` and `forget` (its owner, or a trusted user).

Refusals for want of a right are `PermissionError`s (the `permission-denied` code), the
others `StoreError`s (`bad-request`).

Every store call runs in a worker thread of the client pool.
"""

from typing import Protocol

from daemon.proc.workers import Workers
from daemon.settings import Settings
from store.derivation import drv_name
from store.durabledirs import Scope, check_scopes, parse_scope
from store.errors import StoreError
from store.snapshots import NotASnapshot, SnapshotRecord, SnapshotState
from store.store import Store


class Committable(Protocol):
    """An attempt whose builder runs: what `commit_running` snapshots."""

    async def commit(self, scope: Scope | None, owner: int) -> SnapshotRecord:
        """A committed snapshot of `scope` (None: the build's own on-commit, else full)
        taken now, the build frozen meanwhile; StoreError if its builder is gone."""
        ...


def not_running(drv_path: str) -> StoreError:
    return StoreError(f"no build of {drv_path} is running")


class SnapshotService:
    def __init__(self, store: Store, settings: Settings, workers: Workers) -> None:
        self.store = store
        self.settings = settings
        self.workers = workers
        # The attempts whose builders run, by derivation (its output locks: one at a time).
        self.running: dict[str, Committable] = {}

    async def effective(
        self, on_pause: str | None, on_commit: str | None
    ) -> tuple[Scope | None, Scope | None]:
        """The scopes a build request gets: its own (None: not set) over weft.toml's.  The
        request's pair must keep the subset rule by itself, and so must the pair in
        effect; ScopeError if not."""
        pause = None if on_pause is None else parse_scope(on_pause, "on-pause")
        commit = None if on_commit is None else parse_scope(on_commit, "on-commit")
        check_scopes(pause, commit)
        merged = (pause or self.settings.on_pause, commit or self.settings.on_commit)
        check_scopes(*merged)
        return merged

    async def check_resume(self, path: str, drv_path: str, trusted: bool) -> SnapshotRecord:
        """The record of `path`, if a build of `drv_path` may start from it."""
        record = await self.workers.client(self.store.snapshots.get, path)
        if record is None:
            raise NotASnapshot(
                f"{path} is not a snapshot (no record of it: snapshots are made by builds, "
                "not added)"
            )
        if record.state is SnapshotState.PAUSED:
            raise StoreError(
                f"{path} is a paused build's snapshot; only committed snapshots can be resumed from"
            )
        if record.drv == drv_path:
            return record
        if record.scope is Scope.FULL:
            raise StoreError(
                f"{path} is a full snapshot of {record.drv}: a full snapshot restores only "
                f"into the derivation it was made from, not {drv_name(drv_path)}"
            )
        if not trusted:
            raise PermissionError(
                f"{path} is a snapshot of {record.drv}: seeding another derivation's build "
                "from it is for trusted users only"
            )
        return record

    async def commit_running(
        self, drv_path: str, scope: Scope | None, owner: int
    ) -> SnapshotRecord:
        """A committed snapshot of the build of `drv_path` running now, owned by `owner`."""
        attempt = self.running.get(drv_path)
        if attempt is None:
            raise not_running(drv_path)
        return await attempt.commit(scope, owner)

    async def list(self, target: str) -> list[SnapshotRecord]:
        """The snapshots of a derivation, of the derivations of an output, or a snapshot's
        own record; newest first."""
        return await self.workers.client(self.store.snapshots.for_target, target)

    async def forget(self, path: str, uid: int, trusted: bool) -> SnapshotRecord:
        """Drop the record of snapshot `path` (its path is garbage from then on)."""
        record = await self.workers.client(self.store.snapshots.get, path)
        if record is None:
            raise NotASnapshot(f"{path} is not a snapshot (no record of it)")
        if record.owner != uid and not trusted:
            raise PermissionError(
                f"{path} is uid {record.owner}'s snapshot: only its owner or a trusted user "
                "may forget it"
            )
        forgotten = await self.workers.client(self.store.snapshots.forget, path)
        if forgotten is None:
            raise NotASnapshot(f"{path} is not a snapshot (no record of it)")
        return forgotten

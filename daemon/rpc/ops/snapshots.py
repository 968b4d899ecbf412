"""Snapshots of stopped builds (docs/snapshots.md): commit a running build's, list a
derivation's, forget one.  The rules (who may forget, what a commit freezes) are the
snapshot service's (`daemon/build/snapshots.py`); here the arguments are checked and the
records encoded."""

from typing import Any

from daemon.build.snapshots import SnapshotService
from daemon.rpc.context import Operation, RequestContext
from daemon.rpc.errors import OpError
from daemon.rpc.ops.args import opt_str_arg, str_arg
from daemon.wire.protocol import Code
from store.durabledirs import parse_scope


def snapshot_service(ctx: RequestContext) -> SnapshotService:
    snapshots = ctx.services.snapshots
    if snapshots is None:
        raise OpError(Code.BAD_REQUEST, "this daemon does not build, so it keeps no snapshots")
    return snapshots


def _store_path(ctx: RequestContext, key: str) -> str:
    """A store path argument, refused (`invalid-path`) if it is not one."""
    path = str_arg(ctx, key)
    ctx.services.store.parse(path)
    return path


async def snapshot_commit(ctx: RequestContext) -> dict[str, Any]:
    """Snapshot the running build of `drv` now, of `scope` (else its own on-commit, else
    full); the caller owns the snapshot."""
    drv = _store_path(ctx, "drv")
    scope = opt_str_arg(ctx, "scope")
    parsed = None if scope is None else parse_scope(scope, "scope")
    record = await snapshot_service(ctx).commit_running(drv, parsed, ctx.peer.uid)
    return record.as_dict()


async def snapshots(ctx: RequestContext) -> dict[str, Any]:
    """The snapshots of a derivation (`target`: its `.drv`, or one of its outputs), newest
    first."""
    records = await snapshot_service(ctx).list(_store_path(ctx, "target"))
    return {"snapshots": [r.as_dict() for r in records]}


async def snapshot_forget(ctx: RequestContext) -> dict[str, Any]:
    """Drop a snapshot's record (its owner, or a trusted user): its path is then garbage."""
    path = _store_path(ctx, "path")
    record = await snapshot_service(ctx).forget(path, ctx.peer.uid, ctx.peer.trusted)
    return record.as_dict()


SNAPSHOT_OPERATIONS: dict[str, Operation] = {
    "snapshot-commit": Operation(snapshot_commit),
    "snapshots": Operation(snapshots),
    "snapshot-forget": Operation(snapshot_forget),
}

"""The operations that show the scheduler and the build history (`store-status`,
`store-history`), and forget a derivation's history (`store-history --forget`); see
docs/scheduling.md."""

from typing import Any

import trio

from daemon.build.builder import Builder
from daemon.rpc.context import Operation, RequestContext
from daemon.rpc.errors import OpError
from daemon.rpc.ops.args import arg_bool, str_arg
from daemon.wire.protocol import Code


def _builder(ctx: RequestContext) -> Builder:
    builder = ctx.services.builder
    if builder is None:
        raise OpError(Code.BAD_REQUEST, "this daemon does not build")
    return builder


async def _derivation(ctx: RequestContext) -> str:
    """The `.drv` the request's `drv` names: itself, or the deriver of an output."""
    path = str_arg(ctx, "drv")
    drv = await trio.to_thread.run_sync(ctx.services.store.resolve_deriver, path)
    if drv is None:
        raise OpError(Code.NOT_VALID, f"{path} is not a derivation or a built output")
    return drv


async def status(ctx: RequestContext) -> dict[str, Any]:
    return _builder(ctx).scheduler.status()


async def history(ctx: RequestContext) -> dict[str, Any]:
    """A derivation's attempts (`drv`: a .drv or an output path), each with the snapshot
    it left (`snapshot`, or None: docs/snapshots.md), or every flaky one."""
    builder = _builder(ctx)
    if arg_bool(ctx.args, "flaky"):
        return {"flaky": await trio.to_thread.run_sync(builder.history.flaky)}
    drv = await _derivation(ctx)
    attempts = await trio.to_thread.run_sync(builder.history.attempts, drv)
    flaky = await trio.to_thread.run_sync(builder.history.is_flaky, drv)
    return {"drv": drv, "flaky": flaky, "attempts": [a.as_dict() for a in attempts]}


async def forget_history(ctx: RequestContext) -> dict[str, Any]:
    """Drop a derivation's attempts and its flaky mark: how many there were, and whether
    it was marked.  Open to all: the history only hints the retry policy."""
    builder = _builder(ctx)
    drv = await _derivation(ctx)
    attempts, flaky = await trio.to_thread.run_sync(builder.history.forget, drv)
    return {"drv": drv, "attempts": attempts, "flaky": flaky}


SCHEDULING_OPERATIONS: dict[str, Operation] = {
    "status": Operation(status),
    "history": Operation(history),
    "forget-history": Operation(forget_history),
}

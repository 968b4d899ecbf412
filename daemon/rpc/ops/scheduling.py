"""The operations that show the scheduler and the build history (`store-status`,
`store-history`); see docs/scheduling.md."""

from typing import Any

import trio

from daemon.rpc.context import Operation, RequestContext
from daemon.rpc.errors import OpError
from daemon.wire.protocol import Code


def _builder(ctx: RequestContext):  # type: ignore[no-untyped-def]
    builder = ctx.services.builder
    if builder is None:
        raise OpError(Code.BAD_REQUEST, "this daemon does not build")
    return builder


async def status(ctx: RequestContext) -> dict[str, Any]:
    return _builder(ctx).scheduler.status()


async def history(ctx: RequestContext) -> dict[str, Any]:
    """A derivation's attempts (`drv`: a .drv or an output path), or every flaky one."""
    builder = _builder(ctx)
    if ctx.args.get("flaky"):
        return {"flaky": await trio.to_thread.run_sync(builder.history.flaky)}
    path = ctx.args.get("drv")
    if not isinstance(path, str) or not path:
        raise OpError(Code.BAD_REQUEST, "'drv' must be a non-empty string")
    drv = await trio.to_thread.run_sync(ctx.services.store.resolve_deriver, path)
    if drv is None:
        raise OpError(Code.NOT_VALID, f"{path} is not a derivation or a built output")
    attempts = await trio.to_thread.run_sync(builder.history.attempts, drv)
    flaky = await trio.to_thread.run_sync(builder.history.is_flaky, drv)
    return {"drv": drv, "flaky": flaky, "attempts": [a.as_dict() for a in attempts]}


SCHEDULING_OPERATIONS: dict[str, Operation] = {
    "status": Operation(status),
    "history": Operation(history),
}

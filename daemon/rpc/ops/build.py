"""Building derivations, and the logs builds left."""

from typing import Any

import trio

from daemon.build.builder import BuildOptions
from daemon.rpc.context import RequestContext
from daemon.rpc.errors import OpError
from daemon.rpc.ops.args import keep_alive, str_arg, strs_arg
from daemon.wire.protocol import Code
from store.derivation import DerivationError


async def build(ctx: RequestContext) -> list[dict[str, object]]:
    builder = ctx.services.builder
    if builder is None:
        raise OpError(Code.BAD_REQUEST, "this daemon does not build")
    drvs = strs_arg(ctx, "drvs")
    for d in drvs:
        ctx.services.store.parse(d)
    jobs = ctx.args.get("max_jobs") or builder.max_jobs
    if type(jobs) is not int or jobs < 1:
        raise OpError(Code.BAD_REQUEST, "'max_jobs' must be a positive integer")
    limits: dict[str, Any] = {}
    for key, kind in (("timeout", float), ("max_silent_time", float), ("max_log_size", int)):
        value = ctx.args.get(key)
        if value is not None:
            if not isinstance(value, int | float) or value <= 0:
                raise OpError(Code.BAD_REQUEST, f"{key!r} must be a positive number")
            limits[key] = kind(value)
    keep_failed = (ctx.peer.uid, ctx.peer.gid) if ctx.args.get("keep_failed") else None
    retries = ctx.args.get("retries")
    if retries is not None and (type(retries) is not int or retries < 0):
        raise OpError(Code.BAD_REQUEST, "'retries' must be a non-negative integer")
    opts = BuildOptions(
        max_jobs=jobs,
        keep_going=bool(ctx.args.get("keep_going")),
        check=bool(ctx.args.get("check")),
        keep_failed_for=keep_failed,
        retries=retries,
        **limits,
    )

    async def listener(message: str, progress: tuple[int, int] | None) -> None:
        done, total = progress if progress is not None else (None, None)
        await ctx.log(message, done, total)

    try:
        results = await builder.build(drvs, opts, listener)
    except DerivationError as e:
        raise OpError(Code.BAD_REQUEST, str(e)) from None
    await keep_alive(
        ctx,
        [
            path
            for r in results
            if r["status"] in ("built", "valid", "checked")
            for path in r["outputs"].values()  # type: ignore[attr-defined]
        ],
    )
    return results


async def build_log(ctx: RequestContext) -> dict[str, int]:
    """Stream the stored log of a derivation, or of the derivation that built an output."""
    path = str_arg(ctx, "path")
    store = ctx.services.store
    info = await trio.to_thread.run_sync(store.path_info, path)
    drv = path if path.endswith(".drv") else (info.deriver if info else None)
    if drv is None:
        raise OpError(Code.NOT_VALID, f"{path} is not a derivation or a built output")
    builder = ctx.services.builder
    if builder is None:
        raise OpError(Code.BAD_REQUEST, "this daemon does not build")
    try:
        data = await trio.to_thread.run_sync(builder.read_log, drv)
    except FileNotFoundError:
        raise OpError(Code.NOT_VALID, f"no build log for {drv}") from None
    await ctx.send_data(data)
    await ctx.end_data()
    return {"size": len(data)}


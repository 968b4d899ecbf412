"""Keeping the store whole and small: verify and repair, garbage collection, optimise."""

from typing import Any

import trio

from daemon.rpc.context import RequestContext
from daemon.rpc.errors import OpError
from daemon.rpc.ops.args import send_lines, str_arg, strs_arg
from daemon.wire.protocol import Code
from store import gc
from store.store import StoreError


async def verify(ctx: RequestContext) -> dict[str, Any]:
    paths = strs_arg(ctx, "paths", []) or None
    contents = bool(ctx.args.get("check_contents"))
    repair = bool(ctx.args.get("repair"))
    if repair and not ctx.peer.trusted:
        raise OpError(Code.PERMISSION, "only trusted users may repair the store")
    store = ctx.services.store
    await ctx.log("verifying " + ("all paths" if paths is None else f"{len(paths)} paths"))
    report = await trio.to_thread.run_sync(ctx.services.cpus.spread(store.verify), paths, contents)
    result: dict[str, Any] = {
        "checked": report.checked,
        "missing": report.missing,
        "mismatched": [list(m) for m in report.mismatched],
    }
    if repair:
        result |= await _repair(ctx, report.missing, [m[0] for m in report.mismatched])
    return result


async def _repair(ctx: RequestContext, missing: list[str], corrupt: list[str]) -> dict[str, Any]:
    """Rebuild bad outputs from their derivations; forget missing paths nothing needs."""
    store, builder = ctx.services.store, ctx.services.builder
    repaired: list[str] = []
    removed: list[str] = []
    failed: list[list[str]] = []
    by_drv: dict[str, list[str]] = {}
    for path in [*missing, *corrupt]:
        info = await trio.to_thread.run_sync(store.path_info, path)
        deriver = info.deriver if info is not None else None
        if deriver and builder and await trio.to_thread.run_sync(store.is_valid, deriver):
            by_drv.setdefault(deriver, []).append(path)
        elif path in missing:
            try:
                await trio.to_thread.run_sync(store.invalidate, path)
                removed.append(path)
            except StoreError as e:
                failed.append([path, f"missing, and cannot be forgotten: {e}"])
        else:
            failed.append([path, "a corrupted source cannot be rebuilt: add it again"])

    async def listener(message: str, progress: tuple[int, int] | None) -> None:
        await ctx.log(message)

    if builder is not None:
        for drv, paths in by_drv.items():
            error = await builder.repair(drv, listener)
            if error is None:
                repaired += paths
            else:
                failed += [[p, f"rebuild failed: {error}"] for p in paths]
    return {"repaired": repaired, "removed": removed, "unrepairable": failed}


GC_MODES = ("collect", "dry-run", "print-dead", "print-live", "print-roots")


async def collect_garbage(ctx: RequestContext) -> dict[str, Any]:
    """`store-gc`: the paths it lists (deleted, dead, live or roots) go as data lines."""
    mode = str_arg(ctx, "mode", "collect")
    if mode not in GC_MODES:
        raise OpError(Code.BAD_REQUEST, f"'mode' must be one of {', '.join(GC_MODES)}")
    max_freed = ctx.args.get("max_freed")
    if max_freed is not None and (type(max_freed) is not int or max_freed < 0):
        raise OpError(Code.BAD_REQUEST, "'max_freed' must be a number of bytes")
    only = strs_arg(ctx, "paths", []) or None
    for path in only or ():
        ctx.services.store.parse(path)
    collector = ctx.services.collector
    if mode == "print-roots":
        roots = await collector.roots()
        await send_lines(ctx, [f"{r.source} -> {r.path}" for r in roots])
        return {"roots": len(roots)}
    if mode == "collect":
        result = await collector.collect(max_freed, only)
        await send_lines(ctx, result.deleted)
        return {
            "deleted": len(result.deleted),
            "bytes_freed": result.bytes_freed,
            "kept": result.kept,
            "links_removed": result.links_removed,
        }
    plan = await collector.plan()
    if mode == "print-live":
        await send_lines(ctx, sorted(plan.live))
        return {"live": len(plan.live)}
    if only is not None:
        plan = await trio.to_thread.run_sync(gc.restrict, plan, only, ctx.services.store)
    dead = gc.simulate(plan, max_freed) if mode == "dry-run" else plan.dead
    await send_lines(ctx, sorted(dead))
    return {"dead": len(dead), "bytes": sum(plan.sizes[p] for p in dead)}


async def optimise(ctx: RequestContext) -> dict[str, int]:
    await ctx.log("optimising the store")
    stats = await trio.to_thread.run_sync(ctx.services.cpus.spread(ctx.services.store.optimise))
    return {
        "paths": stats.paths,
        "files_linked": stats.files_linked,
        "bytes_saved": stats.bytes_saved,
    }


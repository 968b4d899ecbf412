"""Keeping the store whole and small: verify and repair, garbage collection, optimise."""

from typing import Any

from daemon.rpc.context import RequestContext
from daemon.rpc.errors import OpError
from daemon.rpc.ops.args import arg_bool, arg_int, send_lines, str_arg, strs_arg
from daemon.upkeep.collector import DeadPaths, GCMode, LivePaths, RootsFound
from daemon.wire.protocol import Code
from store.gc import GCResult, Root

# The most bytes `max_freed` may say: more than any file system holds, and a signed
# 64-bit integer wherever it goes.
MAX_BYTES = (1 << 63) - 1


async def verify(ctx: RequestContext) -> dict[str, Any]:
    paths = strs_arg(ctx, "paths", []) or None
    contents = arg_bool(ctx.args, "check_contents")
    repair = arg_bool(ctx.args, "repair")
    if repair and not ctx.peer.trusted:
        raise OpError(Code.PERMISSION, "only trusted users may repair the store")
    repairer = ctx.services.repairer
    if repair and repairer is None:
        raise OpError(Code.BAD_REQUEST, "this daemon does not build")
    store = ctx.services.store
    await ctx.log("verifying " + ("all paths" if paths is None else f"{len(paths)} paths"))
    report = await ctx.services.workers.client(store.verify, paths, contents)
    result: dict[str, Any] = {
        "checked": report.checked,
        "missing": report.missing,
        "mismatched": [list(m) for m in report.mismatched],
    }
    if repairer is not None and repair:
        corrupt = [m[0] for m in report.mismatched]
        done = await repairer.repair(report.missing, corrupt, ctx.log)
        result |= {
            "repaired": done.repaired,
            "removed": done.removed,
            "unrepairable": [list(u) for u in done.unrepairable],
        }
    return result


async def collect_garbage(ctx: RequestContext) -> dict[str, Any]:
    """`store-gc`: the paths it lists (deleted, dead, live or roots) go as data lines."""
    try:
        mode = GCMode(str_arg(ctx, "mode", "collect"))
    except ValueError:
        modes = ", ".join(m.value for m in GCMode)
        raise OpError(Code.BAD_REQUEST, f"'mode' must be one of {modes}") from None
    max_freed = arg_int(ctx.args, "max_freed", 0, MAX_BYTES)
    only = strs_arg(ctx, "paths", []) or None
    match await ctx.services.collector.run(mode, max_freed, only):
        case RootsFound(roots):
            shown = await _censor_runtimes(ctx, roots)
            await send_lines(
                ctx, [f"{source} -> {r.path}" for source, r in zip(shown, roots, strict=True)]
            )
            return {"roots": len(roots)}
        case GCResult() as deleted:
            await send_lines(ctx, deleted.deleted)
            return {
                "deleted": len(deleted.deleted),
                "bytes_freed": deleted.bytes_freed,
                "kept": deleted.kept,
                "links_removed": deleted.links_removed,
            }
        case LivePaths(paths):
            await send_lines(ctx, paths)
            return {"live": len(paths)}
        case DeadPaths(paths, nar_bytes):
            await send_lines(ctx, paths)
            return {"dead": len(paths), "bytes": nar_bytes}


async def _censor_runtimes(ctx: RequestContext, roots: list[Root]) -> list[str]:
    """Each root's source, another user's runtime shown as such and not by its id: a
    runtime id is its user's to know (docs/store-run.md).  Trusted users see all, as
    they do in Nix."""
    runtimes = ctx.services.runtimes
    if runtimes is None or ctx.peer.trusted:
        return [r.source for r in roots]
    owners = await runtimes.owners()
    prefix = str(ctx.services.state.runtime_roots_dir) + "/"
    shown = []
    for r in roots:
        runtime_id = r.source[len(prefix) :].split("/", 1)[0]
        if r.source.startswith(prefix) and owners.get(runtime_id) != ctx.peer.uid:
            shown.append("{runtime of another user}")
        else:
            shown.append(r.source)
    return shown


async def optimise(ctx: RequestContext) -> dict[str, int]:
    await ctx.log("optimising the store")
    stats = await ctx.services.workers.client(ctx.services.store.optimise)
    return {
        "paths": stats.paths,
        "files_linked": stats.files_linked,
        "bytes_saved": stats.bytes_saved,
    }

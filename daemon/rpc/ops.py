"""The store operations the daemon serves, by name.  See docs/protocol.md for each."""

import os
from typing import Any

import blake3
import trio

from daemon.build.builder import BuildOptions
from daemon.rpc.errors import OpError
from daemon.rpc.ops_scheduling import SCHEDULING_OPERATIONS
from daemon.rpc.server import Operation, RequestContext
from daemon.wire.protocol import Code
from store import base32, gc, nar
from store.derivation import DerivationError
from store.store import PathInfo, Reader, Store, StoreError


def _arg_str(args: dict[str, Any], key: str, default: str | None = None) -> str:
    value = args.get(key, default)
    if not isinstance(value, str) or not value:
        raise OpError(Code.BAD_REQUEST, f"{key!r} must be a non-empty string")
    return value


def _arg_strs(args: dict[str, Any], key: str, default: list[str] | None = None) -> list[str]:
    value = args.get(key, default)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise OpError(Code.BAD_REQUEST, f"{key!r} must be a list of strings")
    return value


def _str(ctx: RequestContext, key: str, default: str | None = None) -> str:
    return _arg_str(ctx.args, key, default)


def _opt_str(ctx: RequestContext, key: str) -> str | None:
    if ctx.args.get(key) is None:
        return None
    return _str(ctx, key)


def _strs(ctx: RequestContext, key: str, default: list[str] | None = None) -> list[str]:
    return _arg_strs(ctx.args, key, default)


def _info(info: PathInfo) -> dict[str, Any]:
    return {
        "path": info.path,
        "nar_hash": info.nar_hash,
        "nar_size": info.nar_size,
        "references": list(info.references),
        "registration_time": info.registration_time,
        "deriver": info.deriver,
        "ca": info.ca,
        "sigs": list(info.sigs),
    }


async def _keep_alive(ctx: RequestContext, paths: list[str]) -> None:
    """Paths stay alive until the client's connection closes, as in Nix.  (Adds pin
    their path themselves, before looking it up: see `store.pins`.)"""
    await trio.to_thread.run_sync(ctx.daemon.store.pins.pin, ctx.conn, paths)


# Queries: quick blocking calls, run in a worker thread in batches (see server.py).


def path_info(store: Store, args: dict[str, Any]) -> dict[str, Any]:
    path = _arg_str(args, "path")
    info = store.path_info(path)
    if info is None:
        raise OpError(Code.NOT_VALID, f"path {path!r} is not valid")
    return _info(info)


def is_valid(store: Store, args: dict[str, Any]) -> list[str]:
    paths = _arg_strs(args, "paths")
    valid = store.valid_paths(paths)
    return [p for p in paths if p in valid]


def references(store: Store, args: dict[str, Any]) -> list[str]:
    return store.references(_arg_str(args, "path"))


def referrers(store: Store, args: dict[str, Any]) -> list[str]:
    return store.referrers(_arg_str(args, "path"))


async def closure(ctx: RequestContext) -> list[str]:
    paths = _strs(ctx, "paths")
    return await trio.to_thread.run_sync(ctx.daemon.store.closure, paths)


async def add(ctx: RequestContext) -> dict[str, Any]:
    name = _str(ctx, "name")
    refs = _strs(ctx, "references", [])
    expected = _opt_str(ctx, "hash")
    read = ctx.upload().blocking_reader()
    store = ctx.daemon.store
    info = await trio.to_thread.run_sync(
        ctx.daemon.cpus.spread(lambda: store.add_nar(read, name, refs, expected, pin=ctx.conn))
    )
    return _info(info)


async def add_from_path(ctx: RequestContext) -> dict[str, Any]:
    src = _str(ctx, "path")
    if not os.path.isabs(src):
        raise OpError(Code.BAD_REQUEST, f"path {src!r} is not absolute")
    name = _opt_str(ctx, "name")
    refs = _strs(ctx, "references", [])
    peer = ctx.peer
    reader: Reader | None = None
    if peer.uid != os.geteuid():
        if os.geteuid() != 0:
            raise OpError(Code.PERMISSION, "this daemon can read paths only for its own user")
        try:
            groups = os.getgrouplist(peer.user, peer.gid)
        except (KeyError, OSError):
            groups = [peer.gid]
        reader = Reader(peer.uid, peer.gid, tuple(groups))
    store = ctx.daemon.store
    info = await trio.to_thread.run_sync(
        ctx.daemon.cpus.spread(lambda: store.add_path(src, name, refs, reader, pin=ctx.conn))
    )
    return _info(info)


async def dump(ctx: RequestContext) -> dict[str, int]:
    path = _str(ctx, "path")
    store = ctx.daemon.store
    if not await trio.to_thread.run_sync(store.is_valid, path):
        raise OpError(Code.NOT_VALID, f"path {path!r} is not valid")
    chunks = nar.dump(path)
    total = 0
    try:
        while (chunk := await trio.to_thread.run_sync(next, chunks, None)) is not None:
            await ctx.send_data(chunk)
            total += len(chunk)
    finally:
        chunks.close()
    await ctx.end_data()
    return {"nar_size": total}


async def build_log(ctx: RequestContext) -> dict[str, int]:
    """Stream the stored log of a derivation, or of the derivation that built an output."""
    path = _str(ctx, "path")
    store = ctx.daemon.store
    info = await trio.to_thread.run_sync(store.path_info, path)
    drv = path if path.endswith(".drv") else (info.deriver if info else None)
    if drv is None:
        raise OpError(Code.NOT_VALID, f"{path} is not a derivation or a built output")
    builder = ctx.daemon.builder
    if builder is None:
        raise OpError(Code.BAD_REQUEST, "this daemon does not build")
    try:
        data = await trio.to_thread.run_sync(builder.read_log, drv)
    except FileNotFoundError:
        raise OpError(Code.NOT_VALID, f"no build log for {drv}") from None
    await ctx.send_data(data)
    await ctx.end_data()
    return {"size": len(data)}


async def verify(ctx: RequestContext) -> dict[str, Any]:
    paths = _strs(ctx, "paths", []) or None
    contents = bool(ctx.args.get("check_contents"))
    repair = bool(ctx.args.get("repair"))
    if repair and not ctx.peer.trusted:
        raise OpError(Code.PERMISSION, "only trusted users may repair the store")
    store = ctx.daemon.store
    await ctx.log("verifying " + ("all paths" if paths is None else f"{len(paths)} paths"))
    report = await trio.to_thread.run_sync(ctx.daemon.cpus.spread(store.verify), paths, contents)
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
    store, builder = ctx.daemon.store, ctx.daemon.builder
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


async def _send_lines(ctx: RequestContext, lines: list[str]) -> None:
    """Long lists (every dead path, say) go as data: a reply frame has a size limit."""
    chunk: list[str] = []
    size = 0
    for line in lines:
        chunk.append(line)
        size += len(line) + 1
        if size > 256 << 10:
            await ctx.send_data(("\n".join(chunk) + "\n").encode())
            chunk, size = [], 0
    if chunk:
        await ctx.send_data(("\n".join(chunk) + "\n").encode())
    await ctx.end_data()


GC_MODES = ("collect", "dry-run", "print-dead", "print-live", "print-roots")


async def collect_garbage(ctx: RequestContext) -> dict[str, Any]:
    """`store-gc`: the paths it lists (deleted, dead, live or roots) go as data lines."""
    mode = _str(ctx, "mode", "collect")
    if mode not in GC_MODES:
        raise OpError(Code.BAD_REQUEST, f"'mode' must be one of {', '.join(GC_MODES)}")
    max_freed = ctx.args.get("max_freed")
    if max_freed is not None and (type(max_freed) is not int or max_freed < 0):
        raise OpError(Code.BAD_REQUEST, "'max_freed' must be a number of bytes")
    only = _strs(ctx, "paths", []) or None
    for path in only or ():
        ctx.daemon.store.parse(path)
    collector = ctx.daemon.collector
    if mode == "print-roots":
        roots = await collector.roots()
        await _send_lines(ctx, [f"{r.source} -> {r.path}" for r in roots])
        return {"roots": len(roots)}
    if mode == "collect":
        result = await collector.collect(max_freed, only)
        await _send_lines(ctx, result.deleted)
        return {
            "deleted": len(result.deleted),
            "bytes_freed": result.bytes_freed,
            "kept": result.kept,
            "links_removed": result.links_removed,
        }
    plan = await collector.plan()
    if mode == "print-live":
        await _send_lines(ctx, sorted(plan.live))
        return {"live": len(plan.live)}
    if only is not None:
        plan = await trio.to_thread.run_sync(gc.restrict, plan, only, ctx.daemon.store)
    dead = gc.simulate(plan, max_freed) if mode == "dry-run" else plan.dead
    await _send_lines(ctx, sorted(dead))
    return {"dead": len(dead), "bytes": sum(plan.sizes[p] for p in dead)}


async def optimise(ctx: RequestContext) -> dict[str, int]:
    await ctx.log("optimising the store")
    stats = await trio.to_thread.run_sync(ctx.daemon.cpus.spread(ctx.daemon.store.optimise))
    return {
        "paths": stats.paths,
        "files_linked": stats.files_linked,
        "bytes_saved": stats.bytes_saved,
    }


async def add_temp_root(ctx: RequestContext) -> None:
    path = _str(ctx, "path")
    ctx.daemon.store.parse(path)
    await _keep_alive(ctx, [path])


async def add_root(ctx: RequestContext) -> str:
    """Register an indirect root: `gcroots/auto/<hash of link>` -> the client's link."""
    link = _str(ctx, "link")
    if not os.path.isabs(link):
        raise OpError(Code.BAD_REQUEST, f"root link {link!r} is not absolute")
    auto = ctx.daemon.state.gcroots_dir / "auto"
    name = base32.encode(blake3.blake3(os.fsencode(link)).digest(length=20))
    entry = auto / name
    tmp = auto / f".{name}.tmp"

    def make() -> None:
        tmp.unlink(missing_ok=True)
        os.symlink(link, tmp)
        os.rename(tmp, entry)

    await trio.to_thread.run_sync(make)
    return str(entry)


async def add_text(ctx: RequestContext) -> dict[str, Any]:
    name = _str(ctx, "name")
    text = ctx.args.get("text")
    if not isinstance(text, str):
        raise OpError(Code.BAD_REQUEST, "'text' must be a string")
    refs = _strs(ctx, "references", [])
    store = ctx.daemon.store
    builder = ctx.daemon.builder

    def add() -> PathInfo:
        info = store.add_text(name, text, refs, pin=ctx.conn)
        if builder is not None and info.path.endswith(".drv"):
            builder.learn(info.path, text)
        return info

    return _info(await trio.to_thread.run_sync(add))


async def build(ctx: RequestContext) -> list[dict[str, object]]:
    builder = ctx.daemon.builder
    if builder is None:
        raise OpError(Code.BAD_REQUEST, "this daemon does not build")
    drvs = _strs(ctx, "drvs")
    for d in drvs:
        ctx.daemon.store.parse(d)
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
    await _keep_alive(
        ctx,
        [
            path
            for r in results
            if r["status"] in ("built", "valid", "checked")
            for path in r["outputs"].values()  # type: ignore[attr-defined]
        ],
    )
    return results


def store_dir(store: Store, args: dict[str, Any]) -> str:
    return store.store_dir


async def shutdown(ctx: RequestContext) -> None:
    await ctx.log("shutting down")
    ctx.daemon.shutdown_requested.set()


OPERATIONS: dict[str, Operation] = {
    "path-info": Operation(query=path_info),
    "is-valid": Operation(query=is_valid),
    "references": Operation(query=references),
    "referrers": Operation(query=referrers),
    "closure": Operation(closure),
    "add": Operation(add),
    "add-from-path": Operation(add_from_path),
    "dump": Operation(dump),
    "verify": Operation(verify),
    "gc": Operation(collect_garbage),
    "optimise": Operation(optimise),
    "add-temp-root": Operation(add_temp_root),
    "add-root": Operation(add_root),
    "store-dir": Operation(query=store_dir),
    "add-text": Operation(add_text),
    "build": Operation(build),
    "log": Operation(build_log),
    "shutdown": Operation(shutdown, trusted_only=True),
    **SCHEDULING_OPERATIONS,
}

"""Store paths: queries, adds, dumps and roots (docs/protocol.md)."""

import functools
import os
from collections.abc import Hashable
from typing import Any

import trio

from daemon.build.builder import Builder
from daemon.rpc.auth import reader_for
from daemon.rpc.context import RequestContext
from daemon.rpc.errors import OpError
from daemon.rpc.ops.args import (
    arg_str,
    arg_strs,
    encode_info,
    keep_alive,
    opt_str_arg,
    str_arg,
    strs_arg,
)
from daemon.rpc.services import Services
from daemon.wire.protocol import Code, Packed, packed
from store import gc
from store.store import PathInfo, Store

# Texts in one `add-texts` request, all added in one transaction: the store's write lock
# is held while they are written (a few thousand `.drv`s take tens of milliseconds), and a
# request frame (`MAX_FRAME`, 4 MiB) holds about this many anyway.
MAX_TEXTS = 4096


def path_info(services: Services, args: dict[str, Any]) -> Packed:
    (answer,) = path_infos(services, [args])
    if isinstance(answer, Exception):
        raise answer
    return answer


def path_infos(services: Services, many: list[dict[str, Any]]) -> list[Any]:
    """`path_info` of many requests in one read of the database (the query batcher's), or
    none when the daemon's cache has them all (`Services.infos`)."""
    paths = [arg_str(args, "path") for args in many]
    return services.infos.lookup(paths, functools.partial(_lookup, services.store))


def _lookup(store: Store, paths: list[str]) -> list[Any]:
    infos = store.path_infos(paths)
    return [
        packed(encode_info(infos[path]))
        if path in infos
        else OpError(Code.NOT_VALID, f"path {path!r} is not valid")
        for path in paths
    ]


def is_valid(services: Services, args: dict[str, Any]) -> list[str]:
    paths = arg_strs(args, "paths")
    valid = services.store.valid_paths(paths)
    return [p for p in paths if p in valid]


def references(services: Services, args: dict[str, Any]) -> list[str]:
    return services.store.references(arg_str(args, "path"))


def referrers(services: Services, args: dict[str, Any]) -> list[str]:
    return services.store.referrers(arg_str(args, "path"))


async def closure(ctx: RequestContext) -> list[str]:
    paths = strs_arg(ctx, "paths")
    return await trio.to_thread.run_sync(ctx.services.store.closure, paths)


async def add(ctx: RequestContext) -> dict[str, Any]:
    name = str_arg(ctx, "name")
    refs = strs_arg(ctx, "references", [])
    expected = opt_str_arg(ctx, "hash")
    store = ctx.services.store
    info = await ctx.read_upload(
        lambda read: store.add_nar(read, name, refs, expected, pin=ctx.conn),
        may_need_none=expected is not None,
    )
    return encode_info(info)


async def add_from_path(ctx: RequestContext) -> dict[str, Any]:
    src = str_arg(ctx, "path")
    if not os.path.isabs(src):
        raise OpError(Code.BAD_REQUEST, f"path {src!r} is not absolute")
    name = opt_str_arg(ctx, "name")
    refs = strs_arg(ctx, "references", [])
    reader = reader_for(ctx.peer)
    store = ctx.services.store
    info = await ctx.from_client(lambda: store.add_path(src, name, refs, reader, pin=ctx.conn))
    return encode_info(info)


async def dump(ctx: RequestContext) -> dict[str, int]:
    path = str_arg(ctx, "path")
    chunks = await trio.to_thread.run_sync(ctx.services.store.dump, path)
    total = 0
    try:
        while (chunk := await ctx.services.workers.client(next, chunks, None)) is not None:
            await ctx.send_data(chunk)
            total += len(chunk)
    finally:
        chunks.close()
    await ctx.end_data()
    return {"nar_size": total}


async def add_temp_root(ctx: RequestContext) -> None:
    path = str_arg(ctx, "path")
    ctx.services.store.parse(path)
    await keep_alive(ctx, [path])


async def add_root(ctx: RequestContext) -> str:
    """Register an indirect root: `gcroots/auto/<hash of link>` -> the client's link."""
    link = str_arg(ctx, "link")
    entry = await trio.to_thread.run_sync(gc.add_indirect_root, ctx.services.store, link)
    return str(entry)


async def add_text(ctx: RequestContext) -> dict[str, Any]:
    name = str_arg(ctx, "name")
    text = ctx.args.get("text")
    if not isinstance(text, str):
        raise OpError(Code.BAD_REQUEST, "'text' must be a string")
    refs = strs_arg(ctx, "references", [])
    store = ctx.services.store
    builder = ctx.services.builder

    def add() -> PathInfo:
        info = store.add_text(name, text, refs, pin=ctx.conn)
        if builder is not None and info.path.endswith(".drv"):
            builder.learn(info.path, text)
        return info

    return encode_info(await trio.to_thread.run_sync(add))


def texts_arg(ctx: RequestContext) -> list[tuple[str, str, list[str]]]:
    """`texts`: a list of at most MAX_TEXTS maps {name, text, references}."""
    value = ctx.args.get("texts")
    if not isinstance(value, list) or len(value) > MAX_TEXTS:
        raise OpError(Code.BAD_REQUEST, f"'texts' must be a list of at most {MAX_TEXTS} texts")
    items = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise OpError(Code.BAD_REQUEST, "each of 'texts' is a map {name, text, references}")
        items.append((arg_str(item, "name"), item["text"], arg_strs(item, "references", [])))
    return items


async def add_texts(ctx: RequestContext) -> dict[str, list[str]]:
    """Many texts in one transaction (a recipe's `.drv`s: docs/protocol.md), once the paths
    in `require` are pinned for the connection and found valid."""
    items = texts_arg(ctx)
    required = strs_arg(ctx, "require", [])
    for path in required:
        ctx.services.store.parse(path)
    add = functools.partial(
        _add_texts, ctx.services.store, ctx.services.builder, ctx.conn, items, required
    )
    return await ctx.services.workers.client(add)


def _add_texts(
    store: Store,
    builder: Builder | None,
    conn: Hashable,
    items: list[tuple[str, str, list[str]]],
    required: list[str],
) -> dict[str, list[str]]:
    """`{"paths": [...]}` in the order of `items`, or `{"not_valid": [...]}`, naming the
    required paths that are not valid, with nothing added.  Each path is computed first
    (`Store.text_path`: most were sent before) and all are pinned, then one query finds those
    already valid: an evaluation adds mostly what it added before, and those need nothing
    more."""
    paths = [store.text_path(name, text, refs) for name, text, refs in items]
    store.pins.pin(conn, [*required, *paths])
    valid = store.valid_paths([*required, *paths])
    missing = [p for p in required if p not in valid]
    if missing:
        return {"not_valid": missing}
    new = [(item, i) for i, item in enumerate(items) if paths[i] not in valid]
    if new:
        infos = store.add_texts([item for item, _ in new], pin=conn)
        for (_, i), info in zip(new, infos, strict=True):
            paths[i] = info.path
    if builder is not None:
        for path, (_, text, _) in zip(paths, items, strict=True):
            if path.endswith(".drv"):
                builder.learn(path, text)
    return {"paths": paths}


def store_dir(services: Services, args: dict[str, Any]) -> str:
    return services.store.store_dir

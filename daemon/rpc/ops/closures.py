"""`closure-info`: every path of a closure with its size and references, in one request.

`store-query --tree`, `--graph`, `--closure-size` and `store-why-depends` walk a closure's
graph.  Asked path by path, a closure of thousands of paths is thousands of requests; this
is one read of the database (`store.closureinfo`) and one stream of data back.
"""

from typing import Any

import msgpack

from daemon.rpc.context import RequestContext
from daemon.rpc.ops.args import LINES_CHUNK, strs_arg
from store.closureinfo import closure_infos
from store.store import PathInfo


def pack_closure(infos: list[PathInfo]) -> list[bytes]:
    """One msgpack array `[path, nar_size, [reference, ...]]` per path, references first;
    a reference is the index of an earlier record (or of the path's own, for a
    self-reference), which keeps the stream a fraction of the size of the paths spelled
    out.  Records are gathered into chunks of about `LINES_CHUNK` bytes."""
    index = {info.path: i for i, info in enumerate(infos)}
    chunks: list[bytes] = []
    chunk = bytearray()
    for info in infos:
        refs = sorted(index[r] for r in info.references)
        chunk += msgpack.packb([info.path, info.nar_size, refs])
        if len(chunk) >= LINES_CHUNK:
            chunks.append(bytes(chunk))
            chunk.clear()
    if chunk:
        chunks.append(bytes(chunk))
    return chunks


async def closure_info(ctx: RequestContext) -> dict[str, Any]:
    roots = strs_arg(ctx, "paths")
    store = ctx.services.store

    def packed() -> tuple[list[bytes], int, int]:
        infos = closure_infos(store.db, store.store_dir, roots)
        return pack_closure(infos), len(infos), sum(i.nar_size for i in infos)

    chunks, count, nar_size = await ctx.services.workers.client(packed)
    for chunk in chunks:
        await ctx.send_data(chunk)
    await ctx.end_data()
    return {"paths": count, "nar_size": nar_size}

"""Closures between stores: `export` streams the export format (`docs/export.md`) of a
closure, `import` takes one as an upload and adds all of it or nothing.

The format, and every check an import makes, is the store's (`store/export.py`,
`store/importer.py`); here the stream crosses to and from the client, one worker-thread
trip per piece: an export through the pool for client work (`Workers.client`), an
import through the pool for work that waits on a client's data (`read_upload`).  Whether the
stream's unverifiable metadata (outputs addressed by their derivation, derivers) is
believed is the peer's trust, as in Nix.
"""

from typing import Any

from daemon.rpc.context import RequestContext
from daemon.rpc.errors import OpError
from daemon.rpc.ops.args import strs_arg
from daemon.wire.protocol import Code
from store.export import export_stream
from store.importer import import_stream


async def export(ctx: RequestContext) -> dict[str, Any]:
    roots = strs_arg(ctx, "paths")
    if not roots:
        raise OpError(Code.BAD_REQUEST, "'paths' must name at least one store path")
    store = ctx.services.store
    stream = await ctx.services.workers.client(export_stream, store, roots, ctx.conn)
    total = 0
    try:
        while (chunk := await ctx.services.workers.client(next, stream.chunks, None)) is not None:
            await ctx.send_data(chunk)
            total += len(chunk)
    finally:
        stream.chunks.close()
    await ctx.end_data()
    return {"paths": len(stream.paths), "bytes": total}


async def import_paths(ctx: RequestContext) -> dict[str, Any]:
    store = ctx.services.store
    trusted = ctx.peer.trusted
    done = await ctx.read_upload(lambda read: import_stream(store, read, ctx.conn, trusted))
    return {"roots": done.roots, "paths": len(done.paths), "added": len(done.added)}

"""The operations the daemon serves, by name.  See docs/protocol.md for each.

A handler decodes its arguments, calls one store or service method, and encodes the result.
"""

from daemon.rpc.context import Operation, RequestContext
from daemon.rpc.ops import (
    build,
    closures,
    maintenance,
    paths,
    runtimes,
    scheduling,
    snapshots,
    transfer,
)


async def shutdown(ctx: RequestContext) -> None:
    await ctx.log("shutting down")
    ctx.server.shutdown_requested.set()


OPERATIONS: dict[str, Operation] = {
    "path-info": Operation(query=paths.path_info, many=paths.path_infos),
    "is-valid": Operation(query=paths.is_valid),
    "references": Operation(query=paths.references),
    "referrers": Operation(query=paths.referrers),
    "closure": Operation(paths.closure),
    "closure-info": Operation(closures.closure_info),
    "export": Operation(transfer.export),
    "import": Operation(transfer.import_paths),
    "add": Operation(paths.add),
    "add-from-path": Operation(paths.add_from_path),
    "dump": Operation(paths.dump),
    "verify": Operation(maintenance.verify),
    "gc": Operation(maintenance.collect_garbage),
    "optimise": Operation(maintenance.optimise),
    "add-temp-root": Operation(paths.add_temp_root),
    "add-root": Operation(paths.add_root),
    "store-dir": Operation(query=paths.store_dir),
    "add-text": Operation(paths.add_text),
    "add-texts": Operation(paths.add_texts),
    "build": Operation(build.build),
    "log": Operation(build.build_log),
    "shutdown": Operation(shutdown, trusted_only=True),
    **scheduling.SCHEDULING_OPERATIONS,
    **runtimes.RUNTIME_OPERATIONS,
    **snapshots.SNAPSHOT_OPERATIONS,
}

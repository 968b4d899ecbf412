"""Building derivations, and the logs builds left.

The build room's records are encoded here, once: its progress events as `log` frames of
their `kind` (docs/protocol.md), its results as the reply's maps.
"""

import dataclasses
import functools

import trio

from daemon.build.events import Built, Event, Failed, LogLine, Note, Retried, Started
from daemon.build.request import BuildOptions, Result
from daemon.remote.policy import Policy, parse_policy
from daemon.rpc.context import RequestContext
from daemon.rpc.errors import OpError
from daemon.rpc.ops.args import (
    arg_bool,
    build_options,
    keep_alive,
    opt_str_arg,
    snapshot_args,
    str_arg,
    strs_arg,
)
from daemon.rpc.ops.snapshots import snapshot_service
from daemon.wire.protocol import Code, LogKind
from store.derivation import DerivationError

_KINDS: dict[type, str] = {
    Note: LogKind.NOTE,
    Started: LogKind.STARTED,
    Built: LogKind.BUILT,
    Failed: LogKind.FAILED,
    LogLine: LogKind.LINE,
    Retried: LogKind.RETRIED,
}


async def _progress(ctx: RequestContext, event: Event) -> None:
    done = total = None
    if isinstance(event, Note | Built):
        done, total = event.done, event.total
    await ctx.log(event.message, done, total, _KINDS[type(event)], event.drv)


def _encode(result: Result) -> dict[str, object]:
    outcome = result.outcome
    encoded: dict[str, object] = {
        "drv": result.drv,
        "outputs": result.outputs,
        "status": str(outcome.state),
    }
    if outcome.message is not None:
        encoded["message"] = outcome.message
    if outcome.attempts:
        encoded["attempts"] = outcome.attempts
        encoded["flaky"] = outcome.flaky
    if outcome.identical is not None:
        encoded["identical"] = outcome.identical
    return encoded


async def _with_snapshots(ctx: RequestContext, opts: BuildOptions, drvs: list[str]) -> BuildOptions:
    """The options with the snapshot scopes in effect (the request's over weft.toml's,
    both checked) and the snapshot the build resumes from, checked against the rules
    (docs/snapshots.md); the requester owns what its builds commit."""
    on_pause, on_commit, resume_from = snapshot_args(ctx, drvs)
    service = snapshot_service(ctx)
    pause, commit = await service.effective(on_pause, on_commit)
    resume = None
    if resume_from is not None:
        resume = await service.check_resume(resume_from, drvs[0], ctx.peer.trusted)
    return dataclasses.replace(
        opts, on_pause=pause, on_commit=commit, resume_from=resume, owner=ctx.peer.uid
    )


def _remote(ctx: RequestContext) -> Policy | None:
    """The request's remote policy (`remote`: all, overflow or none), if it names one."""
    value = opt_str_arg(ctx, "remote")
    if value is None:
        return None
    try:
        return parse_policy(value, "'remote'")
    except ValueError as e:
        raise OpError(Code.BAD_REQUEST, str(e)) from None


async def build(ctx: RequestContext) -> list[dict[str, object]]:
    builder = ctx.services.builder
    if builder is None:
        raise OpError(Code.BAD_REQUEST, "this daemon does not build")
    drvs = strs_arg(ctx, "drvs")
    for d in drvs:
        ctx.services.store.parse(d)
    opts = await _with_snapshots(ctx, build_options(ctx, builder.max_jobs), drvs)
    opts = dataclasses.replace(opts, remote=_remote(ctx))
    try:
        results = await builder.build(drvs, opts, functools.partial(_progress, ctx))
    except DerivationError as e:
        raise OpError(Code.BAD_REQUEST, str(e)) from None
    await keep_alive(
        ctx,
        [p for r in results if r.outcome.state.succeeded for p in r.outputs.values()],
    )
    return [_encode(r) for r in results]


async def build_log(ctx: RequestContext) -> dict[str, int]:
    """Stream the log of a derivation, or of the derivation that built an output: of its
    build running now, what it wrote so far (and with `follow`, what it writes until it
    ends); else the stored log of its last build."""
    path = str_arg(ctx, "path")
    follow = arg_bool(ctx.args, "follow")
    drv = await trio.to_thread.run_sync(ctx.services.store.resolve_deriver, path)
    if drv is None:
        raise OpError(Code.NOT_VALID, f"{path} is not a derivation or a built output")
    builder = ctx.services.builder
    if builder is None:
        raise OpError(Code.BAD_REQUEST, "this daemon does not build")
    try:
        size = await builder.send_log(drv, ctx.send_data, follow)
    except FileNotFoundError:
        raise OpError(
            Code.NOT_VALID,
            f"no build log for {drv}: it is not building, and no log of it is stored",
        ) from None
    await ctx.end_data()
    return {"size": size}

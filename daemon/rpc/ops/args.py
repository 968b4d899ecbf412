"""Decoding a request's arguments and encoding what goes back, shared by the handlers."""

from typing import Any

import trio

from daemon.build.request import BuildOptions
from daemon.rpc.context import RequestContext
from daemon.rpc.errors import OpError
from daemon.wire.protocol import Code
from store.store import PathInfo

# Long listings go as data frames of about this size: well under a data frame's limit
# (`MAX_CHUNK`, 1 MiB), and 2,000-odd store paths a frame, so a client prints as they come.
LINES_CHUNK = 256 << 10


def arg_str(args: dict[str, Any], key: str, default: str | None = None) -> str:
    value = args.get(key, default)
    if not isinstance(value, str) or not value:
        raise OpError(Code.BAD_REQUEST, f"{key!r} must be a non-empty string")
    return value


def arg_strs(args: dict[str, Any], key: str, default: list[str] | None = None) -> list[str]:
    value = args.get(key, default)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise OpError(Code.BAD_REQUEST, f"{key!r} must be a list of strings")
    return value


def str_arg(ctx: RequestContext, key: str, default: str | None = None) -> str:
    return arg_str(ctx.args, key, default)


def opt_str_arg(ctx: RequestContext, key: str) -> str | None:
    if ctx.args.get(key) is None:
        return None
    return str_arg(ctx, key)


def strs_arg(ctx: RequestContext, key: str, default: list[str] | None = None) -> list[str]:
    return arg_strs(ctx.args, key, default)


def build_options(ctx: RequestContext, default_jobs: int) -> BuildOptions:
    """A build request's options, every one checked before anything starts."""
    jobs = ctx.args.get("max_jobs") or default_jobs
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
    return BuildOptions(
        max_jobs=jobs,
        keep_going=bool(ctx.args.get("keep_going")),
        check=bool(ctx.args.get("check")),
        keep_failed_for=keep_failed,
        retries=retries,
        **limits,
    )


def encode_info(info: PathInfo) -> dict[str, Any]:
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


async def keep_alive(ctx: RequestContext, paths: list[str]) -> None:
    """Paths stay alive until the client's connection closes, as in Nix.  (Adds pin
    their path themselves, before looking it up: see `store.pins`.)"""
    await trio.to_thread.run_sync(ctx.services.store.pins.pin, ctx.conn, paths)


async def send_lines(ctx: RequestContext, lines: list[str]) -> None:
    """Long lists (every dead path, say) go as data: a reply frame has a size limit."""
    chunk: list[str] = []
    size = 0
    for line in lines:
        chunk.append(line)
        size += len(line) + 1
        if size > LINES_CHUNK:
            await ctx.send_data(("\n".join(chunk) + "\n").encode())
            chunk, size = [], 0
    if chunk:
        await ctx.send_data(("\n".join(chunk) + "\n").encode())
    await ctx.end_data()

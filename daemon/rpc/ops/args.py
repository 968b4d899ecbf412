"""Decoding a request's arguments and encoding what goes back, shared by the handlers.

Every argument is checked here, before its handler acts: its type (a bool is not a
number, nor a string a bool), finite, in range; a bad one is a `bad-request` that names
it.  A NaN timeout once got as far as a started builder that nothing then watched.
"""

import math
from typing import Any

import trio

from daemon.build.request import (
    MAX_JOBS,
    MAX_LOG_SIZE,
    MAX_RETRIES,
    MAX_TIME_LIMIT,
    BuildOptions,
)
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


def arg_bool(args: dict[str, Any], key: str) -> bool:
    """A switch: true, false, or absent (false)."""
    value = args.get(key, False)
    if value is None:
        return False
    if type(value) is not bool:
        raise OpError(Code.BAD_REQUEST, f"{key!r} must be true or false")
    return value


def arg_int(args: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    """An integer from `lo` to `hi`, or None if absent."""
    value = args.get(key)
    if value is None:
        return None
    if type(value) is not int or not lo <= value <= hi:
        raise OpError(Code.BAD_REQUEST, f"{key!r} must be an integer from {lo} to {hi}")
    return value


def arg_seconds(args: dict[str, Any], key: str, hi: float) -> float | None:
    """A finite number of seconds over 0 and at most `hi`, or None if absent."""
    value = args.get(key)
    if value is None:
        return None
    if type(value) not in (int, float) or not (math.isfinite(value) and 0 < value <= hi):
        raise OpError(
            Code.BAD_REQUEST, f"{key!r} must be a number of seconds over 0 and at most {hi:g}"
        )
    return float(value)


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
    args = ctx.args
    jobs = arg_int(args, "max_jobs", 1, MAX_JOBS)
    limits: dict[str, Any] = {}
    for key in ("timeout", "max_silent_time"):
        if (seconds := arg_seconds(args, key, MAX_TIME_LIMIT)) is not None:
            limits[key] = seconds
    if (size := arg_int(args, "max_log_size", 1, MAX_LOG_SIZE)) is not None:
        limits["max_log_size"] = size
    keep_failed = (ctx.peer.uid, ctx.peer.gid) if arg_bool(args, "keep_failed") else None
    return BuildOptions(
        max_jobs=default_jobs if jobs is None else jobs,
        keep_going=arg_bool(args, "keep_going"),
        check=arg_bool(args, "check"),
        keep_failed_for=keep_failed,
        retries=arg_int(args, "retries", 0, MAX_RETRIES),
        **limits,
    )


def snapshot_args(
    ctx: RequestContext, drvs: list[str]
) -> tuple[str | None, str | None, str | None]:
    """A build request's `on_pause`, `on_commit` (scope names, checked by the snapshot
    service) and `resume_from` (a store path, for a request naming exactly one
    derivation: a snapshot seeds one build, and which one must not be a guess)."""
    on_pause, on_commit = opt_str_arg(ctx, "on_pause"), opt_str_arg(ctx, "on_commit")
    resume_from = opt_str_arg(ctx, "resume_from")
    if resume_from is not None:
        ctx.services.store.parse(resume_from)
        if len(drvs) != 1:
            raise OpError(
                Code.BAD_REQUEST,
                f"'resume_from' seeds exactly one derivation's build; the request names "
                f"{len(drvs)}",
            )
    return on_pause, on_commit, resume_from


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

"""Runtimes: store-run's environments, the runs it registers and their lineage
(docs/protocol.md; the service is `daemon/runtime/service.py`)."""

from typing import Any

from daemon.rpc.context import Operation, RequestContext
from daemon.rpc.errors import OpError
from daemon.rpc.ops.args import arg_bool, arg_strs, str_arg
from daemon.runtime.envplan import SHOWN_ID, Env, EnvFrom, EnvRequest
from daemon.runtime.records import Summary
from daemon.runtime.service import Planned, RunRequest, Runtimes
from daemon.wire.protocol import Code

# What of each runtime's argv `runtimes` and `runtime-lineage` carry, in bytes: a table
# row's worth, so that a user's every summary fits one reply; `runtime-show` has all of it.
LISTED_ARGV = 512


def _service(ctx: RequestContext) -> Runtimes:
    runtimes = ctx.services.runtimes
    if runtimes is None:
        raise OpError(Code.BAD_REQUEST, "this daemon keeps no runtimes")
    return runtimes


async def runtime_plan(ctx: RequestContext) -> dict[str, Any]:
    planned = await _service(ctx).plan(ctx.peer.uid, _run_request(ctx.args), ctx.conn)
    return _planned(planned)


async def runtime_start(ctx: RequestContext) -> dict[str, Any]:
    request = _run_request(ctx.args, start=True)
    planned = await _service(ctx).start(ctx.peer.uid, ctx.peer.pid, request, ctx.conn)
    return _planned(planned)


async def runtimes(ctx: RequestContext) -> list[dict[str, Any]]:
    summaries = await _service(ctx).summaries(ctx.peer.uid)
    return [_summary(s, LISTED_ARGV) for s in summaries]


async def runtime_show(ctx: RequestContext) -> dict[str, Any]:
    summary, children = await _service(ctx).show(ctx.peer.uid, str_arg(ctx, "id"))
    rec = summary.record
    return _summary(summary) | {
        "cwd": rec.cwd,
        "pid": rec.pid,
        "uid": rec.uid,
        "children": children,
    }


async def runtime_lineage(ctx: RequestContext) -> list[dict[str, Any]]:
    lineage = await _service(ctx).lineage(ctx.peer.uid, str_arg(ctx, "id"))
    return [_summary(s, LISTED_ARGV) for s in lineage]


async def runtime_env(ctx: RequestContext) -> dict[str, Any]:
    pristine = arg_bool(ctx.args, "pristine")
    env = await _service(ctx).env(ctx.peer.uid, str_arg(ctx, "id"), pristine)
    return {"env": _env_out(env)}


async def runtime_forget(ctx: RequestContext) -> dict[str, Any]:
    await _service(ctx).forget(ctx.peer.uid, str_arg(ctx, "id"))
    return {}


RUNTIME_OPERATIONS: dict[str, Operation] = {
    "runtime-plan": Operation(runtime_plan),
    "runtime-start": Operation(runtime_start),
    "runtimes": Operation(runtimes),
    "runtime-show": Operation(runtime_show),
    "runtime-lineage": Operation(runtime_lineage),
    "runtime-env": Operation(runtime_env),
    "runtime-forget": Operation(runtime_forget),
}


def _run_request(args: dict[str, Any], start: bool = False) -> RunRequest:
    try:
        env_from = EnvFrom(args.get("env_from") or EnvFrom.CURRENT)
    except (ValueError, TypeError):
        modes = ", ".join(m.value for m in EnvFrom)
        raise OpError(Code.BAD_REQUEST, f"'env_from' must be one of {modes}") from None
    parent = args.get("parent")
    if parent is not None and not isinstance(parent, str):
        raise OpError(Code.BAD_REQUEST, "'parent' must be a string or nil")
    env = EnvRequest(
        caller=_env_arg(args, "env"),
        env_from=env_from,
        pure=arg_bool(args, "pure"),
        keep=tuple(arg_strs(args, "keep", [])),
        unset=tuple(arg_strs(args, "unset", [])),
    )
    return RunRequest(
        profiles=tuple(arg_strs(args, "profiles", [])),
        env=env,
        # An empty WEFT_RUNTIME is none; a longer one than an id is garbage, dangling
        # whatever it says, and recorded clipped.
        parent=parent[:SHOWN_ID] if parent else None,
        argv=_bytes_list(args, "argv"),
        cwd=_bytes_arg(args, "cwd"),
        durable=start and arg_bool(args, "durable"),
        name=_opt_str(args, "name") if start else None,
    )


def _opt_str(args: dict[str, Any], key: str) -> str | None:
    value = args.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise OpError(Code.BAD_REQUEST, f"{key!r} must be a non-empty string or nil")
    return value


def _env_arg(args: dict[str, Any], key: str) -> Env:
    value = args.get(key, [])
    if not isinstance(value, list) or not all(
        isinstance(pair, list)
        and len(pair) == 2
        and isinstance(pair[0], bytes)
        and isinstance(pair[1], bytes)
        for pair in value
    ):
        raise OpError(Code.BAD_REQUEST, f"{key!r} must be a list of [name, value] byte strings")
    return tuple((name, val) for name, val in value)


def _bytes_list(args: dict[str, Any], key: str) -> tuple[bytes, ...]:
    value = args.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
        raise OpError(Code.BAD_REQUEST, f"{key!r} must be a list of byte strings")
    return tuple(value)


def _bytes_arg(args: dict[str, Any], key: str) -> bytes:
    value = args.get(key, b"")
    if not isinstance(value, bytes):
        raise OpError(Code.BAD_REQUEST, f"{key!r} must be a byte string")
    return value


def _planned(planned: Planned) -> dict[str, Any]:
    return {
        "id": planned.id,
        "env": _env_out(planned.plan.env),
        "changes": [{k: _text(v) for k, v in c.as_dict().items()} for c in planned.plan.changes],
        "parent": planned.parent,
        "parent_status": str(planned.parent_status),
    }


def _summary(summary: Summary, argv_bytes: int | None = None) -> dict[str, Any]:
    rec = summary.record
    return {
        "id": rec.id,
        "name": rec.name,
        "parent": rec.parent,
        "parent_status": str(summary.parent_status),
        "started": rec.started,
        "ended": rec.ended,
        "alive": rec.alive,
        "durable": rec.durable,
        "profiles": list(rec.profiles),
        "argv": list(rec.argv) if argv_bytes is None else _clipped(rec.argv, argv_bytes),
    }


def _clipped(argv: tuple[bytes, ...], limit: int) -> list[bytes]:
    out: list[bytes] = []
    for arg in argv:
        if limit <= 0:
            break
        out.append(arg[:limit])
        limit -= len(arg) + 1
    return out


def _env_out(env: Env) -> list[list[bytes]]:
    return [[name, value] for name, value in env]


def _text(value: str | None) -> str | None:
    """A change's value as msgpack can carry it: one decoded from bytes that are not
    UTF-8 (surrogate escapes) shows those bytes as U+FFFD; the env itself has them all."""
    if value is None:
        return None
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")

"""Frames as msgpack maps: each event's map, and the event a received map stands for,
checked field by field.  The protocol core (`protocol.py`) frames, orders and counts them;
this is only the vocabulary's spelling, kept apart so that the core stays readable."""

from collections.abc import Callable
from typing import Any

from daemon.wire.messages import (
    BadRequest,
    Credit,
    Data,
    End,
    Error,
    Event,
    Hello,
    Log,
    ProtocolError,
    Reply,
    Request,
    Welcome,
)

# Request ids, and other integers of the protocol, fit in a signed 64-bit integer.
MAX_ID = (1 << 63) - 1


def _log_message(event: Log) -> dict[str, object]:
    msg: dict[str, object] = {"t": "log", "id": event.id, "msg": event.message}
    if event.done is not None:
        msg["done"] = event.done
    if event.total is not None:
        msg["total"] = event.total
    if event.kind is not None:
        msg["kind"] = event.kind
    if event.drv is not None:
        msg["drv"] = event.drv
    return msg


# Each frame's map, by the event's type: one lookup, where a chain of isinstance tests
# cost a reply more than its encoding.
_MESSAGES: dict[type, Callable[[Any], dict[str, object]]] = {
    Reply: lambda e: {"t": "ok", "id": e.id, "result": e.result},
    Request: lambda e: {"t": "req", "id": e.id, "op": e.op, "args": e.args},
    Error: lambda e: {
        "t": "err",
        "id": e.id,
        "code": e.code,
        "message": e.message,
        "details": e.details,
    },
    Log: _log_message,
    Data: lambda e: {"t": "data", "id": e.id, "data": e.data},
    End: lambda e: {"t": "end", "id": e.id},
    Credit: lambda e: {"t": "credit", "id": e.id, "n": e.amount},
    Hello: lambda e: {"t": "hello", "versions": list(e.versions), "agent": e.agent},
    Welcome: lambda e: {"t": "welcome", "version": e.version, "agent": e.agent},
}


def to_message(event: Event) -> dict[str, object]:
    to_message = _MESSAGES.get(type(event))
    if to_message is None:
        raise TypeError(f"cannot send {event!r}")
    return to_message(event)


def _int(msg: dict[str, object], key: str, lo: int = 0, hi: int = MAX_ID) -> int:
    value = msg.get(key)
    if type(value) is not int or not lo <= value <= hi:
        raise ProtocolError(f"{msg.get('t')!r} frame: field {key!r} must be an integer")
    return value


def _str(msg: dict[str, object], key: str) -> str:
    value = msg.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"{msg.get('t')!r} frame: field {key!r} must be a string")
    return value


def from_message(msg: object) -> Event:
    if not isinstance(msg, dict):
        raise ProtocolError("frame is not a map")
    t = msg.get("t")
    if t == "req":
        rid = msg.get("id")
        if type(rid) is not int or not 0 <= rid <= MAX_ID:
            rid = _int(msg, "id")  # which raises, saying why
        op, args = msg.get("op"), msg.get("args", {})
        if not isinstance(op, str) or not op:
            return BadRequest(rid, "request has no op")
        if type(args) is not dict:
            return BadRequest(rid, "request args must be a map with string keys")
        for key in args:  # a loop: `all()` over a generator cost more than the decoding
            if type(key) is not str:
                return BadRequest(rid, "request args must be a map with string keys")
        return Request(rid, op, args)
    if t == "data":
        data = msg.get("data")
        if not isinstance(data, bytes):
            raise ProtocolError("data frame without bytes")
        return Data(_int(msg, "id"), data)
    if t == "credit":
        return Credit(_int(msg, "id"), _int(msg, "n", 1, 1 << 40))
    if t == "end":
        return End(_int(msg, "id"))
    if t == "ok":
        return Reply(_int(msg, "id"), msg.get("result"))
    if t == "err":
        rid = msg.get("id")
        if rid is not None:
            rid = _int(msg, "id")
        details = msg.get("details") or {}
        return Error(
            rid,
            _str(msg, "code"),
            _str(msg, "message"),
            details if isinstance(details, dict) else {},
        )
    if t == "log":
        done, total, kind, drv = (msg.get(k) for k in ("done", "total", "kind", "drv"))
        return Log(
            _int(msg, "id"),
            _str(msg, "msg"),
            done if type(done) is int else None,
            total if type(total) is int else None,
            kind if isinstance(kind, str) else None,
            drv if isinstance(drv, str) else None,
        )
    if t == "hello":
        versions = msg.get("versions")
        if not isinstance(versions, list) or not all(type(v) is int for v in versions):
            raise ProtocolError("hello: versions must be a list of integers")
        return Hello(tuple(versions), str(msg.get("agent", "")))
    if t == "welcome":
        return Welcome(_int(msg, "version"), str(msg.get("agent", "")))
    raise ProtocolError(f"unknown frame type {t!r}")

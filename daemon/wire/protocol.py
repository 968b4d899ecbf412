"""The weft wire protocol, as a state machine that does no I/O (in the style of h11).

Feed it the bytes that arrived with `receive_data`, take events out with `next_event`,
and turn events to send into bytes with `send`.  The trio server, the trio client and
the blocking client all drive this one core, so framing, the handshake, request ids and
flow control are checked in one place.  See docs/protocol.md.

A frame is a 4-byte big-endian length and a msgpack map.  The length is checked against
the maximum before any of the body is buffered.
"""

import struct
from collections.abc import Callable
from typing import Any

import msgpack

from daemon.wire.messages import (
    VERSIONS,
    BadRequest,
    Code,
    Credit,
    Data,
    End,
    Error,
    Event,
    Hello,
    Log,
    LogKind,
    ProtocolError,
    Reply,
    Request,
    Role,
    Welcome,
)

__all__ = [
    "CLOSED_STREAMS",
    "DEFAULT_WINDOW",
    "KEPT_MESSAGE",
    "MAX_CHUNK",
    "MAX_FRAME",
    "VERSIONS",
    "BadRequest",
    "Code",
    "Connection",
    "Credit",
    "Data",
    "End",
    "Error",
    "Event",
    "FrameTooLarge",
    "Hello",
    "Log",
    "LogKind",
    "ProtocolError",
    "Reply",
    "Request",
    "Role",
    "Welcome",
    "encode_frame",
    "within_frame",
]
# The largest frame: four data chunks' worth, so that any reply or request that is not
# content (which moves in chunks) fits with room to spare, and a receiver's buffer is
# bounded before it reads a body.
MAX_FRAME = 4 << 20
# Data frames carry at most this much, so a data frame always fits in a frame.
MAX_CHUNK = 1 << 20
# What a receiver grants a stream up front: with 1 MiB chunks, four in flight.
DEFAULT_WINDOW = 4 << 20
# Finished streams remembered, so that late data or credit for them is dropped rather than
# taken for a protocol error: four times the requests a connection may have running
# (`MAX_IN_FLIGHT`, 1,024); past that, the older half is forgotten.
CLOSED_STREAMS = 4096
# What is kept of a message that made its frame too large (a log line, an error's text):
# far below `MAX_FRAME`, so the frame that carries it fits whatever else it holds (a
# `drv` path, an error's code), and still more than a person reads.
KEPT_MESSAGE = 64 << 10
_LEN = struct.Struct(">I")
# Request ids, and other integers of the protocol, fit in a signed 64-bit integer.
_MAX_ID = (1 << 63) - 1


class FrameTooLarge(ValueError):
    """An event whose frame would exceed `MAX_FRAME`; `size` is its body's length."""

    def __init__(self, size: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the maximum of {MAX_FRAME}")
        self.size = size


def encode_frame(message: dict[str, object]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise FrameTooLarge(len(body))
    return _LEN.pack(len(body)) + body


def within_frame(event: Event, size: int) -> Event | None:
    """What a server sends in place of `event`, whose frame of `size` bytes is too large:
    a reply becomes a `too-large` error, so the request still gets its one final answer;
    an error or a log line keeps the start of its message.  None: nothing can stand in."""
    if isinstance(event, Reply):
        return Error(
            event.id,
            Code.TOO_LARGE,
            f"the reply is {size} bytes, over the protocol's maximum frame of {MAX_FRAME}",
            {"size": size, "max": MAX_FRAME},
        )
    if isinstance(event, Error):
        return Error(event.id, event.code, _cut(event.message, size))
    if isinstance(event, Log):
        return Log(
            event.id,
            _cut(event.message, size),
            event.done,
            event.total,
            event.kind,
            event.drv if event.drv is None or len(event.drv) <= KEPT_MESSAGE else None,
        )
    return None


def _cut(message: str, size: int) -> str:
    return f"{message[:KEPT_MESSAGE]}... (cut: its frame was {size} bytes)"


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


def _to_message(event: Event) -> dict[str, object]:
    to_message = _MESSAGES.get(type(event))
    if to_message is None:
        raise TypeError(f"cannot send {event!r}")
    return to_message(event)


def _int(msg: dict[str, object], key: str, lo: int = 0, hi: int = _MAX_ID) -> int:
    value = msg.get(key)
    if type(value) is not int or not lo <= value <= hi:
        raise ProtocolError(f"{msg.get('t')!r} frame: field {key!r} must be an integer")
    return value


def _str(msg: dict[str, object], key: str) -> str:
    value = msg.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"{msg.get('t')!r} frame: field {key!r} must be a string")
    return value


def _from_message(msg: object) -> Event:
    if not isinstance(msg, dict):
        raise ProtocolError("frame is not a map")
    t = msg.get("t")
    if t == "req":
        rid = msg.get("id")
        if type(rid) is not int or not 0 <= rid <= _MAX_ID:
            rid = _int(msg, "id")  # which raises, saying why
        op, args = msg.get("op"), msg.get("args", {})
        if not isinstance(op, str) or not op:
            return BadRequest(rid, "request has no op")
        if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
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


class Connection:
    """One side of one connection: framing, handshake, and per-stream flow control."""

    def __init__(self, role: Role, max_frame: int = MAX_FRAME) -> None:
        self.role = role
        self.max_frame = max_frame
        self.version: int | None = None
        self._buf = bytearray()
        self._pos = 0
        self._sent_hello = False
        # Data we may still send on a stream, and data the peer may still send us.
        self._send_credit: dict[int, int] = {}
        self._recv_allowance: dict[int, int] = {}
        # Requests in flight (sent by a client, received by a server): the only streams
        # data, end and credit may name.
        self._open: set[int] = set()
        self._closed_streams: set[int] = set()

    # -- receiving --------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self._pos and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_event(self) -> Event | None:
        """The next complete event, or None until more data arrives."""
        while True:
            pos = self._pos
            if len(self._buf) - pos < 4:
                return None
            (length,) = _LEN.unpack_from(self._buf, pos)
            if length > self.max_frame:
                raise ProtocolError(
                    f"frame of {length} bytes exceeds the maximum of {self.max_frame}"
                )
            if len(self._buf) - pos < 4 + length:
                return None
            self._pos = pos + 4 + length
            # Decoded straight from the buffer: a 1 MiB data frame is copied once, not twice.
            with memoryview(self._buf) as view:
                event = self._decode(view[pos + 4 : pos + 4 + length])
            if event is not None:
                return event

    def _decode(self, body: memoryview) -> Event | None:
        try:
            msg = msgpack.unpackb(body, raw=False, strict_map_key=False)
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise ProtocolError(f"malformed msgpack in frame: {e}") from None
        return self._accept(_from_message(msg))

    def _accept(self, event: Event) -> Event | None:
        if self.version is None:
            if self.role is Role.SERVER and isinstance(event, Hello):
                return event
            if self.role is Role.CLIENT and isinstance(event, Welcome | Error):
                if isinstance(event, Welcome):
                    if event.version not in VERSIONS:
                        raise ProtocolError(f"server chose unknown version {event.version}")
                    self.version = event.version
                return event
            raise ProtocolError(f"expected the handshake, got {type(event).__name__}")
        cls = type(event)
        if cls is Request:
            self._open_stream(event.id)
        elif cls is Hello or cls is Welcome:
            raise ProtocolError("handshake repeated")
        elif isinstance(event, Credit | Data | End):
            if event.id in self._closed_streams:
                return None
            if event.id not in self._open:
                # Refused rather than remembered: state kept per stream id a peer names
                # would let it grow the other side's memory without bound.
                name = type(event).__name__.lower()
                raise ProtocolError(f"{name} for stream {event.id}, which has no request in flight")
            if isinstance(event, Credit):
                self._send_credit[event.id] = self._send_credit.get(event.id, 0) + event.amount
            elif isinstance(event, Data):
                left = self._recv_allowance.get(event.id, 0) - len(event.data)
                if left < 0:
                    raise ProtocolError(f"stream {event.id}: data sent beyond the granted credit")
                self._recv_allowance[event.id] = left
        elif isinstance(event, Reply | Error) and event.id is not None:
            self._forget(event.id)
        return event

    # -- sending ----------------------------------------------------------------------

    def send(self, event: Event) -> bytes:
        cls = type(event)
        if cls is Reply or cls is Error:
            if event.id is not None:
                self._forget(event.id)
        elif isinstance(event, Hello):
            if self.role is not Role.CLIENT or self._sent_hello:
                raise RuntimeError("only a client sends hello, once")
            self._sent_hello = True
        elif isinstance(event, Welcome):
            if self.role is not Role.SERVER or self.version is not None:
                raise RuntimeError("only a server welcomes, once")
            self.version = event.version
        elif isinstance(event, Data):
            if len(event.data) > MAX_CHUNK:
                raise ValueError(f"data chunk over {MAX_CHUNK} bytes")
            credit = self._send_credit.get(event.id, 0)
            if len(event.data) > credit:
                raise RuntimeError(f"stream {event.id}: only {credit} bytes of credit")
            self._send_credit[event.id] = credit - len(event.data)
        elif isinstance(event, Credit):
            self._recv_allowance[event.id] = self._recv_allowance.get(event.id, 0) + event.amount
        elif isinstance(event, Request):
            if event.id in self._open:
                raise RuntimeError(f"request id {event.id} is already in flight")
            self._open_stream(event.id)
        return encode_frame(_to_message(event))

    def send_credit(self, stream: int) -> int:
        """How many bytes of data may be sent on `stream` now."""
        return self._send_credit.get(stream, 0)

    def choose_version(self, hello: Hello) -> int | None:
        common = set(hello.versions) & set(VERSIONS)
        return max(common) if common else None

    def _open_stream(self, stream: int) -> None:
        if stream in self._open:
            raise ProtocolError(f"request id {stream} is already in flight")
        self._open.add(stream)
        self._closed_streams.discard(stream)

    def _forget(self, stream: int) -> None:
        """A finished request: late data or credit for it is dropped, not an error."""
        self._open.discard(stream)
        self._send_credit.pop(stream, None)
        self._recv_allowance.pop(stream, None)
        self._closed_streams.add(stream)
        if len(self._closed_streams) > CLOSED_STREAMS:
            # Ids only grow; forgetting the oldest finished streams keeps this bounded.
            for old in sorted(self._closed_streams)[: CLOSED_STREAMS // 2]:
                self._closed_streams.discard(old)

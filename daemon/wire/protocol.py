"""The weft wire protocol, as a state machine that does no I/O (in the style of h11).

Feed it the bytes that arrived with `receive_data`, take events out with `next_event`,
and turn events to send into bytes with `send`.  The trio server, the trio client and
the blocking client all drive this one core, so framing, the handshake, request ids and
flow control are checked in one place.  See docs/protocol.md.

A frame is a 4-byte big-endian length and a msgpack map (each event's, `frames.py`).  The
length is checked against the maximum before any of the body is buffered.
"""

import struct
from collections.abc import Callable

import msgpack

from daemon.wire.frames import from_message, to_message
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
    Packed,
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
    "Packed",
    "ProtocolError",
    "Reply",
    "Request",
    "Role",
    "Welcome",
    "encode_frame",
    "packed",
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
_unpackb = msgpack.unpackb
# Frames up to this size are decoded from a copy: copying a small request costs less than
# the memoryview that would spare it (a request and its reply are a few hundred bytes).
_COPIED = 4096


class FrameTooLarge(ValueError):
    """An event whose frame would exceed `MAX_FRAME`; `size` is its body's length."""

    def __init__(self, size: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the maximum of {MAX_FRAME}")
        self.size = size


def encode_frame(
    message: dict[str, object], pack: Callable[[object], bytes] | None = None
) -> bytes:
    """`message`'s frame; `pack` is a connection's own packer (making one per frame took a
    third of a small reply's encoding)."""
    body = pack(message) if pack is not None else msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise FrameTooLarge(len(body))
    return _LEN.pack(len(body)) + body


def packed(result: object) -> Packed:
    """`result`, encoded once for any number of replies."""
    return Packed(msgpack.packb(result, use_bin_type=True))


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
        # Not shared: a packer is one caller's at a time, and a connection is one owner's.
        self._pack = msgpack.Packer(use_bin_type=True).pack

    # -- receiving --------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self._pos and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_event(self) -> Event | None:
        """The next complete event, or None until more data arrives."""
        buf = self._buf
        while True:
            pos = self._pos
            if len(buf) - pos < 4:
                return None
            (length,) = _LEN.unpack_from(buf, pos)
            if length > self.max_frame:
                raise ProtocolError(
                    f"frame of {length} bytes exceeds the maximum of {self.max_frame}"
                )
            end = pos + 4 + length
            if len(buf) < end:
                return None
            self._pos = end
            try:
                if length <= _COPIED:
                    msg = _unpackb(buf[pos + 4 : end], raw=False, strict_map_key=False)
                else:
                    # Decoded straight from the buffer: a 1 MiB data frame is copied once.
                    with memoryview(buf) as view:
                        msg = _unpackb(view[pos + 4 : end], raw=False, strict_map_key=False)
            except (ValueError, TypeError, msgpack.UnpackException) as e:
                raise ProtocolError(f"malformed msgpack in frame: {e}") from None
            event = from_message(msg)
            if type(event) is Request and self.version is not None:
                # The most common frame, by far: accepted without the general way's steps.
                self._open_stream(event.id)
                return event
            if (accepted := self._accept(event)) is not None:
                return accepted

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
        if cls is Reply:
            # The most common frame, by far: encoded without the general way's steps.
            self._forget(event.id)
            result = event.result
            if type(result) is Packed:
                # "result" is the map's last key: its nil gives way to the packed value.
                body = self._pack({"t": "ok", "id": event.id, "result": None})[:-1] + result.body
            else:
                body = self._pack({"t": "ok", "id": event.id, "result": result})
            if len(body) > MAX_FRAME:
                raise FrameTooLarge(len(body))
            return _LEN.pack(len(body)) + body
        if cls is Error:
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
        return encode_frame(to_message(event), self._pack)

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
        if self._send_credit:  # most requests move no data: no stream state to drop
            self._send_credit.pop(stream, None)
        if self._recv_allowance:
            self._recv_allowance.pop(stream, None)
        self._closed_streams.add(stream)
        if len(self._closed_streams) > CLOSED_STREAMS:
            # Ids only grow; forgetting the oldest finished streams keeps this bounded.
            for old in sorted(self._closed_streams)[: CLOSED_STREAMS // 2]:
                self._closed_streams.discard(old)

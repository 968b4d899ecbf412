"""The client protocol's vocabulary: its frames as plain records, and the stable error
codes.  No I/O and no state: the state machine that frames, checks and orders them is
`protocol.py`, which re-exports all of this so that callers name one module."""

from daemon.wire.record import Record

VERSIONS = (1,)


class Code:
    """Stable error codes: scripts and clients match on these, never on messages."""

    PROTOCOL = "protocol-error"
    BAD_REQUEST = "bad-request"
    UNKNOWN_OP = "unknown-op"
    PERMISSION = "permission-denied"
    NOT_VALID = "not-valid"
    INVALID_PATH = "invalid-path"
    INVALID_ARCHIVE = "invalid-archive"
    INVALID_REFERENCE = "invalid-reference"
    HASH_MISMATCH = "hash-mismatch"
    STILL_ALIVE = "still-alive"
    UNSUPPORTED_FILE = "unsupported-file-type"
    IO = "io-error"
    SHUTTING_DOWN = "shutting-down"
    TIMED_OUT = "timed-out"
    TOO_LARGE = "too-large"
    INTERNAL = "internal-error"


class ProtocolError(Exception):
    """The peer broke the protocol; the connection cannot go on."""


class Role:
    CLIENT = "client"
    SERVER = "server"


class Hello(Record):
    __slots__ = ("versions", "agent")
    _defaults = {"versions": VERSIONS, "agent": "weft"}
    versions: tuple[int, ...]
    agent: str


class Welcome(Record):
    __slots__ = ("version", "agent")
    _defaults = {"agent": "weft"}
    version: int
    agent: str


class Request(Record):
    __slots__ = ("id", "op", "args")
    id: int
    op: str
    args: dict[str, object]

    # Every request and reply is made with these: `Record`'s general way took a fifth of
    # the protocol core's time per request.
    def __init__(self, id: int, op: str, args: dict[str, object] | None = None) -> None:
        self.id = id
        self.op = op
        self.args = {} if args is None else args


class Reply(Record):
    __slots__ = ("id", "result")
    id: int
    result: object

    def __init__(self, id: int, result: object = None) -> None:
        self.id = id
        self.result = result


class Packed(Record):
    """A reply's result already in msgpack (a kept path info, say): sent as it is, so that
    an answer given again and again is encoded once.  The receiver gets the value it
    encodes; only the sender's `Reply` ever holds one."""

    __slots__ = ("body",)
    body: bytes


class Error(Record):
    __slots__ = ("id", "code", "message", "details")
    _defaults = {"details": {}}
    id: int | None
    code: str
    message: str
    details: dict[str, object]


class LogKind:
    """What a `log` frame of a build is (docs/protocol.md); a frame without one is a note."""

    NOTE = "note"
    STARTED = "started"
    BUILT = "built"
    FAILED = "failed"
    LINE = "line"  # a builder's output
    RETRIED = "retried"


class Log(Record):
    """A line of progress or diagnostics for a request still running; `kind` (a `LogKind`)
    and `drv` (the derivation it is about) where there are."""

    __slots__ = ("id", "message", "done", "total", "kind", "drv")
    _defaults = {"done": None, "total": None, "kind": None, "drv": None}
    id: int
    message: str
    done: int | None
    total: int | None
    kind: str | None
    drv: str | None


class Data(Record):
    __slots__ = ("id", "data")
    id: int
    data: bytes


class End(Record):
    """The end of a request's data stream."""

    __slots__ = ("id",)
    id: int


class Credit(Record):
    """The receiver of a stream allows its sender `amount` more bytes of data."""

    __slots__ = ("id", "amount")
    id: int
    amount: int


class BadRequest(Record):
    """A well-framed request that cannot be served; it still has an id to answer."""

    __slots__ = ("id", "message")
    id: int
    message: str


# Every frame, as the core hands it over or takes it.
Event = Record

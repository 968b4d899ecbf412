"""The command server's wire format, shared with `client.c` (which has the same
constants): one request from the client, then fixed-size replies.

Request: `MAGIC` and the body's length (two native u32), then the body, a list of
NUL-terminated byte strings: the command's name, the working directory, the umask, the
argument count and the arguments, the environment's count and its `NAME=value` entries,
and the resource limit count and each limit's soft and hard values (-1: unlimited).  The
client's stdin, stdout and stderr ride on the request's first bytes (SCM_RIGHTS).

Replies: pairs of native i32, (kind, value): `PID` once the command runs, then `EXIT` or
`SIGNALED` when it ends; or `DECLINED` alone, after which the client runs the command
itself.  Nothing here does I/O.
"""

import enum
import resource
import struct
from dataclasses import dataclass

MAGIC = 0x31434657  # b"WFC1" read as a little-endian u32
HEAD = struct.Struct("=II")
REPLY = struct.Struct("=ii")
STREAMS = 3
# A request is the arguments and the environment, which together the kernel caps at a
# quarter of the stack limit (ARG_MAX: 2 MiB with the usual 8 MiB stack); four times the
# default leaves room for a raised stack limit and refuses a client that floods.
MAX_REQUEST = 8 << 20


# The commands never served: they exec the user's program, which belongs in the user's own
# process (its terminal's job control, its parent); install.sh does not make them clients.
DIRECT_COMMANDS = frozenset({"store-run", "store-runtime"})


class Reply(enum.IntEnum):
    PID = 1
    EXIT = 2
    SIGNALED = 3
    DECLINED = 4


class Declined(enum.IntEnum):
    """Why the server does not run a command; the client runs it itself."""

    # The server's code changed on disk: it stops, and the client starts a new one.
    STALE = 1
    # The interpreter's or the locale's variables differ from the server's own: they
    # were read when the interpreter started, and cannot be taken on by a child.
    ENVIRONMENT = 2
    # Another user or group set (the socket's directory is the user's alone; this is
    # the second check).
    CREDENTIALS = 3
    # As many commands running as the server takes at once.
    BUSY = 4
    # The working directory is gone or unreadable: the command is best run where the
    # client is, and reports that itself.
    CWD = 5
    # Not a store-* command (the client was installed under another name): run directly,
    # it fails as such a command does.
    COMMAND = 6


class BadRequest(ValueError):
    pass


@dataclass(frozen=True)
class Request:
    name: str
    cwd: bytes
    umask: int
    argv: list[bytes]
    env: dict[bytes, bytes]
    limits: list[tuple[int, int]]


def body_length(head: bytes) -> int:
    """The body's length from the request's first `HEAD.size` bytes."""
    magic, length = HEAD.unpack(head)
    if magic != MAGIC:
        raise BadRequest(f"not a command request (magic {magic:#x})")
    if length > MAX_REQUEST:
        raise BadRequest(f"a request of {length} bytes (at most {MAX_REQUEST})")
    return length


def parse(body: bytes) -> Request:
    if not body.endswith(b"\0"):
        raise BadRequest("the request's last field is not terminated")
    fields = iter(body[:-1].split(b"\0"))
    try:
        name = next(fields).decode()
        cwd = next(fields)
        umask = _number(next(fields))
        argv = [next(fields) for _ in range(_number(next(fields)))]
        env = dict(_entry(next(fields)) for _ in range(_number(next(fields))))
        limits = [
            (_limit(next(fields)), _limit(next(fields))) for _ in range(_number(next(fields)))
        ]
    except StopIteration:
        raise BadRequest("the request ends before its last field") from None
    except UnicodeDecodeError:
        raise BadRequest("the command's name is not UTF-8") from None
    if next(fields, None) is not None:
        raise BadRequest("fields after the request's last")
    return Request(name, cwd, umask, argv, env, limits)


def _number(field: bytes) -> int:
    if not field.isdigit() or len(field) > 18:
        raise BadRequest(f"not a count: {field[:40]!r}")
    return int(field)


def _limit(field: bytes) -> int:
    if field == b"-1":
        return resource.RLIM_INFINITY
    return _number(field)


def _entry(field: bytes) -> tuple[bytes, bytes]:
    name, eq, value = field.partition(b"=")
    if not eq or not name:
        raise BadRequest(f"not an environment entry: {field[:40]!r}")
    return name, value


def reply(kind: Reply, value: int = 0) -> bytes:
    return REPLY.pack(kind, value)

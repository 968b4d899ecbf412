"""The locker's protocol: what the daemon (`daemon/proc/locks.py`) and the locker
(`locker/server.py`) say to each other, written once for both ends.

Each message is one packet (`daemon.wire.packets`): a msgpack map with the request's id,
and these fields (docs/locking.md):

    daemon -> locker  {op: lock, mode: shared|exclusive, wait, owner}  + the lock file's fd
                      {op: lock-byte, mode, wait, owner, offset}
                      {op: unlock, owner, key: [dev, ino] or [dev, ino, offset], delete}
                      {op: release-owner, owner}
                      {op: cancel, request}
    locker -> daemon  {status, key?, error?}

A lock is answered once (granted, refused, failed or cancelled) and a release-owner once
(released); unlocks and cancels are not answered (`locker/server.py` says why).  A reply's
id is that of the request it answers: -1 if the request's id could not be read, none
(nil) if the packet was cut off.
"""

import hashlib
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

from daemon.wire.packets import Fields

# What a lock is on: a lock file's inode, (st_dev, st_ino); or one byte of the byte-lock
# file, (st_dev, st_ino, offset).
Key = tuple[int, ...]
# The bytes of the byte-lock file a name may stand for: 62 bits of offset, within any
# off_t, and few enough that two names share one byte once in 2**31 builds of 2**16
# outputs each (the birthday bound).
BYTES = 1 << 62
# The locker's answer to a request it cannot read.
MALFORMED = "malformed request"
# Its answer to a lock request without its one descriptor or a mode.
LOCK_NEEDS = "lock needs one descriptor and a mode"
LOCK_BYTE_NEEDS = "lock-byte needs a mode, an offset below 2**62 and no descriptor"


class Mode(Enum):
    SHARED = "shared"
    EXCLUSIVE = "exclusive"


# The records are slotted, not frozen: a few are made and read on the path of every lock,
# and a frozen one takes twice as long to make (1.7 against 0.7 us, measured here).
@dataclass(slots=True)
class Lock:
    """Lock the file whose descriptor comes with the request; without `wait`, refused
    rather than queued."""

    owner: str
    mode: Mode
    wait: bool = True


@dataclass(slots=True)
class LockByte:
    """Lock one byte of the byte-lock file the locker was started with (`byte_of` a
    name says which); without `wait`, refused rather than queued."""

    owner: str
    mode: Mode
    offset: int
    wait: bool = True


def byte_of(name: str) -> int:
    """The byte of the byte-lock file that stands for `name` (an output's store path):
    the first 62 bits of its BLAKE2b.  Another process that locks this byte, shared or
    exclusive, with fcntl, takes part as a lock file's holder would."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BYTES


@dataclass(slots=True)
class Unlock:
    """Drop one of `owner`'s holds on `key`; with `delete`, first write Nix's deletion
    token into the file (its holder has unlinked it)."""

    owner: str
    key: Key
    delete: bool = False


@dataclass(slots=True)
class ReleaseOwner:
    """Drop everything `owner` holds and withdraw everything it waits for."""

    owner: str


@dataclass(slots=True)
class Cancel:
    """Withdraw the waiting lock request `request` (one already granted is left as is)."""

    request: int


Request = Lock | LockByte | Unlock | ReleaseOwner | Cancel


class Status(Enum):
    GRANTED = "granted"
    REFUSED = "refused"  # `wait` was false and the lock would have waited
    FAILED = "failed"  # `Reply.error` says why
    RELEASED = "released"  # a release-owner is done
    CANCELLED = "cancelled"  # a waiting lock was withdrawn


@dataclass(slots=True)
class Reply:
    status: Status
    key: Key | None = None  # the inode a lock request was for
    error: str = ""


class Malformed(ValueError):
    """A request the locker cannot serve as it stands; the message is its answer."""


def encode_request(request: Request) -> Fields:
    if isinstance(request, Lock | LockByte):
        fields: Fields = {
            "op": "lock" if isinstance(request, Lock) else "lock-byte",
            "mode": request.mode.value,
            "wait": request.wait,
            "owner": request.owner,
        }
        if isinstance(request, LockByte):
            fields["offset"] = request.offset
        return fields
    if isinstance(request, Unlock):
        return {
            "op": "unlock",
            "owner": request.owner,
            "key": list(request.key),
            "delete": request.delete,
        }
    if isinstance(request, ReleaseOwner):
        return {"op": "release-owner", "owner": request.owner}
    return {"op": "cancel", "request": request.request}


def decode_request(fields: Fields, descriptors: int) -> Request:
    """The request in a message that came with `descriptors` file descriptors; `Malformed`
    if it is none (a lock carries exactly one)."""
    op = fields.get("op")
    named = fields.get("mode")
    mode = _MODES.get(named) if isinstance(named, str) else None
    if op == "lock":
        if descriptors != 1 or mode is None:
            raise Malformed(LOCK_NEEDS)
        return Lock(_typed(fields, "owner", str), mode, _typed(fields, "wait", bool))
    if op == "lock-byte":
        offset = _typed(fields, "offset", int)
        if descriptors or mode is None or not 0 <= offset < BYTES:
            raise Malformed(LOCK_BYTE_NEEDS)
        return LockByte(_typed(fields, "owner", str), mode, offset, _typed(fields, "wait", bool))
    if op == "unlock":
        return Unlock(
            _typed(fields, "owner", str), _key(fields.get("key")), _typed(fields, "delete", bool)
        )
    if op == "release-owner":
        return ReleaseOwner(_typed(fields, "owner", str))
    if op == "cancel":
        return Cancel(_typed(fields, "request", int))
    raise Malformed(f"unknown op {op!r}")


def encode_reply(reply: Reply) -> Fields:
    fields: Fields = {"status": reply.status.value}
    if reply.key is not None:
        fields["key"] = list(reply.key)
    if reply.error:
        fields["error"] = reply.error
    return fields


def decode_reply(fields: Fields) -> Reply:
    key = fields.get("key")
    return Reply(
        _STATUSES[fields["status"]],
        None if key is None else _key(key),
        fields.get("error", ""),
    )


# Looked up by value: cheaper than calling the enum, on the path of every lock.
_MODES = {mode.value: mode for mode in Mode}
_STATUSES = {status.value: status for status in Status}


_T = TypeVar("_T")


def _typed(fields: Fields, name: str, kind: type[_T]) -> _T:
    value = fields.get(name)
    # bool is an int, but no int field here is a flag.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise Malformed(MALFORMED)
    return value


def _key(value: object) -> Key:
    if not isinstance(value, list) or len(value) not in (2, 3):
        raise Malformed(MALFORMED)
    if any(type(n) is not int for n in value):
        raise Malformed(MALFORMED)
    return tuple(value)

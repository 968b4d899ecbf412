"""Turning what went wrong into an error reply with a stable code."""

from typing import Any

from daemon.wire.protocol import Code
from store.gc import StillAlive
from store.nar import NarError, UnsupportedFileType
from store.paths import InvalidPath
from store.store import HashMismatch, InvalidReference, NotValid, StoreError


class OpError(Exception):
    """An error an operation reports to its client as is."""

    def __init__(self, code: Code, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.details = details or {}


# Most specific first: the first matching class decides the code.
_CODES: list[tuple[type[BaseException], Code]] = [
    (NotValid, Code.NOT_VALID),
    (StillAlive, Code.STILL_ALIVE),
    (InvalidReference, Code.INVALID_REFERENCE),
    (HashMismatch, Code.HASH_MISMATCH),
    (InvalidPath, Code.INVALID_PATH),
    (NarError, Code.INVALID_ARCHIVE),
    (UnsupportedFileType, Code.UNSUPPORTED_FILE),
    (StoreError, Code.BAD_REQUEST),
    (PermissionError, Code.PERMISSION),
    (OSError, Code.IO),
]


def error_for(exc: BaseException) -> tuple[Code, str, dict[str, Any]]:
    if isinstance(exc, OpError):
        return exc.code, str(exc), exc.details
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code, str(exc), {}
    return Code.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", {}

"""weft's content-addressed store: archives, store paths, the database, atomic adds."""

from store.layout import Settings, StateDir
from store.paths import InvalidPath, PathKind, StorePath, make_store_path
from store.store import (
    HashMismatch,
    InvalidReference,
    NotValid,
    PathInfo,
    Store,
    StoreError,
    VerifyReport,
)

__all__ = [
    "HashMismatch",
    "InvalidPath",
    "InvalidReference",
    "NotValid",
    "PathInfo",
    "PathKind",
    "Settings",
    "StateDir",
    "Store",
    "StoreError",
    "StorePath",
    "VerifyReport",
    "make_store_path",
]

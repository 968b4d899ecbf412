"""weft's content-addressed store: archives, store paths, the database, atomic adds.

Names are loaded on first use, so that `import store.defaults` (the command-line client
does) costs no more than that module.
"""

import importlib

_EXPORTS = {
    "StateDir": "store.layout",
    "InvalidPath": "store.paths",
    "PathKind": "store.paths",
    "StorePath": "store.paths",
    "make_store_path": "store.paths",
    "HashMismatch": "store.errors",
    "InvalidReference": "store.errors",
    "NotValid": "store.errors",
    "PathInfo": "store.records",
    "Store": "store.store",
    "StoreError": "store.errors",
    "VerifyReport": "store.records",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'store' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

"""Runtimes' GC roots: `gcroots/runtimes/<id>/<n>`, a symlink to each profile and member
of a runtime whose process lives (or that is durable), so that `store-gc` keeps them and
`--print-roots` names the runtime.

A runtime's links are made in a hidden directory and renamed into place, so a collection
sees all of them or none; the client's pins hold the paths meanwhile (`store/pins.py`).
"""

import os
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path

RUNTIME_ID_LENGTH = 16
_HEX = frozenset("0123456789abcdef")


def new_runtime_id() -> str:
    """64 random bits: never guessed, and never chosen by a client."""
    return secrets.token_hex(RUNTIME_ID_LENGTH // 2)


def is_runtime_id(name: str) -> bool:
    """An id the daemon makes: 16 lowercase hex digits, so also a safe file name."""
    return len(name) == RUNTIME_ID_LENGTH and set(name) <= _HEX


class RuntimeRoots:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def write(self, runtime_id: str, paths: Iterable[str]) -> None:
        final = self._dir(runtime_id)
        tmp = self.directory / f".{runtime_id}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        for n, path in enumerate(paths):
            os.symlink(path, tmp / str(n))
        os.rename(tmp, final)

    def remove(self, runtime_id: str) -> None:
        shutil.rmtree(self._dir(runtime_id), ignore_errors=True)

    def remove_all_but(self, keep: set[str]) -> list[str]:
        """Remove the roots of runtimes not in `keep`, and half-made ones: what a daemon
        that died between writing roots and recording their runtime, or between a
        runtime's end and its roots' removal, left.  The ids removed."""
        removed = []
        for name in os.listdir(self.directory):
            if name in keep:
                continue
            entry = self.directory / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(name)
        return removed

    def _dir(self, runtime_id: str) -> Path:
        if not is_runtime_id(runtime_id):
            raise ValueError(f"{runtime_id!r} is not a runtime id")
        return self.directory / runtime_id

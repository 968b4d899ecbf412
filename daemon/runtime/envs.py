"""Runtimes' environments at rest: rows of the records' `Envs` table, keyed by a keyed
hash of their user and their bytes.

HMAC-SHA-256, with a random key made on first use and kept 0600 beside the records:
identical environments of one user share one row, while the key (secret) and the user
(hashed in) keep anyone who reads a hash, or knows that rows are shared, from testing a
guess about another user's environment.  A row goes when no record uses it.
"""

import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

import apsw
import msgpack

from daemon.runtime.envplan import Env
from store.errors import StoreError

KEY_BYTES = 32
KEY_FILE = "key"
KEY_MODE = 0o600


class SealedEnvs:
    def __init__(self, key_path: Path) -> None:
        self._key = _key(key_path)

    def put(self, db: apsw.Connection, uid: int, env: Env) -> bytes:
        """Store `env` of user `uid` (if that user has not already): its hash."""
        data = msgpack.packb([list(pair) for pair in env], use_bin_type=True)
        digest = hmac.new(self._key, uid.to_bytes(8, "big") + data, "sha256").digest()
        db.execute("INSERT OR IGNORE INTO Envs (hash, data) VALUES (?, ?)", (digest, data))
        return digest

    def get(self, db: apsw.Connection, digest: bytes | None) -> Env:
        row = db.execute("SELECT data FROM Envs WHERE hash = ?", (digest,)).fetchone()
        if row is None:
            # A visible record's environments are kept as long as it is: this is damage,
            # and an empty environment in its place would be silently wrong.
            raise StoreError("a runtime's environment is missing from the runtimes database")
        return [(bytes(n), bytes(v)) for n, v in msgpack.unpackb(row[0], raw=False)]

    def prune(self, db: apsw.Connection, hashes: Iterable[bytes]) -> None:
        """Drop those of `hashes` no record uses any more."""
        for digest in hashes:
            db.execute(
                "DELETE FROM Envs WHERE hash = ?1 AND NOT EXISTS (SELECT 1 FROM Runtimes "
                "WHERE captured = ?1 OR applied = ?1)",
                (digest,),
            )


def _key(path: Path) -> bytes:
    """The key, made on first use (written aside and renamed into place: a crash leaves
    no short key)."""
    try:
        key = path.read_bytes()
        if len(key) == KEY_BYTES:
            return key
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(KEY_BYTES)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, KEY_MODE)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    return key

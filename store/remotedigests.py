"""Each store path's REAPI node, kept in the database beside its BLAKE3 hash.

A remote build names its inputs by SHA-256 Merkle trees (the Remote Execution API accepts
no other digest), which means hashing every file of the input closure again.  A store path
never changes while it is valid, so its node is computed once, on its first remote use,
and kept here for good: the row goes with the path (`ON DELETE CASCADE`, and the
collector's waves in `store/gc/unregister.py`).

This module only keeps the records.  Computing them, and the wire format of `tree` (a
serialized REAPI `Tree`, from which every blob of a directory is found again without
walking the path), are `remote.digests`'s: the store knows nothing of protobuf.
"""

import enum
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import apsw

from store.db import Database


class NodeKind(enum.Enum):
    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"


@dataclass(frozen=True, slots=True)
class Digest:
    """A REAPI digest: SHA-256 in lower-case hex and the size of the blob it names."""

    hash: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class RemoteNode:
    """A path as REAPI sees it.  `digest`: a file's contents, a directory's `Directory`
    message; None for a symlink.  `tree`: a directory's serialized `Tree` (root and every
    descendant `Directory`), empty otherwise."""

    kind: NodeKind
    digest: Digest | None
    is_executable: bool = False
    target: str = ""
    tree: bytes = b""


_GET = """
SELECT v.path, d.kind, d.hash, d.size, d.executable, d.target, d.tree
FROM RemoteDigests d JOIN ValidPaths v ON v.id = d.path
WHERE v.path IN (SELECT value FROM json_each(?))
"""
# A path that stopped being valid in the meantime gets no row: its id is gone.
_PUT = """
INSERT OR REPLACE INTO RemoteDigests (path, kind, hash, size, executable, target, tree)
SELECT id, ?, ?, ?, ?, ?, ? FROM ValidPaths WHERE path = ?
"""


class RemoteDigests:
    def __init__(self, db: Database) -> None:
        self.db = db

    def get(self, paths: Iterable[str]) -> dict[str, RemoteNode]:
        """The nodes known for these paths (valid ones only), in one query."""
        with self.db.connection() as conn:
            rows = conn.execute(_GET, (json.dumps(list(paths)),)).fetchall()
        return {
            path: _node(kind, h, size, x, target, tree)
            for path, kind, h, size, x, target, tree in rows
        }

    def put(self, nodes: Mapping[str, RemoteNode]) -> None:
        """Keep these nodes, in one transaction; paths no longer valid are skipped."""
        rows = [_row(path, node) for path, node in nodes.items()]

        def body(conn: apsw.Connection) -> None:
            conn.executemany(_PUT, rows)

        if rows:
            self.db.write(body)


def _node(kind: str, h: str, size: int, executable: int, target: str, tree: bytes) -> RemoteNode:
    node_kind = NodeKind(kind)
    digest = None if node_kind is NodeKind.SYMLINK else Digest(h, size)
    return RemoteNode(node_kind, digest, bool(executable), target, bytes(tree))


def _row(path: str, node: RemoteNode) -> tuple[object, ...]:
    h, size = (node.digest.hash, node.digest.size_bytes) if node.digest else ("", 0)
    return (node.kind.value, h, size, int(node.is_executable), node.target, node.tree, path)

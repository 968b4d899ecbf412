"""SHA-256 digests and Merkle trees of paths on disk, as the Remote Execution API names them.

A path becomes a node (`PathNode`): a file is its contents' digest and executable bit, a
symlink its target, a directory the digest of its canonical `Directory` message (entries
sorted by name, one list per kind), which names its children by their digests in turn.
Every blob met on the way goes into a `Blobs`: file contents as the file's path (read only
when sent), `Directory` messages as bytes.  A directory's node also keeps its whole `Tree`
(the store keeps it: `store/remotedigests.py`), from which `add_blobs_of` finds all those
blobs again without walking or hashing the path a second time.

Nothing here follows a symlink, and names and targets must be UTF-8 (REAPI's strings):
anything else is `NotRepresentable`, and the build stays local.
"""

import hashlib
import os
import re
import stat
from collections.abc import Iterable, Iterator
from typing import Protocol

from google.protobuf.message import Message

from remote.errors import DigestMismatch, NotRepresentable
from remote.wire import reapi_pb2
from store.remotedigests import Digest, NodeKind
from store.remotedigests import RemoteNode as PathNode

__all__ = [
    "MAX_DEPTH",
    "Blobs",
    "Digest",
    "DigestLike",
    "NodeKind",
    "PathNode",
    "add_blobs_of",
    "check_name",
    "checked",
    "directory_digest",
    "file_digest",
    "node_of",
    "sha256_digest",
    "to_proto",
]

# Deeper than this is no real store path (PATH_MAX allows ~2,000 one-letter levels) and
# would exhaust Python's recursion; such a path is built locally.
MAX_DEPTH = 400
# Names REAPI forbids in a Directory entry, beside any containing '/' or NUL.
_BAD_NAMES = frozenset({"", ".", ".."})
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class DigestLike(Protocol):
    """A `Digest`, or the wire's `reapi_pb2.Digest`: both have these two fields."""

    @property
    def hash(self) -> str: ...

    @property
    def size_bytes(self) -> int: ...


def sha256_digest(data: bytes) -> Digest:
    return Digest(hashlib.sha256(data).hexdigest(), len(data))


def to_proto(digest: DigestLike) -> reapi_pb2.Digest:
    return reapi_pb2.Digest(hash=digest.hash, size_bytes=digest.size_bytes)


def checked(digest: DigestLike) -> Digest:
    """`digest` as a `Digest`, if it is a SHA-256 digest at all (a server's digests are
    checked before they name a file or size a read); DigestMismatch otherwise."""
    if not _SHA256_HEX.fullmatch(digest.hash) or digest.size_bytes < 0:
        raise DigestMismatch(f"not a SHA-256 digest: {digest.hash!r}/{digest.size_bytes}")
    return Digest(digest.hash, digest.size_bytes)


def check_name(name: str) -> str:
    """`name` if it may name a directory entry; NotRepresentable otherwise."""
    if name in _BAD_NAMES or "/" in name or "\0" in name:
        raise NotRepresentable(f"not a file name: {name!r}")
    try:
        name.encode()
    except UnicodeEncodeError:  # a name decoded from bytes with surrogate escapes
        raise NotRepresentable(f"a name that is not UTF-8: {name!r}") from None
    return name


def serialize(message: Message) -> bytes:
    """The canonical bytes of a message: the ones its digest is taken of."""
    return message.SerializeToString(deterministic=True)


def directory_digest(directory: reapi_pb2.Directory) -> Digest:
    return sha256_digest(serialize(directory))


def file_digest(path: str | bytes) -> Digest:
    """The digest of a regular file's contents, read in chunks (never followed if a
    symlink); the size is what was read."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        hasher = hashlib.file_digest(f, "sha256")
        size = f.tell()
    return Digest(hasher.hexdigest(), size)


class Blobs:
    """Blobs to upload, by digest: bytes kept here, or the path of a file holding them."""

    def __init__(self) -> None:
        self._items: dict[Digest, bytes | str] = {}

    def add_bytes(self, data: bytes) -> Digest:
        digest = sha256_digest(data)
        self._items.setdefault(digest, data)
        return digest

    def add_message(self, message: Message) -> Digest:
        return self.add_bytes(serialize(message))

    def add_file(self, path: str, digest: Digest) -> None:
        self._items.setdefault(digest, path)

    def update(self, other: "Blobs") -> None:
        for digest, source in other._items.items():
            self._items.setdefault(digest, source)

    def source(self, digest: DigestLike) -> bytes | str:
        """The blob's bytes, or the path of the file that holds them."""
        return self._items[Digest(digest.hash, digest.size_bytes)]

    def digests(self) -> list[Digest]:
        return list(self._items)

    def total_bytes(self) -> int:
        return sum(d.size_bytes for d in self._items)

    def __contains__(self, digest: object) -> bool:
        return digest in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Digest]:
        return iter(self._items)


def node_of(path: str, blobs: Blobs | None = None) -> PathNode:
    """The node of the file, directory or symlink at `path`, every blob of it added to
    `blobs`.  NotRepresentable for a name or target that is not UTF-8, a special file, or a
    tree deeper than MAX_DEPTH."""
    blobs = Blobs() if blobs is None else blobs
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return PathNode(NodeKind.SYMLINK, None, target=_target(os.fsencode(path)))
    if stat.S_ISREG(st.st_mode):
        digest = file_digest(path)
        blobs.add_file(path, digest)
        return PathNode(NodeKind.FILE, digest, is_executable=_executable(st.st_mode))
    if not stat.S_ISDIR(st.st_mode):
        raise NotRepresentable(f"{path}: neither a file, a directory nor a symlink")
    children: dict[Digest, reapi_pb2.Directory] = {}
    root = _directory(os.fsencode(path), blobs, children, 0)
    tree = reapi_pb2.Tree(root=root, children=list(children.values()))
    return PathNode(NodeKind.DIRECTORY, blobs.add_message(root), tree=serialize(tree))


def _directory(
    path: bytes, blobs: Blobs, children: dict[Digest, reapi_pb2.Directory], depth: int
) -> reapi_pb2.Directory:
    """The canonical Directory of `path`; each subdirectory's message added to `children`
    (once per digest) and to `blobs`."""
    if depth > MAX_DEPTH:
        raise NotRepresentable(f"{os.fsdecode(path)}: deeper than {MAX_DEPTH} levels")
    directory = reapi_pb2.Directory()
    with os.scandir(path) as entries:
        listed = sorted((e.name, e) for e in entries)
    for raw, entry in listed:
        name = _utf8(raw, path)
        full = os.path.join(path, raw)
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            directory.symlinks.add(name=name, target=_target(full))
        elif stat.S_ISREG(st.st_mode):
            digest = file_digest(full)
            blobs.add_file(os.fsdecode(full), digest)
            directory.files.add(
                name=name, digest=to_proto(digest), is_executable=_executable(st.st_mode)
            )
        elif stat.S_ISDIR(st.st_mode):
            child = _directory(full, blobs, children, depth + 1)
            digest = blobs.add_message(child)
            children.setdefault(digest, child)
            directory.directories.add(name=name, digest=to_proto(digest))
        else:
            raise NotRepresentable(f"{os.fsdecode(full)}: a special file")
    return directory


def add_blobs_of(path: str, node: PathNode, blobs: Blobs) -> None:
    """Add the blobs of a path whose node is known (from the store's table) to `blobs`,
    without reading its files: file contents by their paths, Directory messages from the
    node's Tree.  DigestMismatch if the Tree does not hold what its root names."""
    if node.kind is NodeKind.FILE and node.digest is not None:
        blobs.add_file(path, node.digest)
        return
    if node.kind is not NodeKind.DIRECTORY or node.digest is None:
        return
    tree = reapi_pb2.Tree.FromString(node.tree)
    index = {blobs.add_message(child): child for child in tree.children}
    if blobs.add_message(tree.root) != node.digest:
        raise DigestMismatch(f"{path}: its kept Tree does not match its digest")
    for relative, digest in files_of(tree.root, index):
        blobs.add_file(os.path.join(path, relative), digest)


def files_of(
    root: reapi_pb2.Directory, index: dict[Digest, reapi_pb2.Directory]
) -> Iterable[tuple[str, Digest]]:
    """(relative path, digest) of every file under `root`, its subdirectories found in
    `index` by digest."""
    stack: list[tuple[str, reapi_pb2.Directory]] = [("", root)]
    while stack:
        prefix, directory = stack.pop()
        for f in directory.files:
            yield prefix + f.name, checked(f.digest)
        for d in directory.directories:
            child = index.get(checked(d.digest))
            if child is None:
                raise DigestMismatch(f"directory {prefix + d.name!r} missing from its Tree")
            stack.append((f"{prefix}{d.name}/", child))


def _executable(mode: int) -> bool:
    return bool(mode & stat.S_IXUSR)


def _target(path: bytes) -> str:
    return _utf8(os.readlink(path), path, "symlink target")


def _utf8(raw: bytes, where: bytes, what: str = "name") -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise NotRepresentable(f"{os.fsdecode(where)}: a {what} that is not UTF-8") from None

"""The input root of a remote build: the input closure laid out at its store paths.

The daemon and the worker agree on this layout (the contract of issue 23), so that the
worker can register every path and build the `.drv` with nothing else:

    <store dir's components>/      e.g. tmp/x/state/store/ for /tmp/x/state/store
        <base name of each closure path>
    build/                         empty: the Command's working directory
    weft-derivation                a file: the `.drv`'s store path (absolute, no newline)

`input_root` builds it (the daemon's side); `read_input_root` takes it apart again (the
worker's side), checking every name.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass

from remote.digests import (
    Blobs,
    Digest,
    NodeKind,
    PathNode,
    check_name,
    checked,
    directory_digest,
    sha256_digest,
    to_proto,
)
from remote.errors import DigestMismatch, NotRepresentable
from remote.wire import reapi_pb2

BUILD_DIR = "build"
DERIVATION_FILE = "weft-derivation"
# A .drv's store path is short; more is no input root of ours.
MAX_DERIVATION_BYTES = 4096


def store_components(store_dir: str) -> list[str]:
    """The store dir's components (it must be absolute and normalised), each a valid
    REAPI name that cannot collide with the root's own entries."""
    if not store_dir.startswith("/") or os.path.normpath(store_dir) != store_dir:
        raise NotRepresentable(f"store dir {store_dir!r} is not an absolute, normal path")
    parts = [check_name(p) for p in store_dir.split("/")[1:]]
    if not parts or parts[0] in (BUILD_DIR, DERIVATION_FILE):
        raise NotRepresentable(f"store dir {store_dir!r} collides with the input root's layout")
    return parts


def input_root(
    store_dir: str, nodes: Mapping[str, PathNode], drv_path: str, blobs: Blobs
) -> Digest:
    """The digest of the input root holding `nodes` (store path -> node) at their store
    paths; its Directory messages and the `weft-derivation` file added to `blobs` (the
    nodes' own blobs are the caller's: `node_of` / `add_blobs_of`)."""
    components = store_components(store_dir)
    check_name(os.path.basename(drv_path))
    store = reapi_pb2.Directory()
    for path in sorted(nodes, key=lambda p: os.fsencode(os.path.basename(p))):
        if os.path.dirname(path) != store_dir:
            raise NotRepresentable(f"{path} is not in the store {store_dir}")
        _add_entry(store, check_name(os.path.basename(path)), nodes[path])
    digest = blobs.add_message(store)
    for name in reversed(components[1:]):
        wrapper = reapi_pb2.Directory()
        wrapper.directories.add(name=name, digest=to_proto(digest))
        digest = blobs.add_message(wrapper)
    build = blobs.add_message(reapi_pb2.Directory())
    root = reapi_pb2.Directory()
    root.files.add(name=DERIVATION_FILE, digest=to_proto(blobs.add_bytes(drv_path.encode())))
    for name, child in sorted([(BUILD_DIR, build), (components[0], digest)]):
        root.directories.add(name=name, digest=to_proto(child))
    return blobs.add_message(root)


def _add_entry(directory: reapi_pb2.Directory, name: str, node: PathNode) -> None:
    if node.kind is NodeKind.SYMLINK:
        directory.symlinks.add(name=name, target=node.target)
    elif node.digest is None:
        raise ValueError(f"{name}: a {node.kind.value} node without a digest")
    elif node.kind is NodeKind.FILE:
        directory.files.add(
            name=name, digest=to_proto(node.digest), is_executable=node.is_executable
        )
    else:
        directory.directories.add(name=name, digest=to_proto(node.digest))


@dataclass(frozen=True)
class InputRoot:
    """An input root taken apart: the `.drv` to build and the closure's nodes by store path
    (a directory's node has no `tree`: its Directories are in `directories`)."""

    drv_path: str
    paths: dict[str, PathNode]
    directories: dict[Digest, reapi_pb2.Directory]


def read_input_root(
    directories: Mapping[Digest, reapi_pb2.Directory], root: Digest, store_dir: str, drv: bytes
) -> InputRoot:
    """Take apart the input root `root` for a worker whose store is `store_dir`, given every
    Directory under it (`Cas.directories`) and the `weft-derivation` file's bytes.  Wrong
    layouts, names or digests raise DigestMismatch or NotRepresentable."""
    top = _get(directories, root, "input root")
    directory = top
    for name in store_components(store_dir):
        directory = _get(directories, _only_dir(directory, name), name)
    paths: dict[str, PathNode] = {}
    for f in directory.files:
        node = PathNode(NodeKind.FILE, checked(f.digest), is_executable=f.is_executable)
        paths[_store_path(store_dir, f.name, paths)] = node
    for d in directory.directories:
        node = PathNode(NodeKind.DIRECTORY, checked(d.digest))
        paths[_store_path(store_dir, d.name, paths)] = node
    for s in directory.symlinks:
        node = PathNode(NodeKind.SYMLINK, None, target=s.target)
        paths[_store_path(store_dir, s.name, paths)] = node
    drv_path = _derivation(top, drv)
    if drv_path not in paths:
        raise NotRepresentable(f"the input root lacks its derivation {drv_path}")
    return InputRoot(drv_path, paths, dict(directories))


def derivation_digest(directories: Mapping[Digest, reapi_pb2.Directory], root: Digest) -> Digest:
    """The digest of the input root's `weft-derivation` file (to read it before the rest)."""
    for f in _get(directories, root, "input root").files:
        if f.name == DERIVATION_FILE:
            digest = checked(f.digest)
            if digest.size_bytes > MAX_DERIVATION_BYTES:
                raise NotRepresentable(f"{DERIVATION_FILE} of {digest.size_bytes} bytes")
            return digest
    raise NotRepresentable(f"the input root has no {DERIVATION_FILE}")


def _derivation(top: reapi_pb2.Directory, drv: bytes) -> str:
    found = [f for f in top.files if f.name == DERIVATION_FILE]
    if len(found) != 1 or sha256_digest(drv) != checked(found[0].digest):
        raise DigestMismatch(f"{DERIVATION_FILE} does not match its digest")
    try:
        return drv.decode()
    except UnicodeDecodeError:
        raise NotRepresentable(f"{DERIVATION_FILE} is not UTF-8") from None


def _store_path(store_dir: str, name: str, seen: Mapping[str, PathNode]) -> str:
    path = f"{store_dir}/{check_name(name)}"
    if path in seen:
        raise NotRepresentable(f"{name!r} twice in the input root's store")
    return path


def _only_dir(directory: reapi_pb2.Directory, name: str) -> Digest:
    for d in directory.directories:
        if d.name == name:
            return checked(d.digest)
    raise NotRepresentable(f"the input root has no {name!r} where the store dir goes")


def _get(
    directories: Mapping[Digest, reapi_pb2.Directory], digest: Digest, what: str
) -> reapi_pb2.Directory:
    directory = directories.get(digest)
    if directory is None or directory_digest(directory) != digest:
        raise DigestMismatch(f"{what}: its Directory {digest.hash} is missing or wrong")
    return directory

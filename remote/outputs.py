"""An action's outputs, both ways: materialised from an ActionResult (the daemon taking a
remote build's outputs; the worker laying out its inputs), and an ActionResult made of
outputs on disk (the worker).

What comes from the engine is hostile until checked: every blob is hashed again, every
name is a plain file name (no '/', '.', '..', NUL; no name twice in a directory), entries
are only ever created new (`O_EXCL`, `mkdir`) inside directories made here, so nothing is
written through a symlink or outside the destination, whatever a symlink's target says
(targets are kept as they are: a store path may point anywhere).  Sizes and entry counts
are bounded.  Anything wrong is an `OutputError`; what was written so far is left for the
caller to remove (it works in a temporary area).
"""

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from remote.action import output_path
from remote.cas import Cas, write_new
from remote.digests import (
    MAX_DEPTH,
    Blobs,
    Digest,
    NodeKind,
    PathNode,
    check_name,
    checked,
    directory_digest,
    file_digest,
    node_of,
    sha256_digest,
    to_proto,
)
from remote.errors import BlobMissing, DigestMismatch, NotRepresentable, OutputError, RemoteError
from remote.wire import reapi_pb2

# The most an action's outputs may hold, all together: past this a server is feeding us
# without end, and the download stops before it fills the disk.
MAX_OUTPUT_BYTES = 64 << 30
# Entries (files, directories, symlinks) an action's outputs may hold: a Tree can name
# one child directory many times, and so describe more entries than it has bytes.
MAX_ENTRIES = 2_000_000
# A Tree is read into memory whole.
MAX_TREE_BYTES = 128 << 20
# A build's log read into memory: the daemon's own cap on a log (daemon/build/request.py).
MAX_LOG_BYTES = 1 << 30


@dataclass
class Budget:
    """What may still be materialised, counted down as entries are made."""

    bytes: int = MAX_OUTPUT_BYTES
    entries: int = MAX_ENTRIES

    def take(self, size: int) -> None:
        self.bytes -= size
        self.entries -= 1
        if self.bytes < 0 or self.entries < 0:
            raise OutputError("outputs larger than their bounds allow (bytes or entries)")


_Output = reapi_pb2.OutputFile | reapi_pb2.OutputDirectory | reapi_pb2.OutputSymlink


def fetch_outputs(
    cas: Cas,
    result: reapi_pb2.ActionResult,
    expect: Mapping[str, str],
    budget: Budget | None = None,
) -> None:
    """Materialise each expected output (output path, or store path, -> a destination that
    does not exist yet) from `result`; OutputError if one is missing, corrupt or unsafe."""
    budget = Budget() if budget is None else budget
    try:
        found = _outputs_by_path(result)
        for path, dest in expect.items():
            output = found.get(output_path(path))
            if output is None:
                raise OutputError(f"the result lacks the output {path}")
            _fetch_one(cas, output, dest, budget)
    except (BlobMissing, DigestMismatch, NotRepresentable) as e:
        raise OutputError(str(e)) from e


def _outputs_by_path(result: reapi_pb2.ActionResult) -> dict[str, _Output]:
    found: dict[str, _Output] = {}
    lists: Iterable[Iterable[_Output]] = (
        result.output_files,
        result.output_directories,
        result.output_symlinks,
        result.output_file_symlinks,
        result.output_directory_symlinks,
    )
    for entries in lists:
        for output in entries:
            known = found.setdefault(output.path, output)
            if known is not output and known != output:
                raise OutputError(f"the result names the output {output.path} twice")
    return found


def _fetch_one(cas: Cas, output: _Output, dest: str, budget: Budget) -> None:
    if isinstance(output, reapi_pb2.OutputSymlink):
        budget.take(0)
        _symlink(output.target, dest)
    elif isinstance(output, reapi_pb2.OutputFile):
        digest = checked(output.digest)
        budget.take(digest.size_bytes)
        if output.contents:
            if sha256_digest(output.contents) != digest:
                raise DigestMismatch(f"the inlined contents of {output.path} hash otherwise")
            write_new(dest, output.contents, output.is_executable)
        else:
            cas.read_to(digest, dest, output.is_executable)
    else:
        tree_digest = checked(output.tree_digest)
        if tree_digest.size_bytes > MAX_TREE_BYTES:
            raise OutputError(f"the Tree of {output.path} has {tree_digest.size_bytes} bytes")
        tree = _tree(cas.read(tree_digest), output.path)
        index = {directory_digest(child): child for child in tree.children}
        root = directory_digest(tree.root)
        if (
            output.HasField("root_directory_digest")
            and checked(output.root_directory_digest) != root
        ):
            raise DigestMismatch(f"the Tree of {output.path} does not have its root directory")
        index[root] = tree.root
        materialise_directory(cas, root, index, dest, budget)


def materialise(
    cas: Cas,
    node: PathNode,
    dest: str,
    directories: Mapping[Digest, reapi_pb2.Directory],
    budget: Budget | None = None,
) -> None:
    """Lay one node out at `dest` (new): a file read from the CAS, a symlink, or a directory
    whose Directories are in `directories` (e.g. from `Cas.directories`).  OutputError on
    anything wrong."""
    budget = Budget() if budget is None else budget
    try:
        if node.kind is NodeKind.SYMLINK:
            budget.take(0)
            _symlink(node.target, dest)
        elif node.digest is None:
            raise OutputError(f"{dest}: a {node.kind.value} without a digest")
        elif node.kind is NodeKind.FILE:
            budget.take(node.digest.size_bytes)
            cas.read_to(node.digest, dest, node.is_executable)
        else:
            materialise_directory(cas, node.digest, directories, dest, budget)
    except (BlobMissing, DigestMismatch, NotRepresentable) as e:
        raise OutputError(str(e)) from e


def materialise_directory(
    cas: Cas,
    root: Digest,
    directories: Mapping[Digest, reapi_pb2.Directory],
    dest: str,
    budget: Budget,
) -> None:
    """Make the tree whose root Directory is `root` at `dest`: directories and symlinks
    first, then every file's contents (small ones read in batches, each blob once)."""
    files: dict[Digest, list[tuple[str, bool]]] = {}
    stack = [(root, dest, 0)]
    while stack:
        digest, where, depth = stack.pop()
        directory = directories.get(digest)
        if directory is None:
            raise OutputError(f"{where}: its Directory {digest.hash} is missing")
        if depth > MAX_DEPTH:
            raise OutputError(f"{where}: deeper than {MAX_DEPTH} levels")
        budget.take(0)
        _check_names(directory, where)
        os.mkdir(where, 0o755)
        for s in directory.symlinks:
            budget.take(0)
            _symlink(s.target, os.path.join(where, s.name))
        for d in directory.directories:
            stack.append((checked(d.digest), os.path.join(where, d.name), depth + 1))
        for f in directory.files:
            file = checked(f.digest)
            budget.take(file.size_bytes)
            files.setdefault(file, []).append((os.path.join(where, f.name), f.is_executable))
    cas.read_files(files)


def _check_names(directory: reapi_pb2.Directory, where: str) -> None:
    names = [e.name for e in (*directory.files, *directory.directories, *directory.symlinks)]
    try:
        for name in names:
            check_name(name)
    except NotRepresentable as e:
        raise OutputError(f"{where}: {e}") from None
    if len(set(names)) != len(names):
        raise OutputError(f"{where}: a name given twice")


def _symlink(target: str, dest: str) -> None:
    if not target or "\0" in target:
        raise OutputError(f"{dest}: a symlink with no usable target")
    os.symlink(target, dest)


def _tree(data: bytes, path: str) -> reapi_pb2.Tree:
    try:
        return reapi_pb2.Tree.FromString(data)
    except Exception:
        raise OutputError(f"the Tree of {path} does not parse") from None


def read_log(cas: Cas, result: reapi_pb2.ActionResult, max_bytes: int = MAX_LOG_BYTES) -> bytes:
    """The build's log: stdout then stderr, inlined or from the CAS (checked), each at most
    `max_bytes` (OutputError beyond)."""
    parts = []
    for raw, field, digest in (
        (result.stdout_raw, "stdout_digest", result.stdout_digest),
        (result.stderr_raw, "stderr_digest", result.stderr_digest),
    ):
        if raw:
            parts.append(raw)
        elif result.HasField(field):
            if checked(digest).size_bytes > max_bytes:
                raise OutputError(f"a log of {digest.size_bytes} bytes, more than {max_bytes}")
            try:
                parts.append(cas.read(digest))
            except (BlobMissing, DigestMismatch) as e:
                raise OutputError(f"the log: {e}") from e
    return b"".join(parts)


def result_for(
    cas: Cas,
    outputs: Mapping[str, str],
    exit_code: int,
    log: bytes | str,
    worker: str,
) -> reapi_pb2.ActionResult:
    """The ActionResult of a build whose outputs (output path, or store path, -> where it is
    on disk) are present or not, with `log` (bytes, or a file's path) as its stdout; every
    blob it names uploaded if the CAS lacks it.  NotRepresentable for an output REAPI
    cannot hold."""
    blobs = Blobs()
    result = reapi_pb2.ActionResult(exit_code=exit_code)
    for path in sorted(outputs, key=output_path):
        disk = outputs[path]
        if not os.path.lexists(disk):
            continue
        node = node_of(disk, blobs)
        name = output_path(path)
        if node.kind is NodeKind.SYMLINK:
            result.output_symlinks.add(path=name, target=node.target)
        elif node.kind is NodeKind.FILE and node.digest is not None:
            result.output_files.add(
                path=name, digest=to_proto(node.digest), is_executable=node.is_executable
            )
        elif node.digest is not None:
            tree = blobs.add_bytes(node.tree)
            result.output_directories.add(
                path=name, tree_digest=to_proto(tree), root_directory_digest=to_proto(node.digest)
            )
    log_digest = blobs.add_bytes(log) if isinstance(log, bytes) else file_digest(log)
    if isinstance(log, str):
        blobs.add_file(log, log_digest)
    result.stdout_digest.CopyFrom(to_proto(log_digest))
    result.execution_metadata.worker = worker
    try:
        cas.upload(blobs)
    except DigestMismatch as e:
        raise RemoteError(f"an output changed while it was uploaded: {e}") from e
    return result

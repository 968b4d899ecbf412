"""A lease's input root made valid in the worker's private store.

The input root lays the build's input closure out at its store paths (`docs/remote.md`):
the store dir's components, then one entry per store path.  Each path is either valid in
the private store already, and then reused only when its REAPI node (kind, SHA-256 Merkle
digest, executable bit or symlink target) is the one the input root names (a mismatch
fails the lease: the same store path with other contents is a corrupt store on one side),
or it is fetched from the CAS into scratch and registered through the import of an export
stream (`store/importer.py`, `docs/export.md`): the one way into a weft store that checks
every path against its contents where contents say what the path must be.  Its references
are what a scan of its archive finds among the closure's hash parts (`store/refscan.py`),
its content address whichever of source, text or fixed output its name proves, else none
(an output addressed by its derivation: the worker owns its store, so it is trusted).

The engine is not trusted for names: every entry name is checked before it touches the
file system, and a blob is verified as it is read (`remote/cas.py`).
"""

import dataclasses
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3

from daemon.cli.blocking import BlockingClient, DaemonError, chunk_reader
from remote.cas import Cas
from remote.digests import Blobs, PathNode, checked, node_of
from remote.errors import DigestMismatch, NotRepresentable
from remote.inputs import InputRoot, derivation_digest, read_input_root
from remote.outputs import materialise
from remote.wire import reapi_pb2 as rpb
from store import nar
from store.derivation import Derivation, DerivationError
from store.drvcheck import read_drv_file
from store.export import TAG_PATH, field, header, trailer
from store.hashing import format_hash
from store.paths import HASH_PART_LEN, PathKind, make_store_path
from store.refscan import ReferenceScanner

# REAPI nodes of valid paths already compared, so a second build with the same inputs
# re-hashes nothing: a store path's contents never change while it is valid.  A closure of
# a few thousand paths fits many times over; a full cache is simply emptied.
MAX_KNOWN_NODES = 100_000
# Paths of one input root: the importer's own bound on a stream (`MAX_PATHS`).
MAX_INPUT_PATHS = 65_536
# Directories of one input root's tree, all held in memory while it is materialised: a
# closure of thousands of packages has some hundred thousand; each message is small.
MAX_DIRECTORIES = 1_000_000


class InputError(Exception):
    """The input root cannot be used: missing, malformed, or at odds with the store."""


@dataclass(frozen=True)
class Inputs:
    drv: str  # the `.drv` to build
    paths: list[str]  # the closure, every path of the input root
    imported: int  # paths that were not valid before


def _comparable(node: PathNode) -> PathNode:
    """The node without its Tree, which only one side of a comparison has."""
    return dataclasses.replace(node, tree=b"")


class Materialiser:
    """Makes input roots valid in the private store; one import at a time (two leases
    sharing a new input must not both add it)."""

    def __init__(self, cas: Cas, scratch_root: str) -> None:
        self.cas = cas
        self.scratch_root = scratch_root
        self.known: dict[str, PathNode] = {}
        self._lock = threading.Lock()

    def read(self, root_digest: rpb.Digest, store_dir: str) -> InputRoot:
        try:
            root = checked(root_digest)
            directories = self.cas.directories(root, MAX_DIRECTORIES)
            drv = self.cas.read(derivation_digest(directories, root))
            found = read_input_root(directories, root, store_dir, drv)
        except (DigestMismatch, NotRepresentable) as e:
            raise InputError(f"the input root: {e}") from None
        if len(found.paths) > MAX_INPUT_PATHS:
            raise InputError(f"the input root holds {len(found.paths)} paths")
        return found

    def prepare(self, client: BlockingClient, root_digest: rpb.Digest, store_dir: str) -> Inputs:
        found = self.read(root_digest, store_dir)
        paths = sorted(found.paths)
        # Pinned for the connection first (the collector keeps a pin's closure), so no path
        # found valid here can be collected before the build has it.
        pins = client.call_many([("add-temp-root", {"path": path}) for path in paths])
        failed = [e for e in pins if isinstance(e, Exception)]
        if failed:
            raise InputError(f"the private store refused a temporary root: {failed[0]}")
        with self._lock:
            valid = set(client.call("is-valid", paths=paths))  # type: ignore[arg-type]
            for path in sorted(valid):
                self._check_valid(path, found.paths[path])
            missing = [p for p in paths if p not in valid]
            if missing:
                self._import(client, store_dir, found, missing)
        return Inputs(found.drv_path, paths, len(missing))

    def _check_valid(self, path: str, want: PathNode) -> None:
        have = self.known.get(path)
        if have is None:
            try:
                have = _comparable(node_of(path, Blobs()))
            except NotRepresentable as e:
                raise InputError(str(e)) from None
            if len(self.known) >= MAX_KNOWN_NODES:
                self.known.clear()
            self.known[path] = have
        if have != want:
            raise InputError(
                f"{path} is valid in this worker's store with other contents than the "
                f"input root's ({have} against {want})"
            )

    def _import(
        self, client: BlockingClient, store_dir: str, found: InputRoot, missing: list[str]
    ) -> None:
        os.makedirs(self.scratch_root, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix="inputs-", dir=self.scratch_root)
        try:
            where = {}
            for path in missing:
                where[path] = os.path.join(scratch, os.path.basename(path))
                materialise(self.cas, found.paths[path], where[path], found.directories)
            metas = _describe(store_dir, sorted(found.paths), missing, where)
            _check_unproven(metas, found, where)
            try:
                client.upload("import", chunk_reader(_stream(store_dir, metas, where)))
            except DaemonError as e:
                # The importer's checks are about the paths themselves (a .drv that does
                # not check out, a content address its archive disproves): no retry helps.
                raise InputError(f"the inputs do not check out: {e.code}: {e.message}") from e
            for path in missing:
                self.known[path] = found.paths[path]
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


@dataclass
class _Meta:
    path: str
    nar_hash: str
    nar_size: int
    references: list[str]
    ca: str | None


def _describe(
    store_dir: str, closure: list[str], missing: list[str], where: dict[str, str]
) -> list[_Meta]:
    """Each new path's metadata, references first."""
    by_part = {os.path.basename(p)[:HASH_PART_LEN]: p for p in closure}
    metas: dict[str, _Meta] = {}
    for path in missing:
        scanner = ReferenceScanner(by_part)
        hasher = blake3.blake3()
        size = 0
        for chunk in nar.dump(where[path]):
            hasher.update(chunk)
            scanner.feed(chunk)
            size += len(chunk)
        refs = sorted(by_part[h] for h in scanner.result())
        if path.endswith(".drv"):
            # A `.drv`'s references are its input derivations and sources, as its name
            # says; a scan against this closure would also find the outputs its text
            # names, which the closure holds too.
            refs = _drv_references(path, where[path])
        nar_hash = format_hash(hasher.digest())
        metas[path] = _Meta(path, nar_hash, size, refs, _address(store_dir, path, nar_hash, refs))
    return _references_first(metas)


def _drv_references(path: str, where: str) -> list[str]:
    """The references the `.drv` at `path`, fetched to `where`, declares."""
    try:
        return Derivation.from_json(read_drv_file(Path(where))).references()
    except (DerivationError, OSError, ValueError) as e:
        raise InputError(f"{path}: {e}") from None


def _check_unproven(metas: list[_Meta], found: InputRoot, where: dict[str, str]) -> None:
    """A path whose name proves no content address must be an output of a derivation of
    the closure: nothing else may come in unchecked (the worker trusts the closure's
    derivations, which the importer checks, not arbitrary paths named like outputs).
    The outputs of the `.drv` to build never count: an input root that brought them would
    make its build "valid" with the engine's contents, for this lease and every later one."""
    unproven = {m.path for m in metas if m.ca is None}
    if not unproven:
        return
    for path in found.paths:
        if path.endswith(".drv") and path != found.drv_path:
            try:
                drv = Derivation.from_json(read_drv_file(Path(where.get(path, path))))
            except (DerivationError, OSError, ValueError) as e:
                raise InputError(f"{path}: {e}") from None
            unproven -= {out.path for out in drv.outputs.values()}
    if unproven:
        raise InputError(
            f"{min(unproven)} is neither content-addressed nor an output of a derivation of "
            "the input closure"
        )


def _address(store_dir: str, path: str, nar_hash: str, refs: list[str]) -> str | None:
    """The content address the path's name proves (as the importer checks it), if any."""
    name = os.path.basename(path)[HASH_PART_LEN + 1 :]
    for kind, fp_hash, ca, with_refs in (
        (PathKind.TEXT, nar_hash, f"text:{nar_hash}", refs),
        (PathKind.SOURCE, nar_hash, f"source:{nar_hash}", refs),
        (PathKind.OUTPUT, f"fixed:out:{nar_hash}", f"fixed:out:{nar_hash}", []),
    ):
        if str(make_store_path(kind, fp_hash, store_dir, name, with_refs)) == path:
            return ca
    return None


def _references_first(metas: dict[str, _Meta]) -> list[_Meta]:
    """The new paths, each after every new path it refers to (as the stream must hold
    them); depth-first without recursion, so a long chain of packages cannot overflow."""
    ordered: list[_Meta] = []
    state: dict[str, bool] = {}  # False: being visited; True: placed
    for root in sorted(metas):
        if root in state:
            continue
        state[root] = False
        stack = [(root, iter(metas[root].references))]
        while stack:
            path, refs = stack[-1]
            ref = next(
                (r for r in refs if r != path and r in metas and state.get(r) is not True), None
            )
            if ref is None:
                stack.pop()
                state[path] = True
                ordered.append(metas[path])
            elif state.get(ref) is False:
                raise InputError(f"the input closure has a reference cycle through {ref}")
            else:
                state[ref] = False
                stack.append((ref, iter(metas[ref].references)))
    return ordered


def _stream(store_dir: str, metas: list[_Meta], where: dict[str, str]) -> Iterator[bytes]:
    yield header(store_dir, [m.path for m in metas])
    for m in metas:
        doc = {
            "path": m.path,
            "nar_hash": m.nar_hash,
            "nar_size": m.nar_size,
            "references": m.references,
            "deriver": None,
            "ca": m.ca,
        }
        yield nar.encode_str(TAG_PATH) + field(doc)
        yield from nar.dump(where[m.path])
    yield trailer(len(metas))

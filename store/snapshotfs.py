"""Taking a stopped build's files into a snapshot, and putting them back for another attempt.

`capture` copies what a build wrote into a directory staged in the store's temporary area
(an entry named after this process: if it dies, the next open of the store removes it),
adds that directory to the store by moving it in, and records it (`store.snapshots`).  The
path is pinned from before it is added until its record, a GC root, has committed; so a
process killed at any moment leaves no record (and at worst a scratch entry, or a path
with no record, which is garbage), or a complete record of a valid path.

The build's directories were its builder's to fill, so the copy follows `--keep-failed`'s
rules (`daemon/build/keepfailed.py`): it walks through directory fds without following
symlinks, takes only regular files, directories and symlinks, and skips a regular file the
builder does not own (a hard link it made to someone else's file).  The store makes what
it takes canonical (root's, 0444/0555, no setuid or setgid).  The archive size is counted
as the copy goes, so an oversized build is given up on early, not after a full copy.

`restore` copies a snapshot into a build's directories, the files its builder's and
writable by it; it too never follows a symlink it finds there, since a previous builder
may have left them.  Both block: the daemon calls them in a worker thread.
"""

import errno
import json
import os
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from store.derivation import drv_name
from store.durabledirs import ROOT, Scope, check_durable_dirs
from store.errors import StoreError
from store.paths import MAX_NAME_LEN
from store.pins import PinOwner
from store.refscan import ReferenceScanner
from store.snapshotcopy import DIR_FLAGS, Merger, Stager, member, open_member
from store.snapshots import MAX_SNAPSHOT_SIZE, SnapshotRecord, SnapshotState
from store.store import Store
from store.tmparea import remove_tree

SUFFIX = "-snapshot"
MANIFEST = "snapshot.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Capture:
    """What to snapshot of a stopped build, and as whose."""

    drv: str
    attempt: int
    scope: Scope
    reason: str  # "failed", "commit" or "evicted"
    state: SnapshotState
    owner: int  # the uid the snapshot will belong to
    durable_dirs: Mapping[str, str]  # the derivation's, name -> path under /build
    build_dir: Path  # the host directory bound at /build
    tmp_dir: Path | None  # the host directory bound at /tmp (None: a tmpfs, gone)
    outputs: dict[str, Path]  # output name -> its host path (taken if it exists)
    builder_uid: int  # the builder's uid on the host: only its files are taken
    candidates: Collection[str]  # store paths a reference may name (the input closure)


class Restore(StrEnum):
    DATA = "data"  # the durable directories only
    FULL = "full"  # the build dir, /tmp and partial outputs (a full snapshot, same drv)


@dataclass(frozen=True)
class RestoreTarget:
    """Where a build about to start keeps its files on the host, and whose they are."""

    build_dir: Path
    tmp_dir: Path | None
    outputs: dict[str, Path]
    durable_dirs: Mapping[str, str]  # the TARGET derivation's declaration
    uid: int
    gid: int


def snapshot_name(drv: str) -> str:
    """`<drv name>-snapshot`, the name cut to fit a store path's."""
    return drv_name(drv)[: MAX_NAME_LEN - len(SUFFIX)] + SUFFIX


def capture(store: Store, c: Capture, limit: int = MAX_SNAPSHOT_SIZE) -> SnapshotRecord:
    """Copy, add and record a snapshot of a stopped build (see the module docstring).

    Refused with `SnapshotTooLarge` past `limit` bytes of archive; nothing is left then.
    """
    check_durable_dirs(c.durable_dirs)
    created = time.time()
    by_hash = {store.parse(p).hash_part: p for p in {*c.candidates, c.drv}}
    scanner = ReferenceScanner(by_hash)
    stager = Stager(c.builder_uid, limit, scanner, c.drv)
    staged = store.tmp.new_entry()
    owner = PinOwner(f"snapshot of {drv_name(c.drv)}")
    os.mkdir(staged, 0o700)
    try:
        top = os.open(staged, DIR_FLAGS)
        try:
            _stage(stager, top, c, created)
        finally:
            os.close(top)
        found = sorted(by_hash[h] for h in scanner.result())
        # Pinned, then checked: a reference the collector took meanwhile is none.
        store.pins.pin(owner, found)
        refs = store.valid_paths(found)
        info = store.take_path(staged, snapshot_name(c.drv), refs, pin=owner)
        record = SnapshotRecord(
            info.path,
            c.drv,
            c.attempt,
            c.scope,
            c.state,
            c.reason,
            created,
            c.owner,
            dict(c.durable_dirs),
            info.nar_size,
        )
        store.snapshots.record(record)
        return record
    finally:
        remove_tree(staged)
        store.pins.release(owner)


def _stage(stager: Stager, top: int, c: Capture, created: float) -> None:
    """The snapshot's members into the open directory `top`."""
    manifest = {
        "weft-snapshot": MANIFEST_VERSION,
        "drv": c.drv,
        "attempt": c.attempt,
        "scope": c.scope.value,
        "reason": c.reason,
        "created": created,
        "durableDirs": dict(c.durable_dirs),
    }
    build = _open_host_dir(c.build_dir)
    try:
        if c.scope is Scope.FULL:
            # The durable directories are in the build dir: not kept twice.
            if build is not None:
                stager.from_dir(build, top, b"build")
        else:
            _stage_durable(stager, top, build, c.durable_dirs)
    finally:
        if build is not None:
            os.close(build)
    if c.scope is Scope.FULL:
        _stage_outputs(stager, top, c.outputs)
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    stager.new_file(top, MANIFEST.encode(), text)
    tmp = None if c.scope is not Scope.FULL or c.tmp_dir is None else _open_host_dir(c.tmp_dir)
    if tmp is not None:
        try:
            stager.from_dir(tmp, top, b"tmp")
        finally:
            os.close(tmp)


def _stage_durable(
    stager: Stager, top: int, build: int | None, durable_dirs: Mapping[str, str]
) -> None:
    durable = stager.new_dir(top, b"durable")
    try:
        for name, path in sorted(durable_dirs.items()):
            src = None if build is None else open_member(build, _under_build(path))
            if src is not None:
                try:
                    stager.from_dir(src, durable, name.encode())
                finally:
                    os.close(src)
    finally:
        os.close(durable)


def _stage_outputs(stager: Stager, top: int, outputs: Mapping[str, Path]) -> None:
    into = stager.new_dir(top, b"outputs")
    try:
        for name, where in sorted(outputs.items()):
            _check_member(name)
            parent = _open_host_dir(where.parent)
            if parent is None:
                continue
            try:
                stager.node(parent, os.fsencode(where.name), into, name.encode())
            finally:
                os.close(parent)
    finally:
        os.close(into)


def _check_member(name: str) -> None:
    if not name or "/" in name or name in (".", ".."):
        raise StoreError(f"{name!r} cannot name a snapshot member")


def _under_build(path: str) -> list[bytes]:
    """A durable directory's path, as components below /build."""
    return [os.fsencode(p) for p in path[len(ROOT) :].split("/")]


def _open_host_dir(path: Path) -> int | None:
    """A host directory the daemon named (its last component not followed), or None."""
    try:
        return os.open(path, DIR_FLAGS)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise


def restore(
    store_dir: str, record: SnapshotRecord, target: RestoreTarget, how: Restore
) -> list[str]:
    """Copy the snapshot `record` names into `target`'s directories; what was restored
    (`build`, `tmp`, `outputs/<name>`, `durable/<name>`), in that order.

    FULL (a full snapshot only): `build/`, `tmp/` and `outputs/<name>` where the target
    keeps them.  DATA: each durable directory the target declares that the snapshot has,
    from `durable/<name>`, or a full snapshot's `build/` at the path its record declares;
    names the target does not declare are left (the caller tells which).  Onto what is
    there already, the snapshot's files win.
    """
    if how is Restore.FULL and record.scope is not Scope.FULL:
        raise StoreError(
            f"{record.path} is a {record.scope} snapshot: it holds no build dir to restore in full"
        )
    check_durable_dirs(record.durable_dirs)
    check_durable_dirs(target.durable_dirs)
    store_prefix = store_dir.rstrip("/") + "/"
    if not record.path.startswith(store_prefix) or "/" in record.path[len(store_prefix) :]:
        raise StoreError(f"{record.path} is not a path in the store {store_dir}")
    root = os.open(record.path, DIR_FLAGS)
    merger = Merger(target.uid, target.gid)
    try:
        if how is Restore.FULL:
            return _restore_full(merger, root, target)
        return _restore_data(merger, root, record, target)
    finally:
        os.close(root)


def _restore_full(merger: Merger, root: int, target: RestoreTarget) -> list[str]:
    done: list[str] = []
    for area, dest in (("build", target.build_dir), ("tmp", target.tmp_dir)):
        src = None if dest is None else open_member(root, [area.encode()])
        if src is None or dest is None:
            continue
        try:
            into = os.open(dest, DIR_FLAGS)
            try:
                merger.merge(src, into)
            finally:
                os.close(into)
        finally:
            os.close(src)
        done.append(area)
    outputs = open_member(root, [b"outputs"])
    if outputs is None:
        return done
    try:
        for name, dest in sorted(target.outputs.items()):
            _check_member(name)
            if member(outputs, name.encode()) is None:
                continue
            parent = _open_host_dir(dest.parent)
            if parent is None:
                # No store dir laid out for the output (yet): not restored, not listed.
                continue
            try:
                merger.put(outputs, name.encode(), parent, os.fsencode(dest.name))
            finally:
                os.close(parent)
            done.append(f"outputs/{name}")
    finally:
        os.close(outputs)
    return done


def _restore_data(
    merger: Merger, root: int, record: SnapshotRecord, target: RestoreTarget
) -> list[str]:
    done: list[str] = []
    build = os.open(target.build_dir, DIR_FLAGS)
    try:
        for name, path in sorted(target.durable_dirs.items()):
            src = _durable_source(root, record, name)
            if src is None:
                continue
            try:
                into = merger.make_dirs(build, _under_build(path))
                try:
                    merger.merge(src, into)
                finally:
                    os.close(into)
            finally:
                os.close(src)
            done.append(f"durable/{name}")
    finally:
        os.close(build)
    return done


def _durable_source(root: int, record: SnapshotRecord, name: str) -> int | None:
    """Where a snapshot holds the durable directory `name`: a full one in its build dir,
    at the path its own record declares; a data one in `durable/<name>`."""
    if record.scope is Scope.FULL:
        if name not in record.durable_dirs:
            return None
        return open_member(root, [b"build", *_under_build(record.durable_dirs[name])])
    return open_member(root, [b"durable", name.encode()])

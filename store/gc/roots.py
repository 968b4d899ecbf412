"""GC roots: the symlinks under `var/gcroots/`, the pins of live clients and builds, and
the records of build snapshots.

A direct root is a symlink under `var/gcroots/` (any depth) pointing into the store, or
into a file inside a store path, or a plain file there named after a store path (as in
Nix).  An indirect root is an entry of `auto/` pointing at a user's link (such as
`store-build -o result`), which points into the store: it lasts as long as the user's link.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import blake3

from store import base32
from store.errors import StoreError
from store.paths import StorePath
from store.store import Store

# An indirect root's entry is named by a hash of its link, as long as a store path's hash
# part (160 bits, 32 base-32 characters): no two links a machine will see share a name.
ROOT_NAME_BYTES = 20


@dataclass(frozen=True, slots=True)
class Root:
    source: str  # the link, or "{client pid 12 (alice)}" for a pin
    path: str


def add_indirect_root(store: Store, link: str) -> Path:
    """Make `link` an indirect root: `gcroots/auto/<hash of link>` -> `link`, put in place
    by a rename so a collection sees the old entry or the new one, never neither."""
    if not os.path.isabs(link):
        raise StoreError(f"root link {link!r} is not absolute")
    auto = store.state.gcroots_dir / "auto"
    name = base32.encode(blake3.blake3(os.fsencode(link)).digest(length=ROOT_NAME_BYTES))
    entry = auto / name
    tmp = auto / f".{name}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(link, tmp)
    os.rename(tmp, entry)
    return entry


def find_roots(store: Store) -> list[Root]:
    """The roots on disk and in memory.  Dangling `auto/` entries are removed.

    The pins are read first: whoever makes a root on disk pins its path beforehand and
    unpins only after (store-run's runtimes, `store-build -o`), so a root the walk below
    misses, made after it passed, is among the pins read before it."""
    pinned = [
        Root(f"{{{label}}}", p) for label, paths in store.pins.by_owner() for p in sorted(paths)
    ]
    # A snapshot's record is its root (store.snapshots); one being made is pinned until
    # its record has committed.
    pinned += [Root(f"{{{label}}}", p) for label, p in store.snapshots.roots()]
    roots: list[Root] = []
    gcroots = store.state.gcroots_dir
    auto = gcroots / "auto"
    for dirpath, dirnames, filenames in os.walk(gcroots):
        for name in [*dirnames, *filenames]:
            entry = os.path.join(dirpath, name)
            if not os.path.islink(entry):
                # A plain file named after a store path roots it, as in Nix.
                if os.path.isfile(entry):
                    path = _store_path_of(store, os.path.join(store.store_dir, name))
                    if path is not None:
                        roots.append(Root(entry, path))
                continue
            target = _readlink_abs(entry)
            path = _store_path_of(store, target)
            if path is not None:
                roots.append(Root(entry, path))
            elif Path(dirpath) == auto:
                _indirect(store, entry, target, roots)
    roots += pinned
    # A pin may name a path not made yet (a build's output): it roots nothing so far.
    valid = store.valid_paths({r.path for r in roots})
    return [r for r in roots if r.path in valid]


def _indirect(store: Store, entry: str, link: str, roots: list[Root]) -> None:
    if not os.path.lexists(link):
        # The user removed their link: the root is gone with it.
        Path(entry).unlink(missing_ok=True)
        return
    if os.path.islink(link):
        path = _store_path_of(store, _readlink_abs(link))
        if path is not None:
            roots.append(Root(link, path))


def _readlink_abs(link: str) -> str:
    try:
        target = os.readlink(link)
    except OSError:
        return ""
    return os.path.normpath(os.path.join(os.path.dirname(link), target))


def _store_path_of(store: Store, target: str) -> str | None:
    """The store path `target` is, or is inside of; None if it is not in the store."""
    prefix = store.store_dir + "/"
    if not target.startswith(prefix):
        return None
    base = target[len(prefix) :].split("/", 1)[0]
    try:
        StorePath.parse(prefix + base, store.store_dir)
    except ValueError:
        return None
    return prefix + base

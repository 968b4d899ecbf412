"""The bootstrap busybox of recipes (`store.recipe.busybox`): Debian's static binary as
`<path>/bin/busybox`, with a link per applet, so that `<path>/bin` can be a builder's PATH.

Making that tree copies the binary, runs it for its applets and makes a link for each
(some 270), and the store then copies and hashes it all again: a tenth of a second, half
of one on a loaded machine, in every evaluation, for a path the store almost always has.
Its store path depends only on the binary and on the tree's layout, so each user
remembers it, keyed by the store, the binary's identity (device, inode, size, modification
and change times: a binary replaced or rewritten in place gets another key) and the
layout's version.  A remembered path is only a guess: the recipe store is asked to keep it
(`reuse`), which checks that it is still valid with the evaluation's other adds, and adds
the tree again (`add`) if it was collected since.

The memory is a small JSON file in the user's cache directory (`$XDG_CACHE_HOME/weft`,
else `~/.cache/weft`), replaced whole by a rename; one that cannot be read or written
costs the tree's making, never a wrong path: a guess that is not valid is made again.
The tree itself is kept there too, one per binary (made whole in a scratch directory and
renamed into place), so that a new store costs only its add; without a usable cache it is
made in a temporary directory each time.
"""

import contextlib
import json
import os
from collections.abc import Callable

import blake3

HOST_BUSYBOX = "/bin/busybox"
# The tree's layout, in every key: a change to `_make_tree` makes every remembered path
# a stranger's.
LAYOUT = 1
# Store dirs remembered: each test's state dir is a store of its own, and a user has a
# few; the oldest is forgotten past this.
MAX_REMEMBERED = 32
CACHE_FILE = "busybox-paths.json"
# The trees kept in the cache, one per binary: `busybox-tree-<hash of its identity>`.
TREE_PREFIX = "busybox-tree-"

# `reuse(path, add)`: `path` kept for the evaluation if it is valid, else `add()`'s path.
Reuse = Callable[[str, Callable[[], str]], str]
AddSource = Callable[[str, str], str]


def busybox_path(store_dir: str, add_source: AddSource, reuse: Reuse | None) -> str:
    """The busybox tree's store path: remembered and kept when the store can `reuse`,
    else (or when nothing is remembered) added, and remembered."""
    binary = _binary()
    key = None if binary is None else f"{LAYOUT}:{binary}:{store_dir}"

    def add() -> str:
        path = add_tree(add_source, binary)
        if key is not None:
            _remember(key, path)
        return path

    known = _remembered(key) if key is not None and reuse is not None else None
    if known is None or reuse is None or not known.startswith(store_dir.rstrip("/") + "/"):
        return add()
    return reuse(known, add)


def add_tree(add_source: AddSource, binary: str | None) -> str:
    """Add the tree: the one kept in the user's cache for this binary (made there once,
    so that a new store costs only the add), else one made in a temporary directory."""
    kept = _kept_tree(binary) if binary is not None else None
    if kept is not None:
        return add_source(kept, "busybox")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _make_tree(tmp)
        return add_source(tmp, "busybox")


def _make_tree(root: str) -> None:
    import shutil

    bin_dir = os.path.join(root, "bin")
    os.makedirs(bin_dir)
    shutil.copy(HOST_BUSYBOX, os.path.join(bin_dir, "busybox"))
    for applet in _applets():
        if applet != "busybox":
            os.symlink("busybox", os.path.join(bin_dir, applet))


def _applets() -> list[str]:
    import subprocess

    out = subprocess.run([HOST_BUSYBOX, "--list"], capture_output=True, text=True, check=True)
    return sorted(set(out.stdout.split()))


def _kept_tree(binary: str) -> str | None:
    """The tree for `binary` in the user's cache, made there (by a rename, whole or not
    at all; the trees of other binaries removed) if it is not yet; None without a cache."""
    base = cache_dir()
    if base is None:
        return None
    name = TREE_PREFIX + blake3.blake3(f"{LAYOUT}:{binary}".encode()).hexdigest()[:32]
    tree = os.path.join(base, name)
    if os.path.isfile(os.path.join(tree, "bin", "busybox")):
        return tree
    import shutil
    import tempfile

    try:
        os.makedirs(base, mode=0o700, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{TREE_PREFIX}", dir=base)
    except OSError:
        return None
    try:
        _make_tree(tmp)
        os.rename(tmp, tree)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        # Another evaluation may have made it meanwhile.
        return tree if os.path.isfile(os.path.join(tree, "bin", "busybox")) else None
    for old in os.listdir(base):
        if old.startswith(TREE_PREFIX) and old != name:
            shutil.rmtree(os.path.join(base, old), ignore_errors=True)
    return tree


def _binary() -> str | None:
    """The host binary's identity: a binary replaced or rewritten in place has another."""
    try:
        st = os.stat(HOST_BUSYBOX)
    except OSError:
        return None  # making the tree says why
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def cache_dir() -> str | None:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if not os.path.isabs(base):
        return None  # no home to speak of: nothing remembered
    return os.path.join(base, "weft")


def cache_path() -> str | None:
    base = cache_dir()
    return None if base is None else os.path.join(base, CACHE_FILE)


def _load(file: str) -> dict[str, str]:
    try:
        with open(file, "rb") as f:
            known = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(known, dict):
        return {}
    return {k: v for k, v in known.items() if isinstance(k, str) and isinstance(v, str)}


def _remembered(key: str) -> str | None:
    file = cache_path()
    return None if file is None else _load(file).get(key)


def _remember(key: str, path: str) -> None:
    """Remember `path` for `key`, newest last; a cache that cannot be written is left."""
    file = cache_path()
    if file is None:
        return
    known = _load(file)
    known.pop(key, None)
    known[key] = path
    kept = dict(list(known.items())[-MAX_REMEMBERED:])
    tmp = f"{file}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(file), mode=0o700, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(kept, f)
        os.replace(tmp, file)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)

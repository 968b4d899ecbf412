"""Build slots: where a build runs.  Each slot has a host uid and gid for its sandbox
(`build-uid-base`, `build-slots`) and a work dir kept from build to build,
`var/builds/<slot>/` (0700, the daemon's): `root/` (the sandbox's store dir inside),
`build/` (its `/build`) and `tmp/` (its `/tmp`: on disk rather than a tmpfs, so that a
`full` snapshot can keep what the build wrote there).

`tmp/` is the daemon's, mode 1777, as a host's /tmp is root's: the sandbox maps its build
user alone, so inside it `/tmp` is nobody's and sticky, as the tmpfs it replaces was.  The
build user writes in it, but can change nothing of the directory itself: its mode, an ACL,
a user attribute (on a sticky directory those are its owner's), so the next build finds it
as every build does, with nothing to look at on the way (as `build/`'s attributes are).
A `tmp/` of the slot's uid would be the builder's to change.

A build takes a free slot, waiting while none is; the slot freed last is taken first,
as its directories and its inputs' mount points are there already.  A slot whose last
build left it ready for the next (laid out, emptied but for its inputs' mount points)
needs no worker-thread trip before the next build starts in it.

When the store dir lies under the sandbox's /tmp or /build (a state dir there), the spare
makes the store dir's mount point in the slot's `tmp/` or `build/` itself, as the build
user.  The directories down to it are kept from build to build, each only as the spare
made it (the slot's ids, 0755, no attribute, no inode flag the area has not, nothing else
in it): a build sees the same /tmp as in a slot made anew, and the next build makes no
directory and the slot's readying removes none, on a disk slow at each.

No slot is used before what a killed predecessor left running in any of them is gone
(`leftovers.py`): the first build to want a slot waits for that.  A slot something still
runs in then, or whose builder would not die when its build was abandoned, or where a
spawner that died or did not answer may have started one, is withheld for the daemon's
life (and logged): a slot handed to a build while another process writes there corrupts
that build.
"""

import errno
import fcntl
import logging
import os
import stat
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from daemon.build import leftovers
from daemon.proc.spawner import build_ids
from store.tmparea import remove_tree

logger = logging.getLogger("weft.builds")

# A slot's tmp/, the sandbox's /tmp: what every /tmp is, world-writable and sticky.
TMP_MODE = 0o1777
# The areas of a slot bound in the sandbox where the spare makes the store dir's mount
# point itself when the store dir lies there, and the mode it makes each directory with.
MOUNT_AREAS = ("tmp", "build")
MOUNT_POINT_MODE = 0o755
# FS_IOC_GETFLAGS (_IOR('f', 1, long)): a file's inode flags (chattr), whose
# owner may set some of them (noatime, nodump, dirsync...).
_GETFLAGS = 0x80086601
# A flag the file system sets by itself on a directory grown past one block (ext4's
# hashed index): no build's doing.
_INDEX_FLAG = 0x1000
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# What opening a path with `_DIR_FLAGS` fails with when it is no directory: missing, a
# file or a symlink.
_NOT_A_DIR = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


@dataclass(frozen=True)
class Slot:
    index: int
    uid: int
    gid: int
    work: Path  # var/builds/<index>/


def mount_points(closure: Collection[str]) -> set[str]:
    """The names in a sandbox's store dir of the input closure mounted there."""
    return {os.path.basename(p) for p in closure}


class BuildSlots:
    def __init__(
        self, builds_dir: Path, store_dir: str, count: int, uid_base: int, cgroups: str = ""
    ) -> None:
        self.builds_dir = builds_dir
        self.cgroups = cgroups  # where the builds' cgroups are ("" for none)
        self.store_dir = store_dir
        self._count = count
        self._uid_base = uid_base
        self._free = deque(range(count))
        self._lot = trio.lowlevel.ParkingLot()
        self._ready: set[int] = set()
        self._swept = False
        self._sweeping = trio.Lock()
        self.withheld: set[int] = set()

    async def take(self) -> Slot:
        if not self._swept:
            await self._sweep()
        while not self._free:
            await self._lot.park()
        index = self._free.popleft()
        uid, gid = build_ids(index, self._uid_base, self._count)
        return Slot(index, uid, gid, self.builds_dir / str(index))

    async def _sweep(self) -> None:
        """Kill what a killed predecessor left running in the slots, and wait until it
        is gone, once, before the first build takes a slot."""
        async with self._sweeping:
            if self._swept:
                return
            # Shielded: a cancelled first taker must not leave the slots unswept, and the
            # sweep ends within `LEFTOVER_WAIT`.
            with trio.CancelScope(shield=True):
                held = await trio.to_thread.run_sync(leftovers.sweep, self.builds_dir, self.cgroups)
            for index, pids in held.items():
                if index == leftovers.ANY_SLOT:
                    logger.error("%s: processes %s live on after SIGKILL", self.cgroups, pids)
                else:
                    logger.error(
                        "build slot %d: processes %s live on there after SIGKILL; the slot "
                        "is not used",
                        index,
                        pids,
                    )
                    self._withhold(index)
            self._swept = True

    def _withhold(self, index: int) -> None:
        self.withheld.add(index)
        if index in self._free:
            self._free.remove(index)
        self._ready.discard(index)

    def withhold(self, slot: Slot) -> None:
        """Instead of `give_back`: something of the slot's last build may still run and
        write there (its builder would not die, or a spawner that died or did not answer
        may have started it); no build gets the slot again."""
        logger.error(
            "build slot %d: its last builder may still run there; the slot is not used",
            slot.index,
        )
        self._withhold(slot.index)

    def give_back(self, slot: Slot) -> None:
        # Taken first next: a slot not used for a while would have its mount points made
        # anew.
        self._free.appendleft(slot.index)
        self._lot.unpark()

    def take_ready(self, slot: Slot) -> bool:
        """Whether the slot was left ready; it is not any more, until `ready` again."""
        ready = slot.index in self._ready
        self._ready.discard(slot.index)
        return ready

    def lay_out(self, slot: Slot, keep: Collection[str] = ()) -> None:
        """The slot's directories as a build needs them (in a worker thread); see
        `prepare_workdir`."""
        prepare_workdir(slot.work, self.store_dir, slot.uid, slot.gid, keep)

    def ready(self, slot: Slot, keep: Collection[str]) -> None:
        """Lay the slot out for the next build, keeping the mount points `keep` of this
        one's inputs, which the next may share (in a worker thread)."""
        self.lay_out(slot, keep)
        self._ready.add(slot.index)

    def mark_ready(self, slot: Slot) -> None:
        """The slot is as `ready` left it: nothing ran in it since."""
        self._ready.add(slot.index)


def prepare_workdir(
    work: Path, store_dir: str, uid: int, gid: int, keep: Collection[str] = ()
) -> None:
    """A slot's directory, kept from build to build: what a build leaves (in `build/` and
    `tmp/`, and in the root's store dir but the mount points named `keep`) is emptied.
    Only what is missing or wrong is written: this disk is sometimes slow at any change of
    metadata.  (Paths as strings: this runs after every build, and pathlib's joins cost
    more than the system calls.)"""
    w = os.fspath(work)
    _own_dir(os.path.dirname(w), 0o700)
    _own_dir(w, 0o700)
    _own_dir(f"{w}/root", 0o755)
    _clear_workdir(w, store_dir, uid, gid, keep)
    build = f"{w}/build"
    if _is_dir(build) and os.listxattr(build, follow_symlinks=False):
        # ACLs or attributes the last builder set on its /build: not for the next one.
        remove_tree(build)
    _own_dir(build, 0o700, uid, gid)
    _own_dir(f"{w}/tmp", TMP_MODE, os.geteuid(), os.getegid())


def _own_dir(path: str, mode: int, uid: int = -1, gid: int = -1) -> None:
    """A directory at `path` with `mode` (and owner, if given), made or fixed if needed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        # Builds in other slots may make the same parents at the same time.
        os.makedirs(path, mode, exist_ok=True)
        st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        remove_tree(path)
        os.mkdir(path, mode)
        st = os.lstat(path)
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)
    if (uid, gid) != (-1, -1) and (st.st_uid, st.st_gid) != (uid, gid):
        os.chown(path, uid, gid)


def _is_dir(path: str) -> bool:
    """A directory itself, not a symlink to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _clear_workdir(
    work: str, store_dir: str, uid: int, gid: int, keep: Collection[str] = ()
) -> None:
    """Empty the build and tmp dirs, and the root's store dir but for the entries named
    `keep`: the mount points of inputs (the spawner checks them before it mounts on them
    again).  In the area holding the store dir's own mount point, the directories down
    to it stay if they are as the spare made them."""
    area, chain = mount_chain(store_dir)
    for name in ("build", "tmp"):
        _clear_keeping(f"{work}/{name}", chain if name == area else (), uid, gid)
    root_store = os.path.join(work, "root", store_dir.lstrip("/"))
    for name in _look(root_store, False)[1]:
        if name not in keep:
            remove_tree(f"{root_store}/{name}")


def mount_chain(store_dir: str) -> tuple[str, list[str]]:
    """The slot's area (`tmp` or `build`) where the spare makes the store dir's mount
    point, and the names down to it; ("", []) when the store dir lies elsewhere (its
    mount point is the spawner's, in the skeleton)."""
    parts = [p for p in store_dir.split("/") if p]
    if len(parts) > 1 and parts[0] in MOUNT_AREAS:
        return parts[0], parts[1:]
    return "", []


def _clear_keeping(where: str, chain: Sequence[str], uid: int, gid: int) -> None:
    """Empty `where` but for the directories named by `chain`, one in the next, each
    emptied of all else; one not as the spare made it goes, with what it holds.  (Not
    a directory: left for `_own_dir` to replace.)"""
    flags, names = _look(where, bool(chain))
    here = where
    for name in chain:
        for entry in names:
            if entry != name:
                remove_tree(f"{here}/{entry}")
        below = f"{here}/{name}"
        as_made = _as_made(below, uid, gid, flags)
        if as_made is None:
            remove_tree(below)
            return
        names, here = as_made, below
    for entry in names:
        remove_tree(f"{here}/{entry}")


def _look(path: str, flags: bool) -> tuple[int | None, list[str]]:
    """A directory's entries (none if it is not one, or a symlink), and its inode flags
    if asked for, through one descriptor."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as e:
        if e.errno in _NOT_A_DIR:
            return None, []
        raise
    try:
        return (_fd_flags(fd) if flags else None), os.listdir(fd)
    finally:
        os.close(fd)


def _as_made(path: str, uid: int, gid: int, flags: int | None) -> list[str] | None:
    """What `path` holds, if it is a directory as the spare makes a mount point's: the
    build user's, 0755, without extended attributes (ACLs included) and with the inode
    flags of the area it is in; else None."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError:
        return None  # gone, a symlink, not a directory
    try:
        st = os.fstat(fd)
        made = (
            (st.st_uid, st.st_gid) == (uid, gid)
            and stat.S_IMODE(st.st_mode) == MOUNT_POINT_MODE
            and not os.listxattr(fd)
            and _fd_flags(fd) == flags
        )
        return os.listdir(fd) if made else None
    finally:
        os.close(fd)


def _fd_flags(fd: int) -> int | None:
    """The inode flags but the file system's own, None where it has none."""
    try:
        raw = fcntl.ioctl(fd, _GETFLAGS, bytes(8))
    except OSError:
        return None
    return int.from_bytes(raw[:4], "little") & ~_INDEX_FLAG

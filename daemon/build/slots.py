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

No slot is used before what a killed predecessor left running in any of them is gone
(`leftovers.py`): the first build to want a slot waits for that.  A slot something still
runs in then, or whose builder would not die when its build was abandoned, or where a
spawner that died or did not answer may have started one, is withheld for the daemon's
life (and logged): a slot handed to a build while another process writes there corrupts
that build.
"""

import logging
import os
import stat
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import trio

from daemon.build import leftovers
from daemon.proc.spawner import build_ids
from store.tmparea import remove_tree

logger = logging.getLogger("weft.builds")

# A slot's tmp/, the sandbox's /tmp: what every /tmp is, world-writable and sticky.
TMP_MODE = 0o1777


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
    metadata."""
    _own_dir(work.parent, 0o700)
    _own_dir(work, 0o700)
    _own_dir(work / "root", 0o755)
    _clear_workdir(work, store_dir, keep)
    build = work / "build"
    if build.is_dir() and os.listxattr(build, follow_symlinks=False):
        # ACLs or attributes the last builder set on its /build: not for the next one.
        remove_tree(build)
    _own_dir(build, 0o700, uid, gid)
    _own_dir(work / "tmp", TMP_MODE, os.geteuid(), os.getegid())


def _own_dir(path: Path, mode: int, uid: int = -1, gid: int = -1) -> None:
    """A directory at `path` with `mode` (and owner, if given), made or fixed if needed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        # Builds in other slots may make the same parents at the same time.
        path.mkdir(mode=mode, parents=True, exist_ok=True)
        st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        remove_tree(path)
        path.mkdir(mode=mode)
        st = os.lstat(path)
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)
    if (uid, gid) != (-1, -1) and (st.st_uid, st.st_gid) != (uid, gid):
        os.chown(path, uid, gid)


def _clear_workdir(work: Path, store_dir: str, keep: Collection[str] = ()) -> None:
    """Empty the build and tmp dirs, and the root's store dir but for the entries named
    `keep`: the mount points of inputs (the spawner checks them before it mounts on them
    again)."""
    areas = (
        (work / "build", ()),
        (work / "tmp", ()),
        (work / "root" / store_dir.lstrip("/"), keep),
    )
    for where, kept in areas:
        if where.is_dir() and not where.is_symlink():
            for name in os.listdir(where):
                if name not in kept:
                    remove_tree(where / name)

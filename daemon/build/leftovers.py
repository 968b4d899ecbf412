"""Builders a killed daemon left running in its build slots: found and killed, and gone,
before the next daemon lays out any slot for a build.

The first line of defence is that builders die with the daemon (the spawner and the spare
ask for a parent-death signal).  This is the second, for whatever got past it: a daemon
killed with `kill -9` while it built, whose builders were re-parented to pid 1 and went
on writing in `var/builds/<slot>/` while the next daemon handed the same slots to new
builds.  It runs once, before the first build takes a slot (`slots.py`), and sweeps every
slot.

A leftover is known by one of two marks, each tied to this state dir and no other:

- its cgroup: the spawner makes each sandbox in a cgroup of its own under the state
  dir's (`weft-<hash of the state dir>/`, `daemon/sched/freezer.py`), the kernel keeps
  every process the builder starts in it, and no builder can leave it.  Everything in
  them is a predecessor's: this daemon's spawner makes no cgroup before its first
  request names the directory, and every request comes from a build holding a slot.
  Where the daemon may make no cgroups (or a builder's join failed: it is best effort),
- the slot's build dir, as its working directory or bound at its `/build`
  (`/proc/<pid>/cwd`, `/proc/<pid>/root/build`: that directory's device and inode).  Both,
  as the spawner's exit removes the sandbox skeleton, which detaches the `/build` mount of
  builders still running; the builder's working directory stays.  That may be the slot's
  tmp dir too (bound at `/tmp`: a builder may `cd /tmp`), so it marks a leftover as well.

Only processes of pid namespaces other than the daemon's are taken (an admin's shell
sitting in a slot's build dir is no leftover), and each takes every process of its pid
namespace with it: a builder is pid 1 of one of its own, and every process of its build
is in it.  Signals go through pidfds
opened before the mark is checked again, so a pid reused meanwhile is never signalled.
A process is gone, for the slot's purposes, once it has exited: it then has no working
directory, root or cgroup (even as a zombie, which pid 1 reaps), and writes nothing more.

Not chosen: the slot's host uid (every daemon on a machine maps slot N to the same uid
unless told otherwise, and one that is not root maps every slot to its own uid, so a uid
does not say which daemon or state dir a process is of: killing by uid kills other
daemons' builds); a pid or pidfd recorded per slot (a pidfd dies with the daemon, and a
pid written to disk costs a metadata write on the path of every build, yet misses a
builder spawned in the moment before the daemon died).
"""

import contextlib
import enum
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

# How long leftovers killed with SIGKILL get to exit: they exit within milliseconds, but
# one blocked in the kernel (an unresponsive NFS server, say) may not at all, and a slot it
# holds is better withheld than the daemon's start held up for it.
LEFTOVER_WAIT = 10.0
# How often the slots are looked at again while leftovers are dying.
LEFTOVER_POLL = 0.01
# The slot a process found in a predecessor's cgroup is in is not known: any.
ANY_SLOT = -1
# A slot's directories a builder's working directory may be (its /build and /tmp).
SLOT_DIRS = ("build", "tmp")

Identity = tuple[int, int]  # a file's (st_dev, st_ino)


def _identity(path: str) -> Identity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _slot_dirs(work: str) -> list[Identity]:
    """The identities of a slot's build and tmp dirs, `var/builds/<slot>/{build,tmp}`."""
    return [ident for name in SLOT_DIRS if (ident := _identity(f"{work}/{name}"))]


def build_dirs(builds_dir: Path) -> dict[Identity, int]:
    """Every slot's build and tmp dirs under `builds_dir` by identity: {(dev, ino): slot}.
    All there are, not only this daemon's `build-slots`: a predecessor may have had more."""
    found: dict[Identity, int] = {}
    with contextlib.suppress(FileNotFoundError), os.scandir(builds_dir) as entries:
        for entry in entries:
            if entry.name.isdigit():
                found.update((ident, int(entry.name)) for ident in _slot_dirs(entry.path))
    return found


class Mark(enum.Enum):
    """What a leftover was found by: where in `/proc/<pid>/` its identity is, or its
    cgroup's member list."""

    CWD = "cwd"
    BUILD = "root/build"
    PID_NAMESPACE = "ns/pid"
    CGROUP = "cgroup"


@dataclass(frozen=True)
class Leftover:
    slot: int  # ANY_SLOT if found by its cgroup
    mark: Mark
    identity: Identity | None = None  # of a build dir or a pid namespace
    cgroup: str = ""  # the cgroup's directory

    def still(self, pid: int) -> bool:
        if self.mark is Mark.CGROUP:
            return pid in _members(self.cgroup)
        return _identity(f"/proc/{pid}/{self.mark.value}") == self.identity


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _subgroups(cgroups: str, bottom_up: bool = False) -> list[str]:
    """The cgroups under `cgroups` ("" for none)."""
    if not cgroups:
        return []
    return [where for where, _, _ in os.walk(cgroups, topdown=not bottom_up) if where != cgroups]


def _members(cgroup: str) -> list[int]:
    try:
        with open(f"{cgroup}/cgroup.procs") as f:
            return [int(line) for line in f]
    except OSError:
        return []


def _foreign(pid: int, ours: Identity | None) -> bool:
    """Whether `pid` is in a pid namespace other than the daemon's, as every process of a
    build is (an admin's shell in a slot's build dir is not a leftover)."""
    ns = _identity(f"/proc/{pid}/ns/pid")
    return ns is not None and ns != ours


def find(dirs: dict[Identity, int], cgroups: str = "") -> dict[int, Leftover]:
    """The processes of other pid namespaces running in the slots whose build dirs are
    `dirs` or in the cgroups under `cgroups`, and every process sharing a pid namespace
    with one."""
    ours = _identity("/proc/self/ns/pid")
    found = {
        pid: Leftover(ANY_SLOT, Mark.CGROUP, cgroup=where)
        for where in _subgroups(cgroups)
        for pid in _members(where)
        if _foreign(pid, ours)
    }
    for pid in _pids():
        # The pid namespace first: a stat of the working directory of any process on the
        # host could hang on a dead network file system; only other namespaces' matter.
        if not _foreign(pid, ours):
            continue
        for mark in (Mark.CWD, Mark.BUILD):
            ident = _identity(f"/proc/{pid}/{mark.value}")
            if ident is not None and ident in dirs:
                found[pid] = Leftover(dirs[ident], mark, ident)
                break
    if not found:
        return found
    namespaces: dict[Identity, int] = {}
    for pid, leftover in found.items():
        if (ns := _identity(f"/proc/{pid}/ns/pid")) is not None:
            namespaces[ns] = leftover.slot
    for pid in _pids():
        ns = None if pid in found else _identity(f"/proc/{pid}/ns/pid")
        if ns is not None and ns in namespaces:
            found[pid] = Leftover(namespaces[ns], Mark.PID_NAMESPACE, ns)
    return found


def _kill(pid: int, leftover: Leftover) -> None:
    """SIGKILL `pid`, if it is still what `find` found."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        # Checked once the pidfd holds the process: `pid` may have been reused.
        if leftover.still(pid) and _foreign(pid, _identity("/proc/self/ns/pid")):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


def _thaw(cgroups: str) -> None:
    """Thaw the predecessor's frozen builds: a frozen process of a v1 freezer does not die
    of SIGKILL until thawed."""
    for where in _subgroups(cgroups):
        for control, thawed in (("cgroup.freeze", "0"), ("freezer.state", "THAWED")):
            with contextlib.suppress(OSError), open(f"{where}/{control}", "w") as f:
                f.write(thawed)


def _kill_cgroups(cgroups: str) -> None:
    """`cgroup.kill` (cgroup v2, Linux 5.14): every process of the cgroup at once, those
    forking meanwhile included."""
    for where in _subgroups(cgroups):
        with contextlib.suppress(OSError), open(f"{where}/cgroup.kill", "w") as f:
            f.write("1")


def _remove_cgroups(cgroups: str) -> None:
    """The predecessor's cgroups, emptied."""
    for where in _subgroups(cgroups, bottom_up=True):
        with contextlib.suppress(OSError):
            os.rmdir(where)


def sweep(builds_dir: Path, cgroups: str, wait: float = LEFTOVER_WAIT) -> dict[int, list[int]]:
    """Kill what runs in the slots under `builds_dir` or in the cgroups under `cgroups`
    ("" for none), and wait until it is gone (in a worker thread).  Returns what was
    still there after `wait` s: {slot: pids}, ANY_SLOT for those of unknown slot."""
    _thaw(cgroups)
    held = _sweep(build_dirs(builds_dir), cgroups, wait)
    _remove_cgroups(cgroups)
    return held


def sweep_slot(work: Path, wait: float = LEFTOVER_WAIT) -> list[int]:
    """`sweep` of one slot, `var/builds/<slot>/`, by its build and tmp dirs alone (the
    cgroups are the running daemon's): the pids still there after `wait` s."""
    idents = _slot_dirs(str(work))
    if not idents:
        return []
    slot = int(work.name)
    return _sweep(dict.fromkeys(idents, slot), "", wait).get(slot, [])


def _sweep(dirs: dict[Identity, int], cgroups: str, wait: float) -> dict[int, list[int]]:
    deadline = time.monotonic() + wait
    while found := find(dirs, cgroups):
        _kill_cgroups(cgroups)
        if time.monotonic() >= deadline:
            held: dict[int, list[int]] = {}
            for pid, leftover in sorted(found.items()):
                held.setdefault(leftover.slot, []).append(pid)
            return held
        for pid, leftover in found.items():
            _kill(pid, leftover)
        time.sleep(LEFTOVER_POLL)
    return {}

"""The spawner's scratch directory, and what spawners that died left of theirs.

The sandbox skeletons (`sandbox.make_skeleton`) live in a directory of the spawner's in
$TMPDIR, which it removes as it exits.  A spawner killed (kill -9, the OOM killer) removes
nothing, so the directory is named after its owner, `weft-sandbox-<pid>.<start time>-*`,
and each spawner, as it starts, removes those of owners that are no more: the pid is gone,
is a zombie (it has exited: nothing of it will use the directory again), or is another
process since (another start time).  The spares bind its skeletons in mount namespaces of
their own, never on the host, so what it left is plain files; but a builder that runs on
(the daemon's, not the spawner's) has a skeleton for its root, and the mounts of its
sandbox on the skeleton's directories: removing one of those directories would unmount
them under it (its /tmp, its store dir).  So a directory that is some process's root is
left for a later start.  Only directories of this user are looked at.
"""

import contextlib
import os
import tempfile

from spawner.sandbox import remove_tree

PREFIX = "weft-sandbox-"


def _start_time(pid: int) -> str | None:
    """Process `pid`'s start time (clock ticks since boot), or None if it has exited."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # Fields after the name: state is the first, starttime the twentieth.
    return None if fields[0] in ("Z", "X") else fields[19]


def _owner(name: str) -> tuple[int, str] | None:
    """The pid and start time a scratch directory's name gives, or None if it gives none."""
    owner = name[len(PREFIX) :].split("-", 1)[0]
    pid, _, start = owner.partition(".")
    return (int(pid), start) if pid.isdigit() and start.isdigit() else None


def _dead_owners(where: str) -> list[str]:
    """The scratch directories of this user in `where` whose spawners are no more."""
    found = []
    with contextlib.suppress(OSError), os.scandir(where) as entries:
        for entry in entries:
            owner = _owner(entry.name) if entry.name.startswith(PREFIX) else None
            if owner is None or _start_time(owner[0]) == owner[1]:
                continue
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if entry.is_dir(follow_symlinks=False) and st.st_uid == os.geteuid():
                    found.append(entry.path)
    return found


def _roots_in_use() -> set[tuple[int, int]]:
    """(device, inode) of every process's root directory (of those this user may see)."""
    roots = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                st = os.stat(f"/proc/{pid}/root")
                roots.add((st.st_dev, st.st_ino))
    return roots


def _skeletons(scratch: str) -> set[tuple[int, int]]:
    """(device, inode) of the skeletons in a scratch directory."""
    found = set()
    with contextlib.suppress(OSError), os.scandir(scratch) as entries:
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            found.add((st.st_dev, st.st_ino))
    return found


def remove_debris(where: str) -> list[str]:
    """Remove the scratch directories of dead spawners in `where` that no builder runs in
    any more; their paths."""
    dead = _dead_owners(where)
    in_use = _roots_in_use() if dead else set()
    removed = []
    for path in dead:
        if not _skeletons(path) & in_use:
            with contextlib.suppress(OSError):
                remove_tree(path)
                removed.append(path)
    return removed


def make_scratch(where: str | None = None) -> str:
    """A new scratch directory for this process, in `where` ($TMPDIR by default), after
    removing those of dead spawners there."""
    where = where or tempfile.gettempdir()
    remove_debris(where)
    me = os.getpid()
    path = tempfile.mkdtemp(prefix=f"{PREFIX}{me}.{_start_time(me)}-", dir=where)
    os.chmod(path, 0o755)
    return path

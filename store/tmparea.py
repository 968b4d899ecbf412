"""The store's temporary area, `<store>/.tmp`: where adds are built and deletions finished.

Every entry is named `<pid>.<start time>-<boot>.<serial>` after the process that owns it,
so any process opening the store can tell debris of a dead process (remove it) from work in
progress of a live one (leave it), without locks.  The start time guards against a pid
recycled since, the boot id against one recycled at the same clock tick of another boot
(a daemon started at boot can get the same pid at the same tick; its serials start again
at 0, so its new entries would take the old ones' names).  A process that has exited is
dead, even while it is a zombie nobody has reaped yet: it can do nothing more, and the
next daemon may well start before its parent reaps it.
"""

import itertools
import os
import stat
import threading
from pathlib import Path

# Paths being deleted are moved into a directory named `<owner>.<serial>.del`, under their
# own names, so that recovery knows where each came from.
DELETION = ".del"

_serial = itertools.count()
_token_lock = threading.Lock()
_token: tuple[int, str] | None = None


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip().replace("-", "")[:_BOOT_ID_CHARS]
    except OSError:
        return ""


# Enough of the boot id (32 hex digits in all) to tell two boots apart: 8 give 1 chance in
# 4 billion that two boots look alike, and the pid and clock tick must match as well.
_BOOT_ID_CHARS = 8
_BOOT = _boot_id()
# /proc/<pid>/stat states of a process that has exited: a zombie not yet reaped, or one
# being reaped.  (The state is the thread group leader's: a process whose main thread
# exited while others run would show Z too, which a Python process never does.)
_EXITED = frozenset({"Z", "X", "x"})


def _identity(pid: int) -> str | None:
    """`<start time>-<boot>` of a process that has not exited; None if it has."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces and parentheses: fields restart after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0].decode() in _EXITED:
        return None
    return f"{fields[19].decode()}-{_BOOT}"


def owner_token() -> str:
    """This process's `<pid>.<start time>-<boot>`; recomputed after a fork."""
    global _token
    pid = os.getpid()
    with _token_lock:
        if _token is None or _token[0] != pid:
            _token = (pid, f"{pid}.{_identity(pid)}")
        return _token[1]


def owner_alive(token: str) -> bool:
    """Whether the process that `token` names is still running: not exited (zombies
    included), and not another process that got its pid later."""
    pid_s, _, identity = token.partition(".")
    if not pid_s.isdigit() or not identity:
        return False
    return _identity(int(pid_s)) == identity


def remove_tree(path: str | os.PathLike[str]) -> int:
    """Delete a file or tree, making read-only store directories writable on the way.

    Returns the bytes freed: the sizes of the files whose last link went.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return st.st_size if st.st_nlink == 1 else 0
    if st.st_mode & 0o700 != 0o700:
        os.chmod(path, 0o700)
    with os.scandir(path) as it:
        children = [e.path for e in it]
    freed = sum(remove_tree(child) for child in children)
    os.rmdir(path)
    return freed


class TmpArea:
    def __init__(self, path: Path) -> None:
        self.path = path

    def new_entry(self, suffix: str = "") -> Path:
        return self.path / self.new_name(suffix)

    def new_name(self, suffix: str = "") -> str:
        # The owner token makes names unique between processes, the serial within one.
        return f"{owner_token()}.{next(_serial)}{suffix}"

    def move_aside(self, path: Path) -> Path | None:
        """Move `path` out of the store in one step, into an entry to delete at leisure."""
        entry = self.new_entry()
        try:
            os.rename(path, entry)
        except FileNotFoundError:
            return None
        return entry

    def dead_entries(self) -> list[Path]:
        """Entries of owners that have exited, listed once: whoever finishes them works
        from one list, so an owner that exits in between is left for the next open
        rather than half handled."""
        alive: dict[str, bool] = {}
        dead = []
        for name in os.listdir(self.path):
            owner = owner_of(name)
            if owner not in alive:
                alive[owner] = owner_alive(owner)
            if not alive[owner]:
                dead.append(self.path / name)
        return dead


def owner_of(entry_name: str) -> str:
    pid, _, rest = entry_name.partition(".")
    start, _, _ = rest.partition(".")
    return f"{pid}.{start}"

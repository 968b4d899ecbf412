"""The store's temporary area, `<store>/.tmp`: where adds are built and deletions finished.

Every entry is named `<pid>.<start time>.<serial>` after the process that owns it, so any
process opening the store can tell debris of a dead process (remove it) from work in
progress of a live one (leave it), without locks.  The start time guards against a
recycled pid.
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


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces and parentheses: fields restart after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[19].decode()


def owner_token() -> str:
    """This process's `<pid>.<start time>`; recomputed after a fork."""
    global _token
    pid = os.getpid()
    with _token_lock:
        if _token is None or _token[0] != pid:
            _token = (pid, f"{pid}.{_start_time(pid)}")
        return _token[1]


def owner_alive(token: str) -> bool:
    pid_s, _, start = token.partition(".")
    if not pid_s.isdigit() or not start:
        return False
    return _start_time(int(pid_s)) == start


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

    def dead_entries(self, marker: str) -> list[Path]:
        """Entries of dead owners whose names hold `marker`."""
        return [
            self.path / name
            for name in os.listdir(self.path)
            if marker in name and not owner_alive(owner_of(name))
        ]

    def remove_dead_entries(self) -> int:
        removed = 0
        for name in os.listdir(self.path):
            if not owner_alive(owner_of(name)):
                remove_tree(self.path / name)
                removed += 1
        return removed


def owner_of(entry_name: str) -> str:
    pid, _, rest = entry_name.partition(".")
    start, _, _ = rest.partition(".")
    return f"{pid}.{start}"

"""Read files with a client's permissions, from one worker thread, while still root.

Linux keeps the file-system uid, gid and supplementary groups per thread (glibc's
`setgroups` broadcasts to every thread, so the raw system call is used).  Switching
them on the calling thread makes the kernel check every open, stat and readlink as the
client would, while the rest of the daemon keeps running as root.
"""

import ctypes
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_SETGROUPS = {"x86_64": 116, "aarch64": 159}.get(platform.machine())


def _setgroups(gids: list[int]) -> None:
    if _SYS_SETGROUPS is None:
        raise OSError(f"per-thread setgroups is not known on {platform.machine()}")
    arr = (ctypes.c_uint * max(len(gids), 1))(*gids)
    if _libc.syscall(_SYS_SETGROUPS, len(gids), arr) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _set_fs_ids(uid: int, gid: int) -> None:
    _libc.setfsgid(gid)
    _libc.setfsuid(uid)
    # setfsuid reports the previous id, not errors: read back to be sure it took.
    if _libc.setfsuid(-1) != uid or _libc.setfsgid(-1) != gid:
        raise OSError(f"could not switch file-system ids to {uid}:{gid}")


@contextmanager
def reading_as(uid: int, gid: int, groups: list[int]) -> Iterator[None]:
    """Within the block, this thread's file access is checked as uid:gid with `groups`."""
    if os.geteuid() != 0 or uid == 0:
        yield
        return
    own_groups = os.getgroups()
    _setgroups(groups)
    try:
        _set_fs_ids(uid, gid)
        try:
            yield
        finally:
            _set_fs_ids(0, 0)
    finally:
        _setgroups(own_groups)

"""The worker's own view of the file system: its state dir shown at the daemons' path.

A store path's hash covers its store dir, so the worker's private store must have the very
store dir of the daemons it serves.  Several workers (or a worker and a daemon) on one
machine cannot all own that directory, so each keeps its store in a directory of its own
and, in a mount namespace of its own, binds it over the shared path: every process it
starts (its private daemon, the builders) then sees its store where the daemons' is.

Done in-process with unshare(2) and mount(2) before any thread exists (unshare of the mount
namespace is refused to a multithreaded process sharing its fs with other threads), which
is what re-executing under unshare(1) would do, in one process fewer to reap.
"""

import ctypes
import os

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_BIND = 4096


class NamespaceError(OSError):
    """The mount namespace or the bind mount could not be set up."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise NamespaceError(err, f"{what}: {os.strerror(err)}")


def identity(path: str) -> tuple[int, int]:
    """What tells one directory from another, whatever path shows it."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def show_at(real: str, logical: str) -> tuple[int, int]:
    """Enter a new mount namespace (nothing mounted in it propagates back) in which the
    directory `real` is also seen at `logical`; its identity, for `still_shown`."""
    os.makedirs(real, exist_ok=True)
    os.makedirs(logical, exist_ok=True)
    # Before the mount: a `real` inside `logical` is no longer at its path after it.
    want = identity(real)
    libc = _libc()
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "making / private")
    _check(libc.mount(os.fsencode(real), os.fsencode(logical), None, MS_BIND, None), "bind mount")
    return want


def still_shown(logical: str, want: tuple[int, int]) -> bool:
    """Whether `logical` still shows the worker's own state dir.  A rename or removal of
    the logical directory in the host's namespace detaches the bind mount (Linux >= 3.18):
    the path would then show the host's directory, the daemons' own store."""
    try:
        return identity(logical) == want
    except OSError:
        return False

"""The Linux system calls the sandbox needs and Python's os module lacks, through ctypes."""

import ctypes
import errno
import fcntl
import os
import platform
import socket
import struct

CLONE_PARENT = 0x00008000
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(platform.machine())
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}.get(platform.machine())
# Called with the GIL held: the child must not find it released by a thread it lacks.
_pylibc = ctypes.PyDLL(None, use_errno=True)
_pylibc.syscall.restype = ctypes.c_long


def _check(result: int, what: str, path: str | None = None) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)


def clone(flags: int) -> int:
    """fork(2) with `flags` (new namespaces, `CLONE_PARENT`): 0 in the child, the child's
    pid in the parent.  Python's fork handlers do not run: only for a single-threaded
    caller, whose child exits or execs without using threads, locks or imports."""
    if _SYS_CLONE is None:
        raise OSError(errno.ENOSYS, f"clone is not known on {platform.machine()}")
    pid = _pylibc.syscall(
        ctypes.c_long(_SYS_CLONE),
        ctypes.c_ulong(flags),
        ctypes.c_void_p(None),
        ctypes.c_void_p(None),
        ctypes.c_void_p(None),
        ctypes.c_void_p(None),
    )
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"clone: {os.strerror(err)}")
    return int(pid)


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    _check(
        _libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        "mount",
        target,
    )


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(target.encode(), flags), "umount2", target)


def pivot_root(new_root: str, put_old: str) -> None:
    if _SYS_PIVOT_ROOT is None:
        raise OSError(errno.ENOSYS, f"pivot_root is not known on {platform.machine()}")
    _check(
        _libc.syscall(_SYS_PIVOT_ROOT, new_root.encode(), put_old.encode()), "pivot_root", new_root
    )


def prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), "prctl")


def locked_mount_flags(path: str) -> int:
    """The flags a bind mount of `path` must keep when remounted read-only in a user
    namespace (the kernel refuses to drop nosuid, nodev, noexec or atime flags there)."""
    st = os.statvfs(path)
    flags = 0
    for vfs, ms in (
        (os.ST_NOSUID, MS_NOSUID),
        (os.ST_NODEV, MS_NODEV),
        (os.ST_NOEXEC, MS_NOEXEC),
        (os.ST_NOATIME, MS_NOATIME),
        (os.ST_NODIRATIME, MS_NODIRATIME),
        (os.ST_RELATIME, MS_RELATIME),
    ):
        if st.f_flag & vfs:
            flags |= ms
    return flags


def loopback_up() -> None:
    """Bring `lo` up in this (new) network namespace."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh14x", b"lo", 0)
        flags = struct.unpack("16sh14x", fcntl.ioctl(s, siocgifflags, req))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sh14x", b"lo", flags | iff_up))


# seccomp: refuse chmod and friends when the new mode has the setuid or setgid bit.
_X86_64 = 0xC000003E
_RET_ALLOW = 0x7FFF0000
_RET_EPERM = 0x00050000 | errno.EPERM
_S_ISUID_ISGID = 0o6000
_LD, _JEQ, _JSET, _RET = 0x20, 0x15, 0x45, 0x06
# seccomp_data: nr at 0, arch at 4, args[i] (low 32 bits) at 16 + 8 * i.
_PROGRAM = [
    (_LD, 0, 0, 4),
    (_JEQ, 0, 11, _X86_64),
    (_LD, 0, 0, 0),
    (_JEQ, 4, 0, 90),  # chmod(path, mode)
    (_JEQ, 3, 0, 91),  # fchmod(fd, mode)
    (_JEQ, 4, 0, 268),  # fchmodat(dirfd, path, mode)
    (_JEQ, 3, 0, 452),  # fchmodat2(dirfd, path, mode, flags)
    (_RET, 0, 0, _RET_ALLOW),
    (_LD, 0, 0, 16 + 8 * 1),
    (_JSET, 2, 3, _S_ISUID_ISGID),
    (_LD, 0, 0, 16 + 8 * 2),
    (_JSET, 0, 1, _S_ISUID_ISGID),
    (_RET, 0, 0, _RET_EPERM),
    (_RET, 0, 0, _RET_ALLOW),
]


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


# Built once, in the spawner: each builder only installs it.
_FILTERS = (_SockFilter * len(_PROGRAM))(*(_SockFilter(*ins) for ins in _PROGRAM))
_FPROG = _SockFprog(len(_PROGRAM), _FILTERS)


def forbid_setuid_chmod() -> bool:
    """Install the filter; False where it is not written for this architecture."""
    if platform.machine() != "x86_64":
        return False
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(_FPROG), 0, 0), "seccomp")
    return True

"""What a builder sees, and the steps that build it.

`prepare_root` (in the spawner, as the daemon's user) lays out the new root on disk: the
skeleton directories and empty files and directories to mount inputs and extra paths on;
`/etc` and `/dev` come from a template made once (`make_template`).  `enter` (in the
builder process, pid 1 of its new namespaces, still holding every capability of its user
namespace) mounts, pivots into the root, drops to the build user and execs.  The sandbox
is made only by mounting: in a user namespace whose root is not mapped, creating files
would fail, so everything is made beforehand.
"""

import contextlib
import os
import resource
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from spawner import linux

BUILD_UID = 1000
BUILD_GID = 100
BUILD_DIR = "/build"
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
PASSWD = (
    f"root:x:0:0:root:/root:/noshell\n"
    f"builder:x:{BUILD_UID}:{BUILD_GID}:weft build user:{BUILD_DIR}:/noshell\n"
    "nobody:x:65534:65534:nobody:/:/noshell\n"
)
GROUP = f"root:x:0:\nbuilders:x:{BUILD_GID}:\nnogroup:x:65534:\n"
HOSTS = "127.0.0.1 localhost\n::1 localhost\n"


class SetupError(Exception):
    """A step of the sandbox setup failed: which step, which errno, which path."""

    def __init__(self, step: str, err: int, path: str, message: str) -> None:
        super().__init__(f"{step}: {message}" + (f" ({path})" if path else ""))
        self.step, self.errno, self.path, self.message = step, err, path, message


@dataclass
class SpawnRequest:
    builder: str
    root: str  # an empty directory, to become /
    build_dir: str  # bound read-write at /build
    store_dir: str
    host_uid: int  # what the build user maps to outside
    host_gid: int
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)  # store paths, bound read-only
    sandbox_paths: list[str] = field(default_factory=list)  # host paths, bound read-only
    network: bool = False  # True: share the host's network (fixed-output builds)
    # A `cgroup.procs` file the builder's tree joins (best effort), for the freezer.
    cgroup: str = ""


@contextlib.contextmanager
def _step(step: str, path: str = "") -> Iterator[None]:
    """Turns an OSError in the block into a SetupError naming the step."""
    try:
        yield
    except OSError as e:
        raise SetupError(step, e.errno or 0, e.filename or path, e.strerror or str(e)) from e


def _inside(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _mount_point_for(source: str, target: str) -> None:
    """An empty file or directory at `target` to bind `source` on (a symlink is copied)."""
    if os.path.lexists(target):
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    st = os.lstat(source)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(source), target)
    elif stat.S_ISDIR(st.st_mode):
        os.makedirs(target, exist_ok=True)
    else:
        with open(target, "a"):
            pass


def make_template(where: str) -> None:
    """`etc/` and `dev/` as every sandbox sees them, made once and bound into each root:
    a dozen fewer files to create per build, on a disk that is sometimes slow at it."""
    with _step("make template", where):
        os.makedirs(os.path.join(where, "etc"), exist_ok=True)
        for name, text in (("passwd", PASSWD), ("group", GROUP), ("hosts", HOSTS)):
            with open(os.path.join(where, "etc", name), "w") as f:
                f.write(text)
        dev = os.path.join(where, "dev")
        for d, mode in (("", 0o755), ("shm", 0o1777), ("pts", 0o755)):
            os.makedirs(os.path.join(dev, d), exist_ok=True)
            os.chmod(os.path.join(dev, d), mode)
        for name in DEVICES:
            with open(os.path.join(dev, name), "a"):
                pass
        for name, target in (
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
            ("ptmx", "pts/ptmx"),
        ):
            with contextlib.suppress(FileExistsError):
                os.symlink(target, os.path.join(dev, name))


def prepare_root(req: SpawnRequest) -> None:
    root = req.root
    with _step("prepare root", root):
        for d, mode in (
            ("tmp", 0o1777),
            ("build", 0o755),
            ("etc", 0o755),
            ("dev", 0o755),
            ("proc", 0o555),
        ):
            # A slot's root is reused from build to build: only what is missing is made.
            os.makedirs(_inside(root, d), exist_ok=True)
            os.chmod(_inside(root, d), mode)
        # The store dir is the build user's, so it can create its outputs there.
        store = _inside(root, req.store_dir)
        os.makedirs(store, exist_ok=True)
        os.chown(store, req.host_uid, req.host_gid)
        os.chmod(store, 0o755)
        for p in [*req.inputs, *req.sandbox_paths]:
            _mount_point_for(p, _inside(root, p))


def _bind(source: str, target: str, read_only: bool) -> None:
    with _step("bind mount", source):
        linux.mount(source, target, None, linux.MS_BIND | linux.MS_REC)
        if read_only:
            flags = linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY
            linux.mount(None, target, None, flags | linux.locked_mount_flags(target))


def enter(req: SpawnRequest, template: str, log_fd: int, status_fd: int) -> None:
    """In the builder (pid 1 of its namespaces): mount, pivot, drop privileges, exec."""
    root = req.root
    with _step("make / private"):
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    _bind(root, root, read_only=False)
    _bind(os.path.join(template, "etc"), _inside(root, "etc"), read_only=True)
    _bind(os.path.join(template, "dev"), _inside(root, "dev"), read_only=True)
    for p in req.inputs:
        if not os.path.islink(p):
            _bind(p, _inside(root, p), read_only=True)
    for p in req.sandbox_paths:
        if not os.path.islink(p):
            _bind(p, _inside(root, p), read_only=True)
    _bind(req.build_dir, _inside(root, BUILD_DIR), read_only=False)
    for dev in DEVICES:
        _bind(f"/dev/{dev}", _inside(root, f"dev/{dev}"), read_only=False)
    with _step("mount /tmp"):
        linux.mount(
            "tmpfs", _inside(root, "tmp"), "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=1777"
        )
    with _step("mount /dev/shm"):
        linux.mount(
            "shm", _inside(root, "dev/shm"), "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=1777"
        )
    with _step("mount /dev/pts"):
        linux.mount(
            "devpts",
            _inside(root, "dev/pts"),
            "devpts",
            linux.MS_NOSUID | linux.MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620",
        )
    with _step("mount /proc"):
        linux.mount(
            "proc",
            _inside(root, "proc"),
            "proc",
            linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC,
        )
    with _step("hostname"):
        socket.sethostname("localhost")
    if not req.network:
        with _step("loopback"):
            linux.loopback_up()
    with _step("pivot_root", root):
        # pivot_root(".", ".") stacks the old root on the new one; detaching it leaves
        # nothing of the host reachable, and needs no directory to put it in.
        os.chdir(root)
        linux.pivot_root(".", ".")
        linux.umount2(".", linux.MNT_DETACH)
        os.chdir("/")
    with _step("drop privileges"):
        os.setgid(BUILD_GID)
        os.setuid(BUILD_UID)
        linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
        linux.forbid_setuid_chmod()
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.umask(0o022)
        os.chdir(BUILD_DIR)
    with _step("set up stdio"):
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        keep = {0, 1, 2, status_fd}
        for fd in map(int, os.listdir("/proc/self/fd")):
            if fd not in keep:
                with contextlib.suppress(OSError):
                    os.close(fd)
    with _step("exec", req.builder):
        os.execve(req.builder, [req.builder, *req.args], req.env)

"""What a builder sees, and the steps that build it.

The sandbox's `/` is a skeleton made once per spawner (`make_skeleton`): the directories to
mount on, `/etc` with its three files, `/dev` with its placeholders and links; fixed-output
builds get one of their own, whose `/etc` has the host's files a downloader needs too
(`pasta.py`).  Every spawn
costs only the files `prepare_root` creates (as the daemon's user) in the build slot's
store dir: one mount point per input, on a disk that is sometimes slow at creating files.

A builder is set up in two halves, by the spare program (`spare.c`).  Its `settle` runs in
a spare process that waits, in fresh namespaces, for the next request: it mounts what
every sandbox has (the skeleton read-only, devices, `/tmp`, `/dev/shm`, `/dev/pts`,
`/proc`), names the host and brings `lo` up.  The rest runs once the request came: it
binds the slot's tmp dir over that `/tmp` if the request names one (`tmp_dir`: then what
the build writes to `/tmp` is on disk, for a snapshot to keep), the build dir, the slot's
store dir and the inputs, pivots into the skeleton, drops to the build user and execs.
Both only mount: in a user namespace whose root is not mapped, creating files fails, so
everything to mount on is made here beforehand.  Only a mount point inside what the spare
mounted itself (the store dir of a state dir under /tmp lies in the sandbox's own /tmp),
or inside the slot's tmp dir bound there, is made there, by the build user.
"""

import contextlib
import errno
import os
import stat
from collections.abc import Iterator

from daemon.wire.spawner import SetupFailure, SpawnRequest

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
        self.failure = SetupFailure(step, err, path, message)
        super().__init__(str(self.failure))


@contextlib.contextmanager
def _step(step: str, path: str = "") -> Iterator[None]:
    """Turns an OSError in the block into a SetupError naming the step."""
    try:
        yield
    except OSError as e:
        raise SetupError(step, e.errno or 0, e.filename or path, e.strerror or str(e)) from e


def _inside(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _directory(path: str) -> None:
    """`os.makedirs(path, exist_ok=True)`, but only looking when it exists: on this disk,
    mkdir of an existing directory sometimes takes as long as making one."""
    if not os.path.isdir(path):
        os.makedirs(path, exist_ok=True)


def remove_tree(path: str) -> None:
    """Delete a file or tree (a builder's directories may be read-only); no symlink is
    followed."""
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        os.unlink(path)
        return
    os.chmod(path, 0o700)
    for entry in os.scandir(path):
        remove_tree(entry.path)
    os.rmdir(path)


def _is_mount_point_for(source: str, kind: int, target: str) -> bool:
    """Whether `target`, left by an earlier build, is still an empty file or directory of
    the spawner's, of the `kind` `source` is (or a copy of its symlink)."""
    st = os.lstat(target)
    if stat.S_IFMT(st.st_mode) != kind or st.st_uid != os.geteuid():
        return False
    if stat.S_ISDIR(kind):
        with os.scandir(target) as it:
            return next(it, None) is None
    if stat.S_ISLNK(kind):
        return os.readlink(target) == os.readlink(source)
    return st.st_size == 0


def _mount_point_for(source: str, target: str, reusable: list[str] | None = None) -> bool:
    """An empty file or directory at `target` to bind `source` on, or a copy of its
    symlink (then False is returned: nothing to bind).  One left by an earlier build is
    kept if it still is one, or one of `reusable` (left for other paths) renamed:
    creating and deleting files is what is slow here, not looking at them."""
    kind = stat.S_IFMT(os.lstat(source).st_mode)
    to_bind = not stat.S_ISLNK(kind)
    if os.path.lexists(target):
        if _is_mount_point_for(source, kind, target):
            return to_bind
        remove_tree(target)
    _directory(os.path.dirname(target))
    if not to_bind:
        os.symlink(os.readlink(source), target)
        return False
    for old in reusable if reusable is not None else []:
        if _is_mount_point_for(source, kind, old):
            reusable.remove(old)
            os.rename(old, target)
            return True
    if stat.S_ISDIR(kind):
        os.mkdir(target)
    else:
        with open(target, "a"):
            pass
    return True


def write_if_changed(path: str, text: str) -> None:
    """`path` holds `text` from now on, replaced whole (a sandbox reading it sees the old
    file or the new one), and left alone if it holds it already."""
    with contextlib.suppress(OSError), open(path) as f:
        if f.read() == text:
            return
    with open(f"{path}.new", "w") as f:
        f.write(text)
    os.replace(f"{path}.new", path)


def make_skeleton(where: str, name: str = "root") -> str:
    """A root sandboxes of this spawner pivot into (read-only inside), made once."""
    root = os.path.join(where, name)
    with _step("make skeleton", root):
        for d, mode in (
            ("", 0o755),
            ("tmp", 0o1777),
            ("build", 0o755),
            ("etc", 0o755),
            ("proc", 0o555),
            ("dev", 0o755),
            ("dev/shm", 0o1777),
            ("dev/pts", 0o755),
        ):
            os.makedirs(_inside(root, d), exist_ok=True)
            os.chmod(_inside(root, d), mode)
        for name, text in (("passwd", PASSWD), ("group", GROUP), ("hosts", HOSTS)):
            with open(_inside(root, f"etc/{name}"), "w") as f:
                f.write(text)
        for name in DEVICES:
            with open(_inside(root, f"dev/{name}"), "a"):
                pass
        for name, target in (
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
            ("ptmx", "pts/ptmx"),
        ):
            with contextlib.suppress(FileExistsError):
                os.symlink(target, _inside(root, f"dev/{name}"))
    return root


def check_tmp_dir(req: SpawnRequest) -> None:
    """The request's tmp dir, if it names one, is a directory and no symlink: mount(2)
    follows one, and would bind wherever it led at the sandbox's /tmp."""
    if not req.tmp_dir:
        return
    with _step("tmp dir", req.tmp_dir):
        if not os.path.isabs(req.tmp_dir):
            raise SetupError("tmp dir", errno.EINVAL, req.tmp_dir, "not an absolute path")
        if not stat.S_ISDIR(os.lstat(req.tmp_dir).st_mode):
            raise SetupError("tmp dir", errno.ENOTDIR, req.tmp_dir, "not a directory")


def store_dir_of(req: SpawnRequest) -> str:
    """The build slot's store dir, on disk: what the builder writes its outputs into."""
    return _inside(req.root, req.store_dir)


def prepare_root(req: SpawnRequest, skeleton: str) -> list[str]:
    """Mount points for this request: its inputs in the slot's store dir, its sandbox
    paths and the store dir itself in the skeleton (they stay there for the next builds).
    Whatever else is in the slot's store dir goes (the daemon leaves the mount points of
    the last build's inputs there), so that only the input closure is visible.  Returns
    the paths to bind (symlinks are copied instead)."""
    store = store_dir_of(req)
    in_store = req.store_dir.rstrip("/") + "/"
    binds: list[str] = []
    with _step("prepare root", req.root):
        try:
            st = os.stat(store)
        except FileNotFoundError:
            os.makedirs(store)
            st = os.stat(store)
        # The store dir is the build user's, so it can create its outputs there.
        if (st.st_uid, st.st_gid) != (req.host_uid, req.host_gid):
            os.chown(store, req.host_uid, req.host_gid)
        if stat.S_IMODE(st.st_mode) != 0o755:
            os.chmod(store, 0o755)
        _directory(_inside(skeleton, req.store_dir))
        for p in [*req.inputs, *req.restored]:
            if os.path.dirname(p) != req.store_dir.rstrip("/"):
                raise SetupError("prepare root", errno.EINVAL, p, "not a path in the store dir")
        wanted = {os.path.basename(p) for p in [*req.inputs, *req.restored]}
        wanted.update(
            p[len(in_store) :].split("/")[0] for p in req.sandbox_paths if p.startswith(in_store)
        )
        with os.scandir(store) as entries:
            stale = [e.path for e in entries if e.name not in wanted]
        for p in req.inputs:
            if _mount_point_for(p, _inside(req.root, p), stale):
                binds.append(p)
        for path in stale:
            remove_tree(path)
        for p in req.sandbox_paths:
            # One in the store dir is mounted on through the slot's store dir, bound there.
            if _mount_point_for(p, _inside(req.root if p.startswith(in_store) else skeleton, p)):
                binds.append(p)
    return binds

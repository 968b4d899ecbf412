"""Hand a failed build's directory to the user who asked for it (`--keep-failed`).

The directory was the builder's to fill, so before the user gets it every entry is made
safe: setuid, setgid and sticky bits and group or world write permission are removed;
hard links to files the builder does not own (the only way a builder could have handed
over someone else's file) are deleted, and so is anything but files, directories and
symlinks; everything is then the user's.  The result goes to a fresh 0700 directory in
/tmp, which only the user can enter.
"""

import os
import shutil
import stat
import tempfile
from pathlib import Path


def _sanitize(path: str, builder_uid: int, uid: int, gid: int) -> None:
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        os.chmod(path, 0o700)
        for name in os.listdir(path):
            _sanitize(os.path.join(path, name), builder_uid, uid, gid)
        os.chmod(path, stat.S_IMODE(st.st_mode) & 0o755 | 0o700)
    elif stat.S_ISREG(st.st_mode):
        if st.st_uid != builder_uid:
            # Not the builder's file: a hard link it made to someone else's.
            os.unlink(path)
            return
        os.chmod(path, stat.S_IMODE(st.st_mode) & 0o755)
    elif not stat.S_ISLNK(st.st_mode):
        os.unlink(path)
        return
    os.lchown(path, uid, gid)


def keep_failed(build_dir: Path, builder_uid: int, name: str, uid: int, gid: int) -> str:
    """Make `build_dir` safe, give it to uid:gid, and move it to /tmp; returns where."""
    _sanitize(str(build_dir), builder_uid, uid, gid)
    dest = Path(tempfile.mkdtemp(prefix=f"weft-build-{name}-"))
    os.chown(dest, uid, gid)
    target = dest / "build"
    try:
        os.rename(build_dir, target)
    except OSError:
        # Another file system: the copies are ours (root's), to hand over like the rest.
        shutil.copytree(build_dir, target, symlinks=True)
        shutil.rmtree(build_dir)
        _sanitize(str(target), os.geteuid(), uid, gid)
    return str(target)

"""The two copies a snapshot is made and used with (`store.snapshotfs`), through fds.

`Stager` copies a build's tree into a snapshot being staged, under `--keep-failed`'s rules
(regular files the builder owns, directories, symlinks; nothing else), counting the archive
the store will make of it as it goes and feeding everything the archive will hold to a
reference scanner, so that one pass reads each file once.  `Merger` copies a snapshot out
of the store onto a build's directories, replacing what is in the way, the copies its
builder's and writable by it.

Both walk with directory fds and O_NOFOLLOW at every step: the trees on the build's side
were written by a builder, which may have left a symlink where a directory was expected,
and following it would read or write outside the build as root.
"""

import errno
import os
import shutil
import stat

from store import nar
from store.errors import StoreError
from store.refscan import ReferenceScanner
from store.snapshots import SnapshotTooLarge

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: an entry swapped for a fifo since it was listed must not hang the open.
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Files are copied in pieces of this size: few calls for a large file, and a piece still
# fits in the CPU's caches between being read, scanned and written.
_CHUNK = 4 << 20
# An entry that cannot be opened as asked: gone, a symlink, not (or no longer) a directory,
# or a socket swapped in since it was listed.
_NOT_THERE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENXIO)
# Restored files and directories: the builder's, writable by it only.
_DIR_MODE = 0o755
_FILE_MODE = 0o644
_EXEC_MODE = 0o755


def member(dir_fd: int, name: bytes) -> int | None:
    """The mode of `name` in `dir_fd` (not followed), or None if there is none."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return None


def open_member(top: int, parts: list[bytes]) -> int | None:
    """The directory `top/parts...`, every component a real directory; else None."""
    fd = os.dup(top)
    try:
        for part in parts:
            try:
                inner = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in _NOT_THERE:
                    return None
                raise
            os.close(fd)
            fd = inner
        found, fd = fd, -1
        return found
    finally:
        if fd != -1:
            os.close(fd)


class Stager:
    """Copies a build's trees into a staged snapshot; raises `SnapshotTooLarge` as soon as
    the archive would pass `limit`."""

    def __init__(self, builder_uid: int, limit: int, scanner: ReferenceScanner, drv: str) -> None:
        self.builder_uid = builder_uid
        self.limit = limit
        self.scanner = scanner
        self.drv = drv
        self.size = len(nar.HEADER) + len(nar.DIRECTORY) + len(nar.DIRECTORY_END)
        self._depth = 0

    def _charge(self, n: int) -> None:
        self.size += n
        if self.size > self.limit:
            raise SnapshotTooLarge(
                f"the snapshot of {self.drv} would be over {self.limit:,} bytes "
                "(MAX_SNAPSHOT_SIZE): none is made"
            )

    def _entry(self, name: bytes) -> None:
        self._charge(len(nar.entry_start(name)) + len(nar.ENTRY_END))
        # Each piece fed between bytes outside the hash alphabet: no match spans two.
        self.scanner.feed(b"\0" + name + b"\0")

    def new_dir(self, parent: int, name: bytes) -> int:
        """A new directory of the snapshot, open."""
        self._entry(name)
        self._charge(len(nar.DIRECTORY) + len(nar.DIRECTORY_END))
        os.mkdir(name, 0o700, dir_fd=parent)
        return os.open(name, DIR_FLAGS, dir_fd=parent)

    def new_file(self, parent: int, name: bytes, data: bytes) -> None:
        self._entry(name)
        self._charge(
            len(nar.file_header(False, len(data))) + len(data) + len(nar.file_trailer(len(data)))
        )
        self.scanner.feed(data)
        fd = os.open(name, _NEW_FILE, 0o600, dir_fd=parent)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)

    def from_dir(self, src: int, parent: int, name: bytes) -> None:
        """The open directory `src` copied as `parent/name`."""
        if self._depth >= nar.MAX_DEPTH - 2:  # the snapshot's own two levels above
            raise StoreError(
                f"the snapshot of {self.drv}: directories nested deeper than {nar.MAX_DEPTH} "
                "levels cannot be stored: none is made"
            )
        into = self.new_dir(parent, name)
        self._depth += 1
        try:
            for child in nar.sorted_names(src):
                self.node(src, child, into, child)
        finally:
            self._depth -= 1
            os.close(into)

    def node(self, src_parent: int, name: bytes, parent: int, dst_name: bytes) -> None:
        """`src_parent/name` copied as `parent/dst_name` if the rules let it be."""
        mode = member(src_parent, name)
        if mode is None:
            return
        if stat.S_ISREG(mode):
            self._file(src_parent, name, parent, dst_name)
        elif stat.S_ISLNK(mode):
            target = os.readlink(name, dir_fd=src_parent)
            self._entry(dst_name)
            self._charge(len(nar.symlink_node(target)))
            self.scanner.feed(b"\0" + target + b"\0")
            os.symlink(target, dst_name, dir_fd=parent)
        elif stat.S_ISDIR(mode):
            src = _open_or_none(name, DIR_FLAGS, src_parent)
            if src is not None:
                try:
                    self.from_dir(src, parent, dst_name)
                finally:
                    os.close(src)
        # Devices, fifos and sockets are left out, as --keep-failed leaves them.

    def _file(self, src_parent: int, name: bytes, parent: int, dst_name: bytes) -> None:
        src = _open_or_none(name, _READ, src_parent)
        if src is None:
            return
        try:
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != self.builder_uid:
                # Not the builder's: a hard link it made to someone else's file.
                return
            executable = nar.is_executable(st.st_mode)
            size = st.st_size
            self._entry(dst_name)
            self._charge(
                len(nar.file_header(executable, size)) + size + len(nar.file_trailer(size))
            )
            dst = os.open(dst_name, _NEW_FILE, 0o700 if executable else 0o600, dir_fd=parent)
            try:
                self._copy(src, dst, size)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    def _copy(self, src: int, dst: int, size: int) -> None:
        # At most the size charged: a file still growing is cut, never counted short.
        left = size
        while left:
            data = os.read(src, min(left, _CHUNK))
            if not data:
                break
            self.scanner.feed(data)
            _write_all(dst, data)
            left -= len(data)
        self.scanner.feed(b"\0")


class Merger:
    """Copies a snapshot's trees onto a build's, the copies uid:gid's and writable by them."""

    def __init__(self, uid: int, gid: int) -> None:
        self.uid = uid
        self.gid = gid

    def merge(self, src: int, into: int) -> None:
        """Every entry of the open directory `src` into the open directory `into`."""
        for name in nar.sorted_names(src):
            self.put(src, name, into, name)

    def put(self, src_parent: int, name: bytes, parent: int, dst_name: bytes) -> None:
        """`src_parent/name` as `parent/dst_name`: a directory merged into one there, else
        in place of what is there."""
        st = os.stat(name, dir_fd=src_parent, follow_symlinks=False)
        old = member(parent, dst_name)
        if stat.S_ISDIR(st.st_mode):
            if old is not None and not stat.S_ISDIR(old):
                _remove(parent, dst_name, old)
                old = None
            if old is None:
                os.mkdir(dst_name, 0o700, dir_fd=parent)
            into = os.open(dst_name, DIR_FLAGS, dir_fd=parent)
            try:
                self._own(into, _DIR_MODE)
                src = os.open(name, DIR_FLAGS, dir_fd=src_parent)
                try:
                    self.merge(src, into)
                finally:
                    os.close(src)
            finally:
                os.close(into)
            return
        if old is not None:
            _remove(parent, dst_name, old)
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=src_parent), dst_name, dir_fd=parent)
            os.chown(dst_name, self.uid, self.gid, dir_fd=parent, follow_symlinks=False)
        elif stat.S_ISREG(st.st_mode):
            self._file(src_parent, name, parent, dst_name, st.st_size)

    def make_dirs(self, top: int, parts: list[bytes]) -> int:
        """`top/parts...` made where missing (a non-directory in the way replaced), each
        uid:gid's; the last, open."""
        fd = os.dup(top)
        try:
            for part in parts:
                old = member(fd, part)
                if old is not None and not stat.S_ISDIR(old):
                    _remove(fd, part, old)
                    old = None
                if old is None:
                    os.mkdir(part, 0o700, dir_fd=fd)
                inner = os.open(part, DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = inner
                self._own(fd, _DIR_MODE)
            found, fd = fd, -1
            return found
        finally:
            if fd != -1:
                os.close(fd)

    def _file(self, src_parent: int, name: bytes, parent: int, dst_name: bytes, size: int) -> None:
        src = os.open(name, _READ, dir_fd=src_parent)
        try:
            executable = nar.is_executable(os.fstat(src).st_mode)
            dst = os.open(dst_name, _NEW_FILE, 0o600, dir_fd=parent)
            try:
                offset = 0
                while offset < size:
                    n = os.sendfile(dst, src, offset, min(size - offset, _CHUNK))
                    if not n:
                        break
                    offset += n
                self._own(dst, _EXEC_MODE if executable else _FILE_MODE)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    def _own(self, fd: int, mode: int) -> None:
        os.fchown(fd, self.uid, self.gid)
        os.fchmod(fd, mode)


def _remove(parent: int, name: bytes, mode: int) -> None:
    if stat.S_ISDIR(mode):
        # rmtree with a dir_fd works through fds and never follows a symlink.
        shutil.rmtree(os.fsdecode(name), dir_fd=parent)
    else:
        os.unlink(name, dir_fd=parent)


def _open_or_none(name: bytes, flags: int, dir_fd: int) -> int | None:
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in _NOT_THERE:
            return None
        raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]

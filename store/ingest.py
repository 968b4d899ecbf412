"""Copy a file or tree from disk into the store's temporary area, canonical and hashed.

One pass over the source: every file is read once, written once, and its archive
serialisation (framing from `store.nar`, contents from the file) is fed to the hasher as
it goes, so the content hash is that of the bytes actually written.  (A large file is
copied by the kernel and the copy is hashed behind it: `store.filecopy`.)  The copy is
canonical as it is made (mtime 1, modes 0444/0555, nothing else), and the source is
walked through directory fds with O_NOFOLLOW, so a source that changes under us can make
the add fail but never makes it read outside the tree it was given.  Nor can a copy walk
into a directory that holds its own destination (the store dir, the state dir, `/`): it
would copy itself without end.
"""

import errno
import mmap
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

import blake3

from store import nar
from store.creds import reading_as
from store.errors import StoreError
from store.filecopy import SourceChanged, copy_and_hash
from store.hashing import format_hash
from store.nar import UnsupportedFileType
from store.tmparea import remove_tree

# Files up to this size are read in one call and hashed with their framing in one update;
# larger ones are copied by the kernel and hashed behind it (`store.filecopy`).
_SMALL = 256 << 10
# A source that is one regular file at least this large is hashed by BLAKE3's threads, one
# per CPU this thread may use: below it, handing the work out costs more than it saves.
# (In a tree, files are hashed by this thread: the hand-off of each small update to a
# pool thread would cost more than the hash of all of them.)
_THREADED = 16 << 20
# BLAKE3 runs at about 1.3 GB/s a thread: eight outrun any disk and the kernel's copy;
# more would only be threads to start.
_MAX_HASH_THREADS = 8
_CHUNK = 4 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Read and write: the copy of a large file is hashed through a mapping of it.
_NEW_FILE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# Extended attributes a file system may put on every file, which cannot be removed (Nix
# leaves them too).
_KEPT_XATTRS = ("security.selinux", "system.nfs4_acl")


class SourceHoldsDestination(StoreError):
    """The source holds the directory the copy is written into (the store, say)."""


@dataclass(frozen=True, slots=True)
class Ingested:
    nar_hash: str
    nar_size: int


class _Archiver:
    """Feeds the archive serialisation of a tree, as it is walked, to the hasher."""

    def __init__(self, threads: int = 1) -> None:
        self.hasher = blake3.blake3(max_threads=threads)
        self.size = 0
        self.depth = 0

    def feed(self, data: bytes | memoryview | mmap.mmap) -> None:
        self.hasher.update(data)
        self.size += len(data)

    def ingested(self) -> Ingested:
        return Ingested(format_hash(self.hasher.digest()), self.size)

    def entries(self, fd: int, where: bytes) -> Iterator[tuple[bytes, int]]:
        """A directory's framing around its entries, (name, mode) each, in order: a
        generator, so that each level of a tree costs the walk two frames, not four."""
        self.depth += 1
        if self.depth > nar.MAX_DEPTH + 1:  # as restore counts: the top is at depth 0
            # Deeper than an archive may be (store.nar): it could never be restored.
            raise UnsupportedFileType(
                f"directories nested deeper than {nar.MAX_DEPTH} levels (at {os.fsdecode(where)!r})"
            )
        self.feed(nar.DIRECTORY)
        for child in nar.sorted_names(fd):
            mode = os.stat(child, dir_fd=fd, follow_symlinks=False).st_mode
            self.feed(nar.entry_start(child))
            yield child, mode
            self.feed(nar.ENTRY_END)
        self.feed(nar.DIRECTORY_END)
        self.depth -= 1


def _unsupported(name: bytes, mode: int) -> UnsupportedFileType:
    return UnsupportedFileType(
        f"{os.fsdecode(name)}: not a regular file, symlink or directory "
        f"(type {stat.filemode(mode)[0]!r})"
    )


class _Copier(_Archiver):
    def __init__(self, forbidden: frozenset[tuple[int, int]], threads: int = 1) -> None:
        super().__init__(threads)
        # (device, inode) of the destination's directory and each one above it.
        self._forbidden = forbidden

    def node(self, src_dir: int, name: bytes, dst_dir: int, dst_name: bytes, mode: int) -> None:
        if stat.S_ISREG(mode):
            self.file(src_dir, name, dst_dir, dst_name)
        elif stat.S_ISLNK(mode):
            target = os.readlink(name, dir_fd=src_dir)
            self.feed(nar.symlink_node(target))
            os.symlink(target, dst_name, dir_fd=dst_dir)
            os.utime(dst_name, (1, 1), dir_fd=dst_dir, follow_symlinks=False)
        elif stat.S_ISDIR(mode):
            self.directory(src_dir, name, dst_dir, dst_name)
        else:
            raise _unsupported(name, mode)

    def directory(self, src_dir: int, name: bytes, dst_dir: int, dst_name: bytes) -> None:
        sfd = os.open(name, _DIR_FLAGS, dir_fd=src_dir)
        try:
            st = os.fstat(sfd)
            if (st.st_dev, st.st_ino) in self._forbidden:
                raise SourceHoldsDestination(
                    f"{os.fsdecode(name)}: holds the directory the copy is written into "
                    "(the store's): a store cannot take in itself"
                )
            os.mkdir(dst_name, 0o700, dir_fd=dst_dir)
            dfd = os.open(dst_name, _DIR_FLAGS, dir_fd=dst_dir)
            try:
                for child, mode in self.entries(sfd, name):
                    self.node(sfd, child, dfd, child, mode)
                os.fchmod(dfd, 0o555)
                os.utime(dfd, (1, 1))
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)

    def file(self, src_dir: int, name: bytes, dst_dir: int, dst_name: bytes) -> None:
        # O_NONBLOCK: if the entry was swapped for a fifo since we looked, open must not hang.
        sfd = os.open(name, _READ, dir_fd=src_dir)
        try:
            st = os.fstat(sfd)
            if not stat.S_ISREG(st.st_mode):
                raise SourceChanged(f"{os.fsdecode(name)}: changed type while being added")
            executable = nar.is_executable(st.st_mode)
            size = st.st_size
            dfd = os.open(dst_name, _NEW_FILE, 0o600, dir_fd=dst_dir)
            try:
                if size <= _SMALL:
                    data = _read_exactly(sfd, size, name)
                    self.feed(nar.file_header(executable, size) + data + nar.file_trailer(size))
                    _write_all(dfd, data)
                else:
                    self.feed(nar.file_header(executable, size))
                    copy_and_hash(sfd, dfd, size, self.feed, name)
                    self.feed(nar.file_trailer(size))
                os.fchmod(dfd, 0o555 if executable else 0o444)
                os.utime(dfd, (1, 1))
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)


class _Settler(_Archiver):
    """Makes a tree canonical where it lies (owner, modes, mtime 1, no extended
    attributes), feeding its archive serialisation to the hasher as `_Copier` does."""

    def __init__(self) -> None:
        super().__init__()
        self._ids = os.geteuid(), os.getegid()

    def node(self, dir_fd: int, name: bytes, mode: int) -> None:
        if stat.S_ISREG(mode):
            self.file(dir_fd, name)
        elif stat.S_ISLNK(mode):
            self.feed(nar.symlink_node(os.readlink(name, dir_fd=dir_fd)))
            os.chown(name, *self._ids, dir_fd=dir_fd, follow_symlinks=False)
            os.utime(name, (1, 1), dir_fd=dir_fd, follow_symlinks=False)
        elif stat.S_ISDIR(mode):
            self.directory(dir_fd, name)
        else:
            raise _unsupported(name, mode)

    def directory(self, dir_fd: int, name: bytes) -> None:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        try:
            for child, mode in self.entries(fd, name):
                self.node(fd, child, mode)
            self._settle(fd, 0o555)
        finally:
            os.close(fd)

    def file(self, dir_fd: int, name: bytes) -> None:
        fd = os.open(name, _READ, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            executable = nar.is_executable(st.st_mode)
            self.feed(nar.file_header(executable, st.st_size))
            left = st.st_size
            while left:
                data = os.read(fd, min(left, _CHUNK))
                if not data:
                    raise SourceChanged(f"{os.fsdecode(name)}: shrank while being added")
                self.feed(data)
                left -= len(data)
            self.feed(nar.file_trailer(st.st_size))
            self._settle(fd, 0o555 if executable else 0o444)
        finally:
            os.close(fd)

    def _settle(self, fd: int, mode: int) -> None:
        # The owner first: a chown clears setuid and setgid bits, the chmod the rest.
        os.fchown(fd, *self._ids)
        for attr in os.listxattr(fd):
            if attr not in _KEPT_XATTRS:
                os.removexattr(fd, attr)
        os.fchmod(fd, mode)
        os.utime(fd, (1, 1))


def _read_exactly(fd: int, size: int, name: bytes) -> bytes:
    data = os.read(fd, size + 1)
    while len(data) < size:
        more = os.read(fd, size + 1 - len(data))
        if not more:
            raise SourceChanged(f"{os.fsdecode(name)}: shrank while being added")
        data += more
    if len(data) > size:
        raise SourceChanged(f"{os.fsdecode(name)}: grew while being added")
    return data


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def copy_tree(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Ingested:
    """Copy `src` (file, symlink or directory; not followed) to `dest`, which must not exist.

    Returns the BLAKE3 hash and size of the archive of what was written.
    """
    dest_parent, dest_name = os.path.split(os.path.abspath(os.fsencode(dest)))
    dpfd = os.open(dest_parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _copy_into(src, dpfd, dest_name, _this_and_above(dpfd))
    finally:
        os.close(dpfd)


def _this_and_above(dir_fd: int) -> frozenset[tuple[int, int]]:
    """(device, inode) of a directory and of every directory above it, up to `/`."""
    seen: set[tuple[int, int]] = set()
    fd = os.dup(dir_fd)
    try:
        while True:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in seen:
                return frozenset(seen)
            seen.add((st.st_dev, st.st_ino))
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
    finally:
        os.close(fd)


def _copy_into(
    src: str | os.PathLike[str],
    dest_dir: int,
    dest_name: bytes,
    forbidden: frozenset[tuple[int, int]],
) -> Ingested:
    src_parent, src_name = os.path.split(os.path.abspath(os.fsencode(src)))
    if not src_name:
        src_parent, src_name = b"/", b"."
    spfd = os.open(src_parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.stat(src_name, dir_fd=spfd, follow_symlinks=False)
        copier = _Copier(forbidden, _hash_threads(st))
        copier.feed(nar.HEADER)
        copier.node(spfd, src_name, dest_dir, dest_name, st.st_mode)
    finally:
        os.close(spfd)
    return copier.ingested()


def _hash_threads(top: os.stat_result) -> int:
    """BLAKE3's threads for a source whose top is `top`; made here, they may run where
    this thread may (a daemon's worker spreads to every CPU before it adds)."""
    if stat.S_ISREG(top.st_mode) and top.st_size >= _THREADED:
        return min(len(os.sched_getaffinity(0)), _MAX_HASH_THREADS)
    return 1


def take_tree(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Ingested:
    """Move `src` to `dest`, which must not exist, and make it canonical there; or, on
    another file system, copy it.

    Only for a tree nothing else can reach any more, such as a finished build's output:
    its builder's processes are all dead, and none of them could pass a descriptor of it
    to a process outside the sandbox.  No file is made anew, where the disk is slowest.
    Returns the BLAKE3 hash and size of its archive.
    """
    try:
        os.rename(src, dest)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        return copy_tree(src, dest)
    parent, name = os.path.split(os.path.abspath(os.fsencode(dest)))
    pfd = os.open(parent, _DIR_FLAGS)
    try:
        settler = _Settler()
        settler.feed(nar.HEADER)
        settler.node(pfd, name, os.stat(name, dir_fd=pfd, follow_symlinks=False).st_mode)
    finally:
        os.close(pfd)
    return settler.ingested()


def copy_tree_as(
    src: str | os.PathLike[str], dest: str | os.PathLike[str], uid: int, gid: int, groups: list[int]
) -> Ingested:
    """`copy_tree`, with every access to `src` checked as uid:gid would be checked.

    The copy is made by this thread with the client's file-system ids into a private
    directory the client owns (inside the store's 0700 temporary area, which the client
    cannot search: the directory is reached through an fd opened as root), then handed to
    root file by file.
    """
    dest_b = os.fsencode(dest)
    box = dest_b + b".in"
    os.mkdir(box, 0o700)
    try:
        os.chown(box, uid, gid)
        box_fd = os.open(box, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # Found as root: the client may not search the directories above the box.
            forbidden = _this_and_above(box_fd)
            with reading_as(uid, gid, groups):
                got = _copy_into(src, box_fd, b"x", forbidden)
        finally:
            os.close(box_fd)
        _chown_tree(box + b"/x", 0, 0)
        os.rename(box + b"/x", dest_b)
    finally:
        remove_tree(box)
    return got


def _chown_tree(path: bytes, uid: int, gid: int) -> None:
    os.lchown(path, uid, gid)
    if stat.S_ISDIR(os.lstat(path).st_mode):
        for name in os.listdir(path):
            _chown_tree(path + b"/" + name, uid, gid)

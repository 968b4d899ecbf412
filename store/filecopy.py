"""A large file copied by the kernel while the copy is hashed behind it.

Through Python, a large file costs a read and a write of every byte, one thread hashing
it in between: three times the time of what the disk and the hash need (issue 24).  Here
the kernel copies (`copy_file_range`: no byte passes through this process; a reflink where
the file system shares blocks), slice by slice, in a helper thread, while the calling
thread hashes each slice of the *copy* as soon as it has landed, through a mapping, while
it is still in the page cache; with BLAKE3's own threads when the caller's hasher has
them.  The copy and the hash overlap, and neither waits on Python.

What is hashed is the copy, never the source: the daemon copies as root from a file its
client may rewrite while the add runs.  The copy may then hold a mix of old and new
bytes, but those are the bytes hashed and registered: nothing else can reach the copy in
the store's temporary area (0700, root's), so "hashed as written" holds as it does for
the buffered copy of `store.ingest`.  A source that shrinks or grows under the copy makes
the add fail, as there.
"""

import errno
import mmap
import os
import threading
from collections.abc import Callable

# Bytes the helper copies before the hasher may start on them: big enough that one
# hand-off per slice costs nothing beside it (at 2 GB/s, 16 ms a slice), small enough
# that the slice is still in the page cache, and the first one lands soon; a multiple
# of the mapping granularity, so that each slice is mapped at its own offset.
SLICE = 32 << 20
# What `copy_file_range` answers when the kernel cannot copy between these two files
# (other file systems, one that does not support it): the copy goes on through a buffer.
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
# The buffer of that fallback, as `store.ingest` reads.
_BUFFERED = 4 << 20

Feed = Callable[[bytes | mmap.mmap], None]


class SourceChanged(OSError):
    """The source changed while it was being copied; the add can be retried."""


class _Landed:
    """How much of the copy has landed, shared by the copying thread and the hashing one;
    the copier's error, or the hasher's order to stop."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.upto = 0
        self.error: BaseException | None = None
        self.stopped = False

    def advance(self, upto: int) -> None:
        with self._cond:
            self.upto = upto
            self._cond.notify()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self.error = error
            self._cond.notify()

    def wait_for(self, end: int) -> None:
        with self._cond:
            while self.upto < end and self.error is None:
                self._cond.wait()
            if self.error is not None:
                raise self.error


class _Copier:
    """Copies `size` bytes at the same offsets from one fd to the other, by the kernel
    while it can, then through a buffer."""

    def __init__(self, sfd: int, dfd: int, size: int, name: bytes) -> None:
        self.sfd, self.dfd, self.size, self.name = sfd, dfd, size, name
        self.kernel = True

    def run(self, landed: _Landed) -> None:
        try:
            off = 0
            while off < self.size and not landed.stopped:
                end = min(self.size, off + SLICE)
                while off < end:
                    off += self._some(off, end - off)
                landed.advance(off)
        except BaseException as e:  # handed to the hashing thread, which raises it
            landed.fail(e)

    def _some(self, off: int, count: int) -> int:
        if self.kernel:
            try:
                n = os.copy_file_range(self.sfd, self.dfd, count, off, off)
            except OSError as e:
                if e.errno not in _NO_KERNEL_COPY:
                    raise
                self.kernel = False
            else:
                if n:
                    return n
                # Zero before the end: the file shrank, or a file system (a pseudo or
                # network one) copies nothing it does not know the size of.  A read tells.
                self.kernel = False
        data = os.pread(self.sfd, min(count, _BUFFERED), off)
        if not data:
            raise SourceChanged(f"{os.fsdecode(self.name)}: shrank while being added")
        view = memoryview(data)
        at = off
        while view:
            written = os.pwrite(self.dfd, view, at)
            view, at = view[written:], at + written
        return len(data)


def copy_and_hash(sfd: int, dfd: int, size: int, feed: Feed, name: bytes) -> None:
    """Copy `size` bytes of `sfd` into `dfd` (new, empty, open for reading and writing)
    and `feed` the copy's bytes, in order, to the hasher: the copy in a helper thread
    when there is more than one slice, the hash here behind it."""
    copier = _Copier(sfd, dfd, size, name)
    landed = _Landed()
    helper = None
    if size > SLICE:
        helper = threading.Thread(target=copier.run, args=(landed,), name="weft-copy")
        helper.start()
    else:
        copier.run(landed)
    try:
        for off in range(0, size, SLICE):
            end = min(size, off + SLICE)
            landed.wait_for(end)
            with mmap.mmap(dfd, end - off, mmap.MAP_SHARED, mmap.PROT_READ, offset=off) as view:
                feed(view)
    finally:
        landed.stopped = True
        if helper is not None:
            helper.join()
    if os.pread(sfd, 1, size):
        raise SourceChanged(f"{os.fsdecode(name)}: grew while being added")

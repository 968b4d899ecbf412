"""Nix archives (NAR, "nix-archive-1"): streaming dump and a strict, streaming restore.

The format (Nix `src/libutil/archive.cc`): every field is a string, a u64 little-endian
length then the bytes then zero padding to a multiple of 8.  A node is
`( type regular [executable ""] contents <bytes> )`, `( type symlink target <t> )` or
`( type directory { entry ( name <n> node <node> ) } )` with entries in byte order.
Only the executable bit survives; times, owners and other modes are not archived, which
is what makes the serialisation canonical and its hash a content hash.

The parser trusts nothing: a hostile archive gets a `NarError` naming the offset and the
entry, and `restore` writes only below the destination it was given.
"""

import os
import stat
from collections.abc import Callable, Iterator

MAGIC = b"nix-archive-1"
MAX_DEPTH = 256
MAX_NAME = 255
MAX_TARGET = 4095
MAX_TOKEN = 16
ABSURD_LENGTH = 1 << 63
CHUNK = 1 << 20
# Framing is batched up to this many bytes before it is yielded, so a tree of many small
# files does not turn into a generator step per field.
_BATCH = 64 << 10


class NarError(ValueError):
    """An archive that is malformed, hostile, or not restorable."""


class UnsupportedFileType(ValueError):
    """A device, fifo or socket: the store holds only files, symlinks and directories."""


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 8)


def encode_str(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data + _pad(len(data))


_OPEN = encode_str(b"(")
CLOSE = encode_str(b")")
HEADER = encode_str(MAGIC)
_TYPE = _OPEN + encode_str(b"type")
REGULAR = _TYPE + encode_str(b"regular")
EXECUTABLE = encode_str(b"executable") + encode_str(b"")
CONTENTS = encode_str(b"contents")
SYMLINK = _TYPE + encode_str(b"symlink") + encode_str(b"target")
DIRECTORY = _TYPE + encode_str(b"directory")
_ENTRY = encode_str(b"entry") + _OPEN + encode_str(b"name")
_NODE = encode_str(b"node")


def file_header(executable: bool, size: int) -> bytes:
    """Everything of a regular file's node before its contents."""
    head = REGULAR + EXECUTABLE if executable else REGULAR
    return head + CONTENTS + size.to_bytes(8, "little")


def file_trailer(size: int) -> bytes:
    """Everything of a regular file's node after its contents."""
    return _pad(size) + CLOSE


def symlink_node(target: bytes) -> bytes:
    return SYMLINK + encode_str(target) + CLOSE


def entry_start(name: bytes) -> bytes:
    return _ENTRY + encode_str(name) + _NODE


ENTRY_END = CLOSE
DIRECTORY_END = CLOSE


def is_executable(mode: int) -> bool:
    return bool(mode & stat.S_IXUSR)


def sorted_names(directory: int | bytes) -> list[bytes]:
    """A directory's entry names in NAR order: by bytes, not by code point or locale."""
    if isinstance(directory, bytes):
        return sorted(os.listdir(directory))
    return sorted(map(os.fsencode, os.listdir(directory)))


def dump(path: str | bytes | os.PathLike[str]) -> Iterator[bytes]:
    """Yield the archive of `path` in chunks; memory stays bounded for any file size."""
    root = os.fsencode(path)
    batch = bytearray(HEADER)
    for piece in _dump_node(root):
        if len(piece) >= _BATCH or len(batch) + len(piece) > _BATCH:
            if batch:
                yield bytes(batch)
                batch.clear()
            if len(piece) >= _BATCH:
                yield piece
                continue
        batch += piece
    if batch:
        yield bytes(batch)


def _dump_node(path: bytes) -> Iterator[bytes]:
    st = os.lstat(path)
    if stat.S_ISREG(st.st_mode):
        yield from _dump_file(path)
    elif stat.S_ISLNK(st.st_mode):
        yield symlink_node(os.readlink(path))
    elif stat.S_ISDIR(st.st_mode):
        yield DIRECTORY
        for name in sorted_names(path):
            yield entry_start(name)
            yield from _dump_node(path + b"/" + name)
            yield ENTRY_END
        yield DIRECTORY_END
    else:
        raise UnsupportedFileType(f"{os.fsdecode(path)}: not a regular file, symlink or directory")


def _dump_file(path: bytes) -> Iterator[bytes]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        size = st.st_size
        yield file_header(is_executable(st.st_mode), size)
        left = size
        while left:
            data = os.read(fd, min(left, CHUNK))
            if not data:
                raise NarError(f"{os.fsdecode(path)}: file shrank while being archived")
            left -= len(data)
            yield data
        if os.read(fd, 1):
            raise NarError(f"{os.fsdecode(path)}: file grew while being archived")
        yield file_trailer(size)
    finally:
        os.close(fd)


class _Reader:
    """Buffered reads from a `read(n) -> bytes` source, counting every byte consumed."""

    def __init__(self, read: Callable[[int], bytes], observe: Callable[[bytes], object] | None):
        self._read = read
        self._observe = observe
        self._buf = b""
        self._pos = 0
        self.offset = 0

    def _fill(self, want: int) -> bytes:
        data = self._read(max(want, CHUNK))
        if data and self._observe is not None:
            self._observe(data)
        return data

    def exact(self, n: int) -> bytes:
        avail = len(self._buf) - self._pos
        if n <= avail:
            out = self._buf[self._pos : self._pos + n]
            self._pos += n
            self.offset += n
            return out
        parts = [self._buf[self._pos :]]
        need = n - avail
        self._buf, self._pos = b"", 0
        while need:
            data = self._fill(need)
            if not data:
                raise NarError(
                    f"archive truncated at byte {self.offset + n - need}: "
                    f"{need} more bytes expected"
                )
            if len(data) > need:
                parts.append(data[:need])
                self._buf, self._pos = data, need
                need = 0
            else:
                parts.append(data)
                need -= len(data)
        self.offset += n
        return b"".join(parts)

    def chunks(self, n: int) -> Iterator[bytes]:
        """Yield exactly `n` bytes in pieces of bounded size."""
        while n:
            avail = len(self._buf) - self._pos
            if not avail:
                data = self._fill(min(n, CHUNK))
                if not data:
                    raise NarError(
                        f"archive truncated at byte {self.offset}: {n} more bytes expected"
                    )
                self._buf, self._pos = data, 0
                avail = len(data)
            take = min(avail, n)
            piece = self._buf[self._pos : self._pos + take]
            self._pos += take
            self.offset += take
            n -= take
            yield piece

    def at_eof(self) -> bool:
        if self._pos < len(self._buf):
            return False
        data = self._fill(1)
        if data:
            self._buf, self._pos = data, 0
            return False
        return True


class _Parser:
    def __init__(self, reader: _Reader):
        self.r = reader

    def fail(self, where: bytes, msg: str) -> NarError:
        shown = os.fsdecode(where) or "/"
        return NarError(f"invalid archive at byte {self.r.offset} (entry {shown!r}): {msg}")

    def string(self, limit: int, where: bytes, what: str) -> bytes:
        n = int.from_bytes(self.r.exact(8), "little")
        if n > limit:
            raise self.fail(where, f"{what} of {n} bytes exceeds the limit of {limit}")
        data = self.r.exact(n)
        if n % 8 and self.r.exact(8 - n % 8).strip(b"\0"):
            raise self.fail(where, f"non-zero padding after {what}")
        return data

    def token(self, where: bytes) -> bytes:
        return self.string(MAX_TOKEN, where, "tag")

    def expect(self, want: bytes, where: bytes) -> None:
        got = self.token(where)
        if got != want:
            raise self.fail(where, f"expected {want.decode()!r}, found {got!r}")

    def node(self, dir_fd: int, name: bytes, where: bytes, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise self.fail(where, f"nesting deeper than {MAX_DEPTH} levels")
        self.expect(b"(", where)
        self.expect(b"type", where)
        kind = self.token(where)
        if kind == b"regular":
            self.regular(dir_fd, name, where)
        elif kind == b"symlink":
            self.expect(b"target", where)
            target = self.string(MAX_TARGET, where, "symlink target")
            if not target:
                raise self.fail(where, "empty symlink target")
            if b"\0" in target:
                raise self.fail(where, "symlink target contains NUL")
            self.expect(b")", where)
            os.symlink(target, name, dir_fd=dir_fd)
            os.utime(name, (1, 1), dir_fd=dir_fd, follow_symlinks=False)
        elif kind == b"directory":
            self.directory(dir_fd, name, where, depth)
        else:
            raise self.fail(where, f"unknown node type {kind!r}")

    def regular(self, dir_fd: int, name: bytes, where: bytes) -> None:
        tag = self.token(where)
        executable = tag == b"executable"
        if executable:
            if self.string(0, where, "executable marker"):
                raise self.fail(where, "executable marker is not empty")
            tag = self.token(where)
        if tag != b"contents":
            raise self.fail(where, f"expected 'contents', found {tag!r}")
        size = int.from_bytes(self.r.exact(8), "little")
        if size >= ABSURD_LENGTH:
            raise self.fail(where, f"absurd file length {size}")
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dir_fd,
        )
        try:
            for piece in self.r.chunks(size):
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view) :]
            os.fchmod(fd, 0o555 if executable else 0o444)
            os.utime(fd, (1, 1))
        finally:
            os.close(fd)
        if size % 8 and self.r.exact(8 - size % 8).strip(b"\0"):
            raise self.fail(where, "non-zero padding after file contents")
        self.expect(b")", where)

    def directory(self, parent_fd: int, name: bytes, where: bytes, depth: int) -> None:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
        fd = os.open(
            name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd
        )
        try:
            previous: bytes | None = None
            while True:
                tag = self.token(where)
                if tag == b")":
                    break
                if tag != b"entry":
                    raise self.fail(where, f"expected 'entry' or ')', found {tag!r}")
                self.expect(b"(", where)
                self.expect(b"name", where)
                child = self.string(MAX_NAME, where, "entry name")
                child_where = where + b"/" + child
                check_name(child, lambda msg, w=child_where: self.fail(w, msg))
                if previous is not None and child <= previous:
                    what = "duplicate" if child == previous else "unsorted"
                    raise self.fail(child_where, f"{what} entry after {previous!r}")
                previous = child
                self.expect(b"node", child_where)
                self.node(fd, child, child_where, depth + 1)
                self.expect(b")", child_where)
            os.fchmod(fd, 0o555)
            os.utime(fd, (1, 1))
        finally:
            os.close(fd)


def check_name(name: bytes, fail: Callable[[str], Exception]) -> None:
    if not name:
        raise fail("empty entry name")
    if name in (b".", b".."):
        raise fail(f"entry name {name!r} is not allowed")
    if b"/" in name or b"\0" in name:
        raise fail(f"entry name {name!r} contains '/' or NUL")
    if len(name) > MAX_NAME:
        raise fail(f"entry name longer than {MAX_NAME} bytes")


def restore(
    read: Callable[[int], bytes],
    dest: str | bytes | os.PathLike[str],
    observe: Callable[[bytes], object] | None = None,
) -> int:
    """Parse the archive from `read` and write its tree at `dest`, which must not exist.

    Returns the archive's size.  Every byte read is passed to `observe` (a hasher's
    `update`, say).  The tree is written canonical: mtime 1, modes 0444/0555.  On error a
    partial tree may remain at `dest`; the caller restores into a temporary place and
    removes it, so nothing half-made lands.
    """
    dest_b = os.fsencode(dest)
    parent, _, name = dest_b.rpartition(b"/")
    parser = _Parser(_Reader(read, observe))
    if parser.string(MAX_TOKEN, b"", "magic") != MAGIC:
        raise NarError("not a Nix archive: bad magic")
    parent_fd = os.open(parent or b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parser.node(parent_fd, name, b"", 0)
    finally:
        os.close(parent_fd)
    if not parser.r.at_eof():
        raise NarError(f"trailing garbage after the archive at byte {parser.r.offset}")
    return parser.r.offset

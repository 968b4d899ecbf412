"""Deduplication: identical files in the store become hard links to one `.links/<hash>`.

The hash covers a file's contents and its executable bit (the two things an archive
records of it), so linked files never differ in what anyone can observe through the
store.  A file is replaced atomically: a new link to the `.links` entry is made under a
temporary name and renamed over it.  Too many links (EMLINK) or a full directory
(ENOSPC) leaves that file as it is.  The collector removes `.links` entries left with one
link; an entry that vanishes between our look and our link is simply made again.
"""

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import blake3

from store import base32
from store.tmparea import TmpArea

_CHUNK = 1 << 20


@dataclass(slots=True)
class OptimiseStats:
    paths: int = 0
    files_linked: int = 0
    bytes_saved: int = 0


def optimise_paths(
    paths: Iterable[str], links_dir: Path, tmp: TmpArea, stats: OptimiseStats | None = None
) -> OptimiseStats:
    stats = stats or OptimiseStats()
    for path in paths:
        stats.paths += 1
        if os.path.isdir(path) and not os.path.islink(path):
            for dirpath, _, filenames in os.walk(path):
                for name in filenames:
                    _optimise_file(os.path.join(dirpath, name), links_dir, tmp, stats)
        else:
            _optimise_file(path, links_dir, tmp, stats)
    return stats


def _file_hash(path: str, executable: bool) -> str:
    hasher = blake3.blake3(b"x" if executable else b"-")
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
    return base32.encode(hasher.digest())


def _optimise_file(path: str, links_dir: Path, tmp: TmpArea, stats: OptimiseStats) -> None:
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return
        link = links_dir / _file_hash(path, bool(st.st_mode & 0o100))
    except FileNotFoundError:
        return  # collected while we looked
    for _ in range(3):
        try:
            os.link(path, link)
            return  # this file is now the shared copy
        except FileExistsError:
            pass
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno in (errno.EMLINK, errno.ENOSPC):
                return
            raise
        try:
            if os.lstat(link).st_ino == st.st_ino:
                return
        except FileNotFoundError:
            continue  # the collector removed the entry: make it again
        if _replace_with_link(path, link, tmp):
            stats.files_linked += 1
            if st.st_nlink == 1:
                stats.bytes_saved += st.st_size
        return


def _replace_with_link(path: str, link: Path, tmp: TmpArea) -> bool:
    temp = tmp.new_entry()
    try:
        os.link(link, temp)
    except FileNotFoundError:
        return False
    except OSError as e:
        if e.errno in (errno.EMLINK, errno.ENOSPC):
            return False
        raise
    try:
        _rename_into_store(temp, path)
    except FileNotFoundError:
        return False
    finally:
        # rename() between two links of one file does nothing and leaves `temp`.
        if os.path.lexists(temp):
            os.unlink(temp)
    return True


def _rename_into_store(temp: Path, path: str) -> None:
    try:
        os.rename(temp, path)
    except PermissionError:
        # A store directory is read-only even for its owner; root needs no help.
        parent = os.path.dirname(path)
        mode = os.lstat(parent).st_mode
        os.chmod(parent, mode | 0o200)
        try:
            os.rename(temp, path)
        finally:
            os.chmod(parent, stat.S_IMODE(mode))

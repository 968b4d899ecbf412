"""Store path names: validation and the fingerprint that gives a path its hash part.

See docs/store-paths.md for the fingerprint and why each field is in it.
"""

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

import blake3

from store import base32

HASH_PART_LEN = 32
HASH_PART_BYTES = 20
MAX_NAME_LEN = 211
_NAME_RE = re.compile(r"[A-Za-z0-9+\-._?=]+")
FINGERPRINT_VERSION = "weft-path-1"


class InvalidPath(ValueError):
    """A string that is not a well-formed store path or store path name."""


class PathKind(Enum):
    SOURCE = "source"
    TEXT = "text"
    OUTPUT = "output"


def validate_name(name: str) -> str:
    if not name:
        raise InvalidPath("store path name is empty")
    if len(name) > MAX_NAME_LEN:
        raise InvalidPath(f"store path name {name[:40]!r}... is longer than {MAX_NAME_LEN}")
    if name.startswith("."):
        raise InvalidPath(f"store path name {name!r} starts with a period")
    if not _NAME_RE.fullmatch(name):
        bad = next(c for c in name if not _NAME_RE.fullmatch(c))
        raise InvalidPath(f"store path name {name!r} contains the forbidden character {bad!r}")
    return name


@dataclass(frozen=True, slots=True)
class StorePath:
    """A parsed `<store dir>/<hash part>-<name>`."""

    store_dir: str
    hash_part: str
    name: str

    def __str__(self) -> str:
        return f"{self.store_dir}/{self.hash_part}-{self.name}"

    @property
    def base_name(self) -> str:
        return f"{self.hash_part}-{self.name}"

    @classmethod
    def parse(cls, path: str, store_dir: str) -> "StorePath":
        # Every query of the daemon parses each path it names, mostly paths it parsed a
        # moment ago (a build request's whole closure, each time it is asked for): those
        # are remembered.
        return _parsed(path, store_dir)

    @classmethod
    def _parse(cls, path: str, store_dir: str) -> "StorePath":
        # One match for a good one, the checks one by one (and their messages) for the rest.
        good = _path_pattern(store_dir).fullmatch(path)
        if good is not None and not good[2].startswith("."):
            return cls(store_dir.rstrip("/"), good[1], good[2])
        prefix = store_dir.rstrip("/") + "/"
        if not path.startswith(prefix):
            raise InvalidPath(f"path {path!r} is not in the store {store_dir!r}")
        return cls.from_base_name(path[len(prefix) :], store_dir)

    @classmethod
    def from_base_name(cls, base: str, store_dir: str) -> "StorePath":
        hash_part, dash, name = base.partition("-")
        if not dash or len(hash_part) != HASH_PART_LEN or not base32.is_valid(hash_part):
            raise InvalidPath(f"{base!r} is not a store path base name (<hash>-<name>)")
        validate_name(name)
        return cls(store_dir.rstrip("/"), hash_part, name)


# Paths `StorePath.parse` remembers: a few large closures' worth, each entry a hundred
# bytes or two besides the path, which its caller holds anyway.
PARSED_PATHS = 16384


# Only paths that parse are kept (an exception is not cached), each as its immutable record.
@functools.lru_cache(maxsize=PARSED_PATHS)
def _parsed(path: str, store_dir: str) -> StorePath:
    return StorePath._parse(path, store_dir)


@functools.lru_cache(maxsize=4)  # a process has one store dir, tests a few
def _path_pattern(store_dir: str) -> re.Pattern[str]:
    """A well-formed store path in `store_dir`, but for a name starting with a period."""
    hash_part = f"[{base32.ALPHABET}]{{{HASH_PART_LEN}}}"
    name = f"{_NAME_RE.pattern}".removesuffix("+") + f"{{1,{MAX_NAME_LEN}}}"
    return re.compile(f"{re.escape(store_dir.rstrip('/'))}/({hash_part})-({name})")


def fingerprint(
    kind: PathKind,
    content_hash: str,
    store_dir: str,
    name: str,
    references: Iterable[str] = (),
    self_reference: bool = False,
) -> str:
    refs = sorted(set(references))
    if self_reference:
        refs.append("self")
    return ":".join(
        # `_value_`, the member's own attribute: `.value` is a property costing what the rest
        # of a fingerprint does.
        [FINGERPRINT_VERSION, kind._value_, content_hash, store_dir, name, ",".join(refs)]
    )


def make_store_path(
    kind: PathKind,
    content_hash: str,
    store_dir: str,
    name: str,
    references: Iterable[str] = (),
    self_reference: bool = False,
) -> StorePath:
    store_dir = store_dir.rstrip("/")
    validate_name(name)
    fp = fingerprint(kind, content_hash, store_dir, name, references, self_reference)
    return StorePath(store_dir, _hash_part(fp), name)


def store_path(
    kind: PathKind, content_hash: str, store_dir: str, name: str, references: Iterable[str] = ()
) -> str:
    """`make_store_path`'s path as the string its callers mostly want, without the parsed
    object: a recipe computes two per derivation, and the daemon one per `.drv` it is
    sent again (`add-texts`)."""
    store_dir = store_dir.rstrip("/")
    validate_name(name)
    fp = fingerprint(kind, content_hash, store_dir, name, references)
    return f"{store_dir}/{_hash_part(fp)}-{name}"


def _hash_part(fingerprint: str) -> str:
    # The length as a positional argument: the binding parses a keyword argument in three
    # times what the hash of a fingerprint takes.
    return base32.encode(blake3.blake3(fingerprint.encode()).digest(HASH_PART_BYTES))

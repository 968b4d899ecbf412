"""The store's vocabulary: the records it answers with (its errors: `store/errors.py`).

Kept apart from the code that makes them so that every part of the store, and its callers,
can name them without importing the `Store` class.
"""

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True)
class PathInfo:
    path: str
    nar_hash: str
    nar_size: int
    references: tuple[str, ...]
    registration_time: int
    deriver: str | None = None
    ca: str | None = None
    sigs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NewPath:
    """A path built in the temporary area, ready to be renamed into place and registered."""

    entry: Path
    path: str
    nar_hash: str
    nar_size: int
    references: tuple[str, ...]
    ca: str | None = None
    deriver: str | None = None
    # The bytes of a one-file path this process wrote to `entry` itself (a text): what
    # checks its contents reads from here, not from the disk again.
    contents: bytes | None = None


@dataclass(frozen=True, slots=True)
class Reader:
    """A user whose permissions apply to reading a source."""

    uid: int
    gid: int
    groups: tuple[int, ...]


@dataclass(slots=True)
class VerifyReport:
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    # (path, hash registered, hash found)
    mismatched: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.mismatched


@dataclass(slots=True)
class ByDeriver:
    """Paths split by whether a valid derivation can build them again (for repair)."""

    # derivation -> the paths among those asked about that it built, in the order asked
    rebuildable: dict[str, list[str]] = field(default_factory=dict)
    # not valid, without a deriver, or whose deriver is not valid; in the order asked
    orphans: list[str] = field(default_factory=list)

"""Durable directories and snapshot scopes: what of a stopped build is worth keeping.

A build that stops before it finishes (paused under memory pressure, failed, or committed
on request) has written things another attempt could reuse: a compiler cache, a test
database.  A derivation names those directories under `/build` (`durableDirs`, in recipes
`derivation(..., durable_dirs={"ccache": "/build/ccache"})`), and two settings say what a
stop keeps: `full`, everything the build wrote (its build directory, its `/tmp`, partial
outputs), or `data`, the durable directories only; `on-pause` for a pause, `on-commit` for a
commit (issue 22, after agent-substrate's DurableDir and SnapshotScope).

The declaration is part of the derivation, so it enters the derivation's hash: a build
that keeps different directories is a different build.  The scope settings do NOT enter
the hash: they say what to keep of a build, not what it builds, and the same `.drv` path
results whatever they are.

The rules are substrate's, plus "under /build", checked here without I/O so that a recipe,
the store's check of an added `.drv` and the daemon's requests refuse the same things with
the same words.  A path is one a sandbox can bind and a snapshot can record unambiguously:
no `:` (a mount option separator), no control character, no `.` or `..` component, no empty
one.  A scope no one knows is refused; substrate turns it into `full` with a warning, but a
typo that silently keeps everything is not what the user asked for.
"""

from collections.abc import Mapping
from enum import StrEnum

from store.errors import StoreError

# Substrate's limit; each is bound into the sandbox and copied at each stop, and 8 is
# more than a build's caches and databases.
MAX_DURABLE_DIRS = 8
# A DNS label (RFC 1123), as substrate's names: they name snapshot members and files.
MAX_NAME_LENGTH = 63
# PATH_MAX: longer cannot be opened in one call.
MAX_PATH_LENGTH = 4096
ROOT = "/build/"
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


class DurableDirError(StoreError, ValueError):
    """A durable directory declaration that breaks the rules (a `StoreError`: refused as a
    bad request)."""


class ScopeError(StoreError, ValueError):
    """A snapshot scope unknown, or `on-pause`/`on-commit` breaking the subset rule."""


class Scope(StrEnum):
    FULL = "full"  # everything the build wrote
    DATA = "data"  # its durable directories only


def check_durable_dirs(dirs: Mapping[str, str], where: str = "") -> Mapping[str, str]:
    """`dirs` (name -> path), refused with the directory named if any breaks the rules."""
    if not isinstance(dirs, Mapping):
        raise DurableDirError(f"{where}durable directories must be a mapping of name to path")
    if len(dirs) > MAX_DURABLE_DIRS:
        raise DurableDirError(
            f"{where}{len(dirs)} durable directories, over the {MAX_DURABLE_DIRS} a derivation "
            "may declare (MAX_DURABLE_DIRS)"
        )
    for name, path in dirs.items():
        _check_name(name, where)
        _check_path(name, path, where)
    seen: dict[str, str] = {}
    # Pairwise: at most MAX_DURABLE_DIRS of them.
    for name, path in dirs.items():
        for other_name, other in seen.items():
            if other == path:
                raise DurableDirError(
                    f"{where}durable directories {other_name!r} and {name!r} are both {path!r}"
                )
            inner, outer = (
                (name, other_name) if path.startswith(other + "/") else (other_name, name)
            )
            if path.startswith(other + "/") or other.startswith(path + "/"):
                raise DurableDirError(
                    f"{where}durable directory {inner!r} ({dirs[inner]!r}) is inside "
                    f"{outer!r} ({dirs[outer]!r}): they may not nest"
                )
        seen[name] = path
    return dirs


def _check_name(name: object, where: str) -> None:
    if not isinstance(name, str):
        raise DurableDirError(f"{where}durable directory name {name!r} is not a string")
    if (
        not 0 < len(name) <= MAX_NAME_LENGTH
        or not set(name) <= _NAME_CHARS
        or name.startswith("-")
        or name.endswith("-")
    ):
        raise DurableDirError(
            f"{where}durable directory name {name!r} is not a DNS label: 1 to "
            f"{MAX_NAME_LENGTH} lowercase letters, digits and '-', not starting or ending in '-'"
        )


def _check_path(name: str, path: object, where: str) -> None:
    what = f"{where}durable directory {name!r}"
    if not isinstance(path, str):
        raise DurableDirError(f"{what}: its path {path!r} is not a string")
    if not path.startswith(ROOT) or path == ROOT:
        raise DurableDirError(f"{what}: {path!r} is not a directory under {ROOT}")
    if len(path) > MAX_PATH_LENGTH:
        raise DurableDirError(
            f"{what}: its path is {len(path):,} characters, over {MAX_PATH_LENGTH:,} (PATH_MAX)"
        )
    if path.endswith("/"):
        raise DurableDirError(f"{what}: {path!r} ends in '/'")
    if "//" in path:
        raise DurableDirError(f"{what}: {path!r} has an empty component ('//')")
    if ":" in path:
        raise DurableDirError(f"{what}: {path!r} has a ':'")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise DurableDirError(f"{what}: {path!r} has a control character")
    if any(part in (".", "..") for part in path.split("/")):
        raise DurableDirError(f"{what}: {path!r} has a '.' or '..' component")


def parse_scope(value: object, what: str = "scope") -> Scope:
    """`full` or `data`; anything else refused (not turned into `full`)."""
    try:
        return Scope(value)
    except ValueError:
        known = ", ".join(s.value for s in Scope)
        raise ScopeError(f"{what}: unknown snapshot scope {value!r} (one of {known})") from None


def check_scopes(on_pause: Scope | str | None, on_commit: Scope | str | None) -> None:
    """Refuse unknown scopes, and a commit that would keep more than a pause: with
    `on-pause = data` a paused build keeps only its durable directories, so a commit
    after it can keep no more.  Unset means `full`, written inline as substrate does."""
    pause = None if on_pause is None else parse_scope(on_pause, "on-pause")
    commit = None if on_commit is None else parse_scope(on_commit, "on-commit")
    if not ((pause or Scope.FULL) == Scope.FULL or (commit or Scope.FULL) == (pause or Scope.FULL)):
        raise ScopeError(
            f"on-commit ({commit or 'unset, so full'}) must be a subset of on-pause "
            f"({pause}): with on-pause = data, set on-commit = data too"
        )

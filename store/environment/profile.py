"""Profiles: store paths that describe an environment.

A profile is a one-file store path holding canonical JSON:

    {"weft-profile": 1, "name": "tools", "members": ["/store/...-hello", ...],
     "env": {"version": 1, "values": {...}}}

`members` are the store paths whose software the environment offers (they are the
profile's references, so its closure holds them), `env` the explicit delta in uenv's view
format.  Each member also contributes search paths, as Guix's native search paths do:
with the default table, a member with a `bin` directory has it prepended to PATH, one
with `lib/pkgconfig` to PKG_CONFIG_PATH, and so on, in member order.  An explicit scalar
for a variable of the table wins over its search path.

Any other store path named where a profile is expected is a profile of that one member
with no explicit delta, as `guix shell hello` needs no manifest.
"""

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from store.environment.delta import Delta, DeltaError, ListOp, ListUpdate, merge
from store.environment.view import parse_view, to_view

PROFILE_FORMAT = 1
PROFILE_KEY = "weft-profile"
# A profile is a name, store paths and a few variables: a megabyte is thousands of
# members.  Anything larger is not read into memory to find out.
MAX_PROFILE_SIZE = 1 << 20
# Variable -> directories of a member, prepended in this order (Guix's native search
# paths for the same software); `search-paths` in weft.toml replaces the table.
DEFAULT_SEARCH_PATHS: dict[str, list[str]] = {
    "PATH": ["bin", "sbin"],
    "MANPATH": ["share/man"],
    "INFOPATH": ["share/info"],
    "PKG_CONFIG_PATH": ["lib/pkgconfig", "share/pkgconfig"],
    "ACLOCAL_PATH": ["share/aclocal"],
    "C_INCLUDE_PATH": ["include"],
    "CPLUS_INCLUDE_PATH": ["include"],
    "LIBRARY_PATH": ["lib"],
    "XDG_DATA_DIRS": ["share"],
    "TERMINFO_DIRS": ["share/terminfo"],
}


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    members: tuple[str, ...]
    env: Delta = field(default_factory=Delta)

    def to_json(self) -> str:
        doc = {
            PROFILE_KEY: PROFILE_FORMAT,
            "name": self.name,
            "members": list(self.members),
            "env": to_view(self.env),
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def delta(self, table: Mapping[str, Sequence[str]], skip: Iterable[str] = ()) -> Delta:
        """The search paths of the members, then the explicit delta.  A variable this
        profile sets as a scalar, or one in `skip` (those other profiles of the same run
        set as scalars), gets no search path: the scalar says what it is."""
        searched = search_path_delta(self.members, table, skip={*self.env.scalars, *skip})
        return merge([searched, self.env])


def search_path_delta(
    members: Iterable[str], table: Mapping[str, Sequence[str]], skip: Iterable[str] = ()
) -> Delta:
    """One prepend per variable of `table`: each member's directories that exist, in
    member order.  A directory counts only if it resolves inside the store: the daemon
    looks as root, and a member's link to `/root/x` must not tell anyone whether that
    exists."""
    members = list(members)
    skipped = set(skip)
    lists: dict[str, tuple[ListUpdate, ...]] = {}
    for var, dirs in table.items():
        if var in skipped:
            continue
        found = [f"{m}/{d}" for m in members for d in dirs if _store_dir_at(m, d)]
        if found:
            lists[var] = (ListUpdate(ListOp.PREPEND, tuple(found)),)
    return Delta({}, lists)


def _store_dir_at(member: str, relative: str) -> bool:
    # Both resolved: the state dir's own path may go through a link.
    store_dir = os.path.realpath(os.path.dirname(member)) + "/"
    where = os.path.realpath(f"{member}/{relative}")
    return where.startswith(store_dir) and os.path.isdir(where)


def parse_profile(text: str | bytes, where: str = "") -> Profile:
    """A profile's JSON, every field checked; DeltaError naming what is wrong."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise DeltaError(f"{where}malformed profile: {e}") from None
    if not isinstance(doc, dict) or doc.get(PROFILE_KEY) != PROFILE_FORMAT:
        raise DeltaError(f"{where}not a weft profile (format {PROFILE_FORMAT})")
    unknown = sorted(set(doc) - {PROFILE_KEY, "name", "members", "env"})
    if unknown:
        raise DeltaError(f"{where}unknown fields {unknown} in a profile")
    name, members = doc.get("name"), doc.get("members", [])
    if not isinstance(name, str) or not name:
        raise DeltaError(f"{where}a profile's name must be a non-empty string")
    if not isinstance(members, list) or not all(
        isinstance(m, str) and os.path.isabs(m) for m in members
    ):
        raise DeltaError(f"{where}profile {name}: members must be absolute store paths")
    env = parse_view(doc.get("env", {"version": 1}), f"{where}profile {name}: ")
    return Profile(name, tuple(members), env)


def read_profile(path: str) -> Profile:
    """The profile at store path `path`: its JSON if it is a weft profile, else a profile
    of that one path.  A file that says it is a profile and is not one is an error."""
    name = os.path.basename(path).partition("-")[2] or os.path.basename(path)
    if not os.path.isfile(path) or os.path.islink(path):
        return Profile(name, (path,))
    with open(path, "rb") as f:
        head = f.read(MAX_PROFILE_SIZE + 1)
    if not head.lstrip().startswith(b"{") or f'"{PROFILE_KEY}"'.encode() not in head:
        return Profile(name, (path,))
    if len(head) > MAX_PROFILE_SIZE:
        raise DeltaError(f"{path}: a profile larger than {MAX_PROFILE_SIZE} bytes")
    return parse_profile(head, f"{path}: ")

"""Who is on the other end of a connection, and what they may do.

`SO_PEERCRED` gives the client's pid, uid and gid as the kernel saw them at connect time.
`allowed-users` and `trusted-users` in weft.toml name users, `@group`s, or `*`, as in
nix.conf.  Untrusted users may query, add sources and build; operations that change the
daemon or import paths it cannot check are for trusted users only.
"""

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from daemon.settings import Settings
from store.store import Reader

_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int
    user: str
    trusted: bool


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _groups_of(user: str, gid: int) -> set[str]:
    try:
        gids = os.getgrouplist(user, gid)
    except (KeyError, OSError):
        gids = [gid]
    names = set()
    for g in gids:
        try:
            names.add(grp.getgrgid(g).gr_name)
        except KeyError:
            continue
    return names


def reader_for(peer: Peer) -> Reader | None:
    """Whose permissions reading a source on the peer's behalf takes: the peer's (with its
    groups), or None when the peer is the daemon's own user.  Only root can take another
    user's permissions, so a daemon of one user refuses to read for any other."""
    if peer.uid == os.geteuid():
        return None
    if os.geteuid() != 0:
        raise PermissionError("this daemon can read paths only for its own user")
    try:
        groups = os.getgrouplist(peer.user, peer.gid)
    except (KeyError, OSError):
        groups = [peer.gid]
    return Reader(peer.uid, peer.gid, tuple(groups))


def matches(patterns: list[str], uid: int, gid: int, user: str) -> bool:
    groups: set[str] | None = None
    for p in patterns:
        if p == "*" or p == user or p == str(uid):
            return True
        if p.startswith("@"):
            if groups is None:
                groups = _groups_of(user, gid)
            if p[1:] in groups:
                return True
    return False


def identify(pid: int, uid: int, gid: int, settings: Settings) -> Peer | None:
    """The peer, or None if `allowed-users` does not let it in."""
    user = user_name(uid)
    trusted = uid == 0 or uid == os.geteuid() or matches(settings.trusted_users, uid, gid, user)
    if not trusted and not matches(settings.allowed_users, uid, gid, user):
        return None
    return Peer(pid, uid, gid, user, trusted)


def refusal(uid: int, socket_path: str, settings_path: str, allowed: list[str]) -> str:
    """Why a client is turned away: who it is, which daemon, and the setting to change."""
    return (
        f"user {user_name(uid)} (uid {uid}) may not use the daemon at {socket_path}: "
        f"it is not in allowed-users = {allowed!r} ({settings_path})"
    )


def socket_access(socket_dir: Path, settings: Settings) -> None:
    """Make the socket's directory enforce `allowed-users` where the file system can.

    Everyone allowed: the directory is searchable by all.  Only root and one `@group`:
    the directory is 0750 with that group.  Only the daemon's own user: 0700.  Any other
    mix cannot be said with one group, so the directory stays open and the check after
    accept is what refuses.
    """
    allowed = [a for a in settings.allowed_users if a not in ("root", "0")]
    groups = [a[1:] for a in allowed if a.startswith("@")]
    mode, gid = 0o755, -1
    if "*" in allowed:
        pass
    elif not allowed:
        mode = 0o700
    elif len(groups) == 1 and len(allowed) == 1:
        try:
            gid = grp.getgrnam(groups[0]).gr_gid
            mode = 0o750
        except KeyError:
            mode = 0o700
    os.chown(socket_dir, -1, gid)
    os.chmod(socket_dir, mode)

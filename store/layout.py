"""Where a weft state dir keeps things, and the settings file inside it.

<state dir>/           0755
  weft.toml          settings, read by the daemon (daemon/settings.py)
  store/             0755  the store dir: <hash>-<name> paths, nothing else visible
    .links/          0755  one hard link per distinct file, for dedup
    .tmp/            0700  adds in progress and deletions, named after their owner process
  var/               the socket's dir: its mode follows `allowed-users` (daemon/rpc/auth.py)
    db/db.sqlite     0700, 0600  the database (WAL)
    gcroots/         0700  GC roots (auto/ holds indirect ones, runtimes/ those of
                           running programs' profiles: daemon/runtime/)
    log/             0700  build logs
    runtimes/        0700  runtimes' records and captured environments, which hold
                           users' secrets: never in the store or its database

Who may read what (docs/store-paths.md): the store is everyone's to read, as in Nix; the
daemon's records (the database, the roots, the logs) and its scratch are its own, and
users see them through the daemon, which applies `allowed-users`.  The modes are set
whatever the umask, and the private ones put right on every start.
"""

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from store.defaults import default_state_dir, has_store

SETTINGS_FILE = "weft.toml"
PUBLIC = 0o755
PRIVATE = 0o700


class ConfigError(ValueError):
    """A settings file or state dir that cannot be used."""


@dataclass(frozen=True, slots=True)
class StateDir:
    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike[str] | None = None) -> "StateDir":
        path = Path(root) if root is not None else Path(default_state_dir())
        path = Path(os.path.abspath(path))
        if any(c in str(path) for c in ":,\0"):
            # The store dir is part of every path's fingerprint, joined with ':' and ','.
            raise ConfigError(f"state dir {str(path)!r} may not contain ':', ',' or NUL")
        return cls(path)

    @property
    def store_dir(self) -> Path:
        return self.root / "store"

    @property
    def links_dir(self) -> Path:
        return self.store_dir / ".links"

    @property
    def tmp_dir(self) -> Path:
        return self.store_dir / ".tmp"

    @property
    def db_dir(self) -> Path:
        return self.root / "var" / "db"

    @property
    def db_path(self) -> Path:
        return self.db_dir / "db.sqlite"

    @property
    def gcroots_dir(self) -> Path:
        return self.root / "var" / "gcroots"

    @property
    def log_dir(self) -> Path:
        return self.root / "var" / "log"

    @property
    def runtime_roots_dir(self) -> Path:
        return self.gcroots_dir / "runtimes"

    @property
    def runtimes_dir(self) -> Path:
        return self.root / "var" / "runtimes"

    @property
    def settings_path(self) -> Path:
        return self.root / SETTINGS_FILE

    def has_store(self) -> bool:
        return has_store(str(self.root))

    def create(self) -> None:
        """Make what is missing, each with its mode (`PRIVATE` ones made so if they were
        not: a state dir made by an older weft had its database world-readable)."""
        if not self.root.is_dir():
            self.root.mkdir(mode=PUBLIC, parents=True, exist_ok=True)
            os.chmod(self.root, PUBLIC)
        var = self.root / "var"
        for d, mode in (
            (self.store_dir, PUBLIC),
            (self.links_dir, PUBLIC),
            (self.tmp_dir, PRIVATE),
            (var, PUBLIC),
            (self.db_dir, PRIVATE),
            (self.gcroots_dir, PRIVATE),
            (self.gcroots_dir / "auto", PRIVATE),
            (self.runtime_roots_dir, PRIVATE),
            (self.log_dir, PRIVATE),
            (self.runtimes_dir, PRIVATE),
        ):
            try:
                d.mkdir(mode=mode)
            except FileExistsError:
                if mode != PRIVATE:
                    continue
            # mkdir's mode passes through the umask; a private dir is put right as well.
            if stat.S_IMODE(os.stat(d).st_mode) != mode:
                os.chmod(d, mode)

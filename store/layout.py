"""Where a weft state dir keeps things, and the settings file inside it.

<state dir>/
  weft.toml          settings, read by the daemon (daemon/settings.py)
  store/             the store dir: <hash>-<name> paths, nothing else visible
    .links/          one hard link per distinct file, for dedup
    .tmp/            adds in progress and deletions, named after their owner process
  var/db/db.sqlite   the database (WAL)
  var/gcroots/       GC roots (auto/ holds indirect ones)
  var/log/           build logs
"""

import os
from dataclasses import dataclass
from pathlib import Path

from store.defaults import default_state_dir

SETTINGS_FILE = "weft.toml"


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
    def settings_path(self) -> Path:
        return self.root / SETTINGS_FILE

    def create(self) -> None:
        for d, mode in (
            (self.root, 0o755),
            (self.store_dir, 0o755),
            (self.links_dir, 0o755),
            (self.tmp_dir, 0o700),
            (self.db_dir, 0o755),
            (self.gcroots_dir, 0o755),
            (self.gcroots_dir / "auto", 0o755),
            (self.log_dir, 0o755),
        ):
            d.mkdir(mode=mode, parents=True, exist_ok=True)

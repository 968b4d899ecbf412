"""`weft.toml`: the daemon's settings, read by the daemon.

The store library knows where the file is (`StateDir.settings_path`) and nothing of what
is in it: each setting is a knob of the daemon's, which hands the store what it needs
(`auto-optimise`, say) as arguments.
"""

import tomllib
from dataclasses import dataclass, field, fields
from typing import Any

from store.layout import SETTINGS_FILE, ConfigError, StateDir


@dataclass(frozen=True, slots=True)
class Settings:
    """`weft.toml`; keys are spelled with dashes in the file, as in nix.conf."""

    allowed_users: list[str] = field(default_factory=lambda: ["*"])
    trusted_users: list[str] = field(default_factory=lambda: ["root"])
    # Host paths bound read-only into every sandbox (a host compiler, say).
    sandbox_paths: list[str] = field(default_factory=list)
    # A root daemon maps build slot N's user to host uid and gid build-uid-base + N.
    build_uid_base: int = 30000
    build_slots: int = 64
    # Builds at once (0: one per core), and what builders are told to use each.
    max_jobs: int = 0
    cores: int = 0
    # Garbage collection, as nix.conf defines them: keep the derivations that built live
    # paths, keep the outputs of live derivations; before builds, collect when free space
    # is under min-free bytes, until max-free bytes are free (0: disabled, no limit).
    keep_derivations: bool = True
    keep_outputs: bool = False
    min_free: int = 0
    max_free: int = 0
    # Hard-link identical files of every new path through store/.links.
    auto_optimise: bool = False
    # The daemon's threads and the locker share one CPU (daemon/proc/cpus.py).
    share_cpu: bool = True
    # While builds run, idle CPUs poll for work instead of halting (daemon/proc/wakeups.py):
    # machine-wide, so opt-in.
    quick_wakeups: bool = False
    # A sandbox may get a network namespace a finished build left (docs/sandbox.md).
    reuse_network_namespaces: bool = True
    # Load-adaptive scheduling (docs/scheduling.md).  Pressure limits are the % of time
    # some task stalled on the resource; 0 turns a limit off.
    max_cpu_pressure: float = 60.0
    max_memory_pressure: float = 20.0
    max_io_pressure: float = 80.0
    max_load_per_core: float = 0.0
    min_free_memory_mib: int = 0
    load_resume_fraction: float = 0.5
    pause_memory_pressure: float = 50.0
    load_sample_interval: float = 1.0
    # Where the load signals are read from: /proc, or a directory a test writes.
    load_proc_dir: str = "/proc"
    retries: int = 2
    retry_backoff: float = 1.0
    retry_timeout_factor: float = 2.0
    retry_drain: bool = True

    @classmethod
    def from_toml(cls, text: str, source: str = SETTINGS_FILE) -> "Settings":
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source}: {e}") from None
        defaults = cls()
        known = {f.name.replace("_", "-"): f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            attr = known.get(key)
            if attr is None:
                raise ConfigError(f"{source}: unknown setting {key!r}")
            want = type(getattr(defaults, attr))
            if want is float and type(value) is int:
                value = float(value)
            if not isinstance(value, want):
                raise ConfigError(
                    f"{source}: {key} must be a {want.__name__}, not {type(value).__name__}"
                )
            values[attr] = value
        return cls(**values)


def read_settings(state: StateDir) -> Settings:
    """The state dir's `weft.toml`, or the defaults if it has none."""
    try:
        text = state.settings_path.read_text()
    except FileNotFoundError:
        return Settings()
    return Settings.from_toml(text, str(state.settings_path))

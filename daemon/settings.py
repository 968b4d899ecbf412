"""`weft.toml`: the daemon's settings, read by the daemon.

The store library knows where the file is (`StateDir.settings_path`) and nothing of what
is in it: each setting is a knob of the daemon's, which hands the store what it needs
(`auto-optimise`, say) as arguments.
"""

import difflib
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import PurePosixPath
from typing import Any

from daemon.remote.policy import Policy, parse_policy
from store.durabledirs import Scope, ScopeError, check_scopes, parse_scope
from store.environment.delta import valid_name
from store.environment.profile import DEFAULT_SEARCH_PATHS
from store.layout import SETTINGS_FILE, ConfigError, StateDir

# Environment variables whose values a runtime's stored environments never hold (their
# names matched as globs, in any case): the usual names of passwords, tokens and keys.
DEFAULT_RUNTIME_REDACT = (
    "*PASSWORD*",
    "*PASSWD*",
    "*SECRET*",
    "*TOKEN*",
    "*_KEY",
    "*CREDENTIAL*",
    "*COOKIE*",
)


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
    # Seconds between SIGTERM and SIGKILL for a build with environments stopped over a
    # limit or cancelled, in which its exit actions run; and what an action over its own
    # timeout gets (docs/environments.md).  A build without environments gets KILL_GRACE.
    environment_grace: float = 10.0
    retries: int = 2
    retry_backoff: float = 1.0
    retry_timeout_factor: float = 2.0
    retry_drain: bool = True
    # Variable -> directories of a profile's members prepended to it (store-run;
    # store/environment/profile.py): the whole table, replacing the default one.
    search_paths: dict[str, list[str]] = field(
        default_factory=lambda: {var: list(dirs) for var, dirs in DEFAULT_SEARCH_PATHS.items()}
    )
    # Globs of variable names dropped from the environments stored with a runtime
    # (daemon/runtime/); the command still gets them.
    runtime_redact: list[str] = field(default_factory=lambda: list(DEFAULT_RUNTIME_REDACT))
    # What a build keeps when the scheduler pauses it and when it fails or is committed
    # (`full` or `data`, docs/snapshots.md), unless its request says; "": not set.  Never
    # part of a derivation: the same .drv whatever they are.
    snapshot_on_pause: str = ""
    snapshot_on_commit: str = ""
    # Remote builds on a REAPI engine (docs/remote.md): where it listens (`unix:///abs`,
    # `grpc://host:port` or `host:port`; "": remote builds off), its instance name, how
    # many remote builds run at once, platform properties the Action carries beside
    # weft's own, which builds go (`all`, `overflow`, `none`; "": `overflow`), and whether
    # a build goes on locally while the engine cannot be reached.
    remote_endpoint: str = ""
    remote_instance: str = ""
    remote_max_jobs: int = 4
    remote_platform: dict[str, str] = field(default_factory=dict)
    remote_policy: str = ""
    remote_fallback: bool = True

    @property
    def on_pause(self) -> Scope | None:
        return Scope(self.snapshot_on_pause) if self.snapshot_on_pause else None

    @property
    def on_commit(self) -> Scope | None:
        return Scope(self.snapshot_on_commit) if self.snapshot_on_commit else None

    @property
    def remote(self) -> Policy:
        """The configured remote policy (`effective` makes it none without an endpoint)."""
        return Policy(self.remote_policy) if self.remote_policy else Policy.OVERFLOW

    @classmethod
    def from_toml(cls, text: str, source: str = SETTINGS_FILE) -> "Settings":
        """The settings a file gives, each checked for its type and range, and against the
        others: a value that would make every build fail or hang is refused at start, with
        the key and what it may be."""
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
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{source}: unknown setting {key!r}{hint}")
            values[attr] = _checked(source, key, value, getattr(defaults, attr))
        settings = cls(**values)
        settings.check_together(source)
        return settings

    def check_together(self, source: str = SETTINGS_FILE) -> None:
        """What no one setting's range can say."""
        if self.max_jobs > self.build_slots:
            raise ConfigError(
                f"{source}: max-jobs = {self.max_jobs} is more than build-slots = "
                f"{self.build_slots}: each build takes a slot; raise build-slots too"
            )
        if self.build_uid_base + self.build_slots - 1 > MAX_UID:
            raise ConfigError(
                f"{source}: build-uid-base + build-slots - 1 = "
                f"{self.build_uid_base + self.build_slots - 1} is past the highest uid ({MAX_UID})"
            )
        try:
            check_scopes(self.on_pause, self.on_commit)
        except ScopeError as e:
            raise ConfigError(f"{source}: snapshot-on-pause and snapshot-on-commit: {e}") from None
        if 0 < self.max_free < self.min_free:
            raise ConfigError(
                f"{source}: max-free = {self.max_free} is under min-free = {self.min_free}: "
                "it must be 0 (no limit) or at least min-free"
            )


# The highest uid the kernel accepts: (uid_t)-1 means "no change" to chown and setresuid.
MAX_UID = 2**32 - 2
# Numbers' allowed ranges, inclusive, and why.  Every number has one: TOML can say nan,
# inf and negative numbers, and none of those means anything here.
RANGES: dict[str, tuple[float, float]] = {
    # uid 0 is root; the top is checked with build-slots.
    "build_uid_base": (1, MAX_UID),
    # No slot, no build: builds would wait forever.  65,536 is the id range /etc/subuid
    # hands a user; each running build takes one slot, so more is never of use.
    "build_slots": (1, 65536),
    # 0: one per core; above build-slots is refused with it.
    "max_jobs": (0, 65536),
    # What builders are told to use; 0: all.  8,192 is the most CPUs a Linux kernel
    # (x86_64, NR_CPUS) can have.
    "cores": (0, 8192),
    # Bytes; SQLite and the kernel count in signed 64 bits.
    "min_free": (0, 2**63 - 1),
    "max_free": (0, 2**63 - 1),
    # Pressure is the percent of time some task stalled; 0 turns the limit off.
    "max_cpu_pressure": (0, 100),
    "max_memory_pressure": (0, 100),
    "max_io_pressure": (0, 100),
    "pause_memory_pressure": (0, 100),
    # Load average per core; 0: off.  Past a few hundred a machine no longer answers.
    "max_load_per_core": (0, 1000),
    # MiB; 2**30 MiB is a PiB, more than any machine has.
    "min_free_memory_mib": (0, 2**30),
    # Under 5% of a limit is as good as never (pressure seldom reads 0: paused builds would
    # never resume); over 1, builds would resume while still over the limit.
    "load_resume_fraction": (0.05, 1),
    # Seconds.  Each sample reads several /proc files: under 50 ms sampling is itself load;
    # over a minute, admission acts on stale load.
    "load_sample_interval": (0.05, 60),
    # Seconds.  Under a tenth of a second no exit action could even start; past an
    # hour, a build stopped or cancelled would hold its slot longer than most builds take.
    "environment_grace": (0.1, 3600),
    # Each retry is a whole build again.
    "retries": (0, 100),
    # Seconds before the first retry, doubled for each further one.
    "retry_backoff": (0, 3600),
    # Remote builds at once: each holds an Execute stream, and a thread of the engine's
    # (BuildGrid refuses with RESOURCE_EXHAUSTED past its pool); 256 is far past a farm's.
    "remote_max_jobs": (1, 256),
    # Under 1 a retry of a timed-out build would get less time than the one that timed out.
    "retry_timeout_factor": (1, 100),
}
# Settings naming a snapshot scope: `full` or `data` (an unknown one is refused, not
# taken for `full`: store/durabledirs.py).
SCOPES = ("snapshot_on_pause", "snapshot_on_commit")
# Settings naming host paths: absolute, and there (a sandbox path that is not makes every
# build fail at its bind mount).
HOST_PATHS = ("sandbox_paths", "load_proc_dir")


def _checked(source: str, key: str, value: Any, default: Any) -> Any:
    """`value` of setting `key`, of the default's type and in its range."""
    want = type(default)
    if want is float and type(value) is int:
        value = float(value)
    # bool is an int to isinstance: `build-slots = true` is no count.
    if type(value) is not want:
        kind = {int: "an integer", float: "a number", bool: "true or false", dict: "a table"}.get(
            want
        )
        raise ConfigError(
            f"{source}: {key} must be {kind or 'a ' + want.__name__}, not {type(value).__name__}"
        )
    attr = key.replace("-", "_")
    if want in (int, float):
        low, high = RANGES[attr]
        if not low <= value <= high:  # NaN compares false both ways
            raise ConfigError(
                f"{source}: {key} = {value} is out of range: it must be {low}..{high}"
            )
    if want is list and not all(type(v) is str and v for v in value):
        raise ConfigError(f"{source}: {key} must be a list of non-empty strings")
    if attr == "remote_platform":
        _check_platform(source, key, value)
    elif want is dict:
        _check_search_paths(source, key, value)
    if attr == "remote_policy":
        try:
            parse_policy(value, key)
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
    if attr == "remote_endpoint" and value and not ENDPOINT.fullmatch(value):
        raise ConfigError(
            f"{source}: {key}: {value!r} is not unix:///ABSOLUTE/PATH, grpc://HOST:PORT or "
            "HOST:PORT"
        )
    if attr in SCOPES:
        try:
            parse_scope(value, key)
        except ScopeError as e:
            raise ConfigError(f"{source}: {e}") from None
    if attr in HOST_PATHS:
        for path in value if want is list else [value]:
            if not os.path.isabs(path) or not os.path.exists(path):
                raise ConfigError(f"{source}: {key}: {path!r} is not an absolute path that exists")
    return value


def _check_search_paths(source: str, key: str, table: dict[str, Any]) -> None:
    """Each key a variable name a delta may set, each value directories inside a member:
    relative, with no `..` (a member's search path must not name what is outside it) and
    no `:` (which would split the entry in two)."""
    for var, dirs in table.items():
        if not valid_name(var):
            raise ConfigError(
                f"{source}: {key}: {var!r} is not a variable name (letters, digits and '_', "
                "not starting with a digit)"
            )
        if type(dirs) is not list or not all(type(d) is str and d for d in dirs):
            raise ConfigError(f"{source}: {key}.{var} must be a list of non-empty strings")
        for d in dirs:
            if os.path.isabs(d) or ".." in PurePosixPath(d).parts or ":" in d or "\0" in d:
                raise ConfigError(
                    f"{source}: {key}.{var}: {d!r} must be a directory relative to a member, "
                    "without '..' or ':'"
                )


# What `remote-endpoint` may be: a Unix socket by absolute path, or a host and port
# (TLS is not supported: docs/remote.md).
ENDPOINT = re.compile(r"unix:///\S+|(grpc://)?[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}")
# Platform properties weft sets itself on every Action (docs/remote.md).
OWN_PROPERTIES = ("weft-store-dir", "OSFamily", "ISA")


def _check_platform(source: str, key: str, table: dict[str, Any]) -> None:
    """Extra platform properties: strings, none of weft's own names."""
    for name, value in table.items():
        if type(value) is not str or not name:
            raise ConfigError(f"{source}: {key}.{name} must be a string")
        if name in OWN_PROPERTIES:
            raise ConfigError(f"{source}: {key}.{name} is set by weft itself")


def read_settings(state: StateDir) -> Settings:
    """The state dir's `weft.toml`, or the defaults if it has none."""
    try:
        text = state.settings_path.read_text()
    except FileNotFoundError:
        return Settings()
    return Settings.from_toml(text, str(state.settings_path))

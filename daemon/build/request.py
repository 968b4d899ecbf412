"""What a build request asks for (`BuildOptions`) and what it gets back for each
derivation (a `Result`, in a `State`): plain records, encoded once, at the rpc edge
(`daemon/rpc/ops/build.py`)."""

import enum
from dataclasses import dataclass

from daemon.remote.policy import Policy
from store.durabledirs import Scope
from store.snapshots import SnapshotRecord

# The limits of one build when its request sets none.  Nix sets none by default; weft
# bounds every build, loosely enough that a build making progress is never cut short:
# a day, so that a stuck builder is stopped at last;
DEFAULT_TIMEOUT = 24 * 3600.0
# an hour without output: a builder waiting for input that never comes is stopped, a long
# step that prints nothing (a big link) has ample time;
DEFAULT_MAX_SILENT_TIME = 3600.0
# 64 MiB of log: the daemon holds a build's whole log until it is stored, and a builder
# printing in a loop reaches this within seconds.
DEFAULT_MAX_LOG_SIZE = 64 << 20

# The most a request may ask for.  Time limits: a year, finite, so that deadlines, and a
# retry's limits (`retry-timeout-factor` times the last), stay numbers.
MAX_TIME_LIMIT = 365 * 24 * 3600.0
# Log size: the daemon holds a build's whole log in memory until it is stored.
MAX_LOG_SIZE = 1 << 30
# Retries: the back-off doubles for each, so ten already wait 17 minutes at the default
# `retry-backoff` of 1 s.
MAX_RETRIES = 10
# Builds at once (`-j`): the build slots bound them anyway; as many as a connection may
# have requests in flight.
MAX_JOBS = 1024


@dataclass(frozen=True)
class BuildOptions:
    max_jobs: int
    keep_going: bool = False
    check: bool = False
    # uid and gid of the user to whom a failed build's directory is handed, if any.
    keep_failed_for: tuple[int, int] | None = None
    timeout: float = DEFAULT_TIMEOUT
    max_silent_time: float = DEFAULT_MAX_SILENT_TIME
    max_log_size: int = DEFAULT_MAX_LOG_SIZE
    # None: the daemon's retry policy; 0: no retries; N: N retries, flakiness expected.
    retries: int | None = None
    # The snapshot scopes in effect (docs/snapshots.md): the request's over weft.toml's;
    # None: not set (the settings' then, if they set one).
    on_pause: Scope | None = None
    on_commit: Scope | None = None
    # A committed snapshot (checked by `SnapshotService.check_resume`) that seeds the
    # build of the request's one derivation, `resume_into` (set by `Builder.build`).
    resume_from: SnapshotRecord | None = None
    resume_into: str = ""
    # The requesting uid: it owns the snapshots its builds leave.
    owner: int = 0
    # Which builds go to the remote engine (`--remote`); None: weft.toml's `remote-policy`.
    remote: Policy | None = None


class State(enum.StrEnum):
    """Where a derivation of a request ended up; the values are the wire's `status`."""

    BUILT = "built"
    VALID = "valid"  # its outputs were there already
    CHECKED = "checked"  # built again and compared (`--check`)
    FAILED = "failed"
    DEPENDENCY_FAILED = "dependency-failed"
    CANCELLED = "cancelled"  # never built: an earlier build failed, or the request ended

    @property
    def succeeded(self) -> bool:
        """Whether its outputs are valid: what its dependents may build on."""
        return self in (State.BUILT, State.VALID, State.CHECKED)


@dataclass(frozen=True)
class Outcome:
    state: State
    message: str | None = None
    # Attempts at building it (0: none, by this request or one it waited for).
    attempts: int = 0
    flaky: bool = False
    # A check's verdict: its outputs built again are bit for bit the registered ones.
    identical: bool | None = None


@dataclass(frozen=True)
class Result:
    """What a request gets for one of the derivations it named."""

    drv: str
    outputs: dict[str, str]  # output name -> store path
    outcome: Outcome

"""Whether a failed build is tried again, and how: no I/O.

A failure may be the machine's fault rather than the derivation's: a test that times
itself fails when other builds load the CPU, a build is OOM-killed because others took
the memory.  Such a failure is retried (up to `retries`, default 2): with less contention
(the running builds drain to half the parallelism the failed attempt saw, down to running
alone), after an exponential back-off, with a longer timeout.

Never retried: a hash mismatch or a missing output (the builder ran and produced the
wrong thing), an exit code of 126 or 127 (the shell could not run a command, or found
none: no load causes that), a derivation marked `noRetry`, and by default a failure that
repeats at low load, or repeats the attempt before it exactly (cause and exit code) at
low load.  A first failure at low load is retried only when the derivation is known to
be flaky or failed differently under pressure earlier in this run.
An eviction (a build whose `on-pause` scope is `data`, killed under memory pressure:
`scheduler.py`) is no failure: it is tried again once the pressure falls, whatever the
policy, and counts against no retry budget.
An explicit retry count (`store-build --retries N`, or `retries` in the derivation's
environment) says the user expects flakiness: every failure but the deterministic ones is
retried, up to N times.
"""

import enum
from dataclasses import dataclass

from daemon.settings import Settings
from store.history import DETERMINISTIC_EXITS


class Cause(enum.StrEnum):
    EXIT = "exit"  # a non-zero exit code
    SIGNAL = "signal"  # killed by a signal weft did not send
    OOM = "oom"  # killed by a signal while the kernel's OOM killer was at work
    TIMEOUT = "timeout"
    SILENT = "silent"
    LOG_LIMIT = "log-limit"
    MISSING_OUTPUT = "missing-output"
    HASH_MISMATCH = "hash-mismatch"
    REFUSED = "refused"  # the store refused the outputs for another reason
    SETUP = "setup"  # sandbox, locks or store failed around the build
    # Killed by the scheduler under memory pressure (on-pause = data): requeued, and never
    # handed to `decide`.
    EVICTED = "evicted"


# Failures another attempt would meet again.
DETERMINISTIC = frozenset({Cause.HASH_MISMATCH, Cause.MISSING_OUTPUT})
# Failures that load can cause: what the default policy retries when the machine was loaded.
LOAD_SENSITIVE = frozenset({Cause.EXIT, Cause.SIGNAL, Cause.TIMEOUT, Cause.SILENT})


@dataclass(frozen=True)
class RetrySettings:
    retries: int = 2
    backoff: float = 1.0  # seconds before the first retry; doubled for each further one
    timeout_factor: float = 2.0  # each retry's timeout is this times the previous one's
    # Retries wait for less contention.  Off, they run at once at the same parallelism
    # (with no back-off either, that is what a naive retry does).
    drain: bool = True

    @classmethod
    def from_settings(cls, s: Settings) -> "RetrySettings":
        return cls(s.retries, s.retry_backoff, s.retry_timeout_factor, s.retry_drain)


@dataclass(frozen=True)
class Failed:
    """One failed attempt, as the policy sees it."""

    cause: Cause
    loaded: bool  # under pressure, or alongside other builds, during the attempt
    parallelism: int  # the most builds running at once during the attempt
    exit_code: int | None = None

    def same_as(self, other: "Failed") -> bool:
        """The same failure: what a deterministic one does when tried again."""
        return (self.cause, self.exit_code) == (other.cause, other.exit_code)


@dataclass(frozen=True)
class Decision:
    retry: bool
    why: str
    cap: int | None = None  # builds at most running (the retry included) while it runs
    delay: float = 0.0
    timeout_factor: float = 1.0


def classify(cause: Cause, signalled: bool, oom_during: bool) -> Cause:
    """An exit by a signal nobody in weft sent is an OOM kill when the OOM killer ran."""
    if cause is Cause.EXIT and signalled:
        return Cause.OOM if oom_during else Cause.SIGNAL
    return cause


def decide(
    failures: list[Failed],
    allowed: int,
    explicit: bool,
    marked_no_retry: bool,
    known_flaky: bool,
    settings: RetrySettings,
) -> Decision:
    """Whether to try again after `failures` (this run's attempts so far, all failed)."""
    last = failures[-1]
    n = len(failures)
    if last.cause in DETERMINISTIC:
        return Decision(False, f"{last.cause} is deterministic")
    if last.cause is Cause.EXIT and last.exit_code in DETERMINISTIC_EXITS:
        said = DETERMINISTIC_EXITS[last.exit_code]
        return Decision(False, f"exit code {last.exit_code} ({said}) is deterministic")
    if n > allowed:
        return Decision(False, "retries are off" if allowed == 0 else f"{n} attempts made")
    if explicit:
        why = f"retries requested ({allowed})"
    elif marked_no_retry:
        return Decision(False, "the derivation is marked noRetry")
    elif last.cause is Cause.OOM:
        why = "killed while the OOM killer was at work"
    elif last.cause not in LOAD_SENSITIVE:
        return Decision(False, f"a {last.cause} failure is not retried by default")
    elif last.loaded:
        why = "failed while the machine was under pressure"
    elif n > 1 and last.same_as(failures[-2]):
        return Decision(False, "failed the same way again, at low load")
    elif all(f.loaded for f in failures[:-1]) and (known_flaky or n > 1):
        # The first failure at low load of a derivation that failed under load before, or
        # is known to be flaky: one more chance.  A second one is a repeat.
        why = "known to be flaky" if known_flaky else "failed under pressure before"
    else:
        return Decision(False, "failed at low load")
    return Decision(
        True,
        why,
        cap=max(1, last.parallelism // 2) if settings.drain else None,
        delay=settings.backoff * 2 ** (n - 1),
        timeout_factor=settings.timeout_factor**n,
    )

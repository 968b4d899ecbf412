"""What a build request hears as it goes: its progress as typed events, not text.

The build room reports these records to a request's `Listener`; the rpc edge
(`daemon/rpc/ops/build.py`) encodes each as a `log` frame whose `kind` says which it is
(docs/protocol.md), so that a client tells a builder's log line from a note without
reading the words.  `message` is the line a person reads: the words the daemon always
said, which clients that know no `kind` show as they are.
"""

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from store.derivation import drv_name


class Activity(enum.StrEnum):
    """What a started build does, in the words of its `Started` line."""

    BUILD = "building"
    CHECK = "checking"  # built again to compare (`--check`)
    REPAIR = "repairing"  # built again to replace corrupt or missing outputs


@dataclass(slots=True)
class Note:
    """Something for people: "3 derivations to build, 2 present", "free space was low...";
    `done` and `total` set when it moves the request's progress."""

    text: str
    drv: str | None = None
    done: int | None = None
    total: int | None = None

    @property
    def message(self) -> str:
        return self.text


@dataclass(slots=True)
class Started:
    """A build this request waits for began."""

    drv: str
    activity: Activity = Activity.BUILD

    @property
    def message(self) -> str:
        return f"{self.activity} {drv_name(self.drv)}"


@dataclass(slots=True)
class Built:
    """A derivation built, the `done`-th of the request's `total`."""

    drv: str
    attempts: int
    flaky: bool
    done: int
    total: int

    @property
    def message(self) -> str:
        note = f" on attempt {self.attempts}" if self.attempts > 1 else ""
        return f"built {drv_name(self.drv)}{note}" + (" (flaky)" if self.flaky else "")


@dataclass(slots=True)
class Failed:
    """A build failed for good, after the retry policy had its say; `why` is the
    policy's reason not to go on, where retries were allowed or made ("" otherwise).
    (The failure itself is in the request's result.)"""

    drv: str
    why: str

    @property
    def message(self) -> str:
        if not self.why:
            return f"{drv_name(self.drv)}: failed"
        return f"{drv_name(self.drv)}: not retried: {self.why}"


@dataclass(slots=True)
class LogLine:
    """A line the builder wrote."""

    drv: str
    line: str

    @property
    def message(self) -> str:
        return f"{drv_name(self.drv)}> {self.line}"


@dataclass(slots=True)
class Retried:
    """A failed attempt is followed by attempt `attempt` of at most `attempts`, after
    `delay` seconds, at most `cap` builds running then (None: as many as before)."""

    drv: str
    attempt: int
    attempts: int
    delay: float
    cap: int | None
    why: str

    @property
    def message(self) -> str:
        at = f"at most {self.cap} build(s) at once" if self.cap else "at the same parallelism"
        return (
            f"retrying {drv_name(self.drv)} (attempt {self.attempt} of {self.attempts}) "
            f"in {self.delay:g} s, {at}: {self.why}"
        )


Event = Note | Started | Built | Failed | LogLine | Retried
# Where a request's events go (the client's connection); it may raise trio's
# BrokenResourceError or ClosedResourceError once the client has gone.
Listener = Callable[[Event], Awaitable[None]]

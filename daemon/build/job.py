"""A build in progress, as the requests that wait for it see it (`Job`), and what the
request that runs it hears as it goes (`Hooks`).

The build's progress goes to every waiting client in turn, and the build waits for each:
its log is read only as fast as it is passed on.  A client that stops reading must not
stall the build for the others, so one that takes no event for `LISTENER_STALL` hears
no more of it (it still gets its result).
"""

from dataclasses import dataclass, field
from typing import Protocol

import trio

from daemon.build.events import Event, Listener
from daemon.sched.scheduler import Running

# A listener's event waits only while the client's connection has over 4 MiB queued
# (`connection.HIGH_WATER`): one that reads nothing of that for this long has stopped.
LISTENER_STALL = 5.0


class Hooks(Protocol):
    """What the request running a build hears of it, on the loop."""

    def registered(self) -> None:
        """The outputs are valid: builds that need them may start."""


class NoHooks:
    """For a build no request's graph waits on (a check, a repair)."""

    def registered(self) -> None:
        pass


NO_HOOKS = NoHooks()


@dataclass(eq=False)
class Job:
    drv_path: str
    # The requester's hooks: it runs the build; the others wait for `done`.
    hooks: Hooks = NO_HOOKS
    listeners: list[Listener] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)
    error: str | None = None  # why it failed, once done
    run: Running | None = None  # the scheduler's record of the attempt in progress
    attempts: int = 0
    flaky: bool = False

    async def tell(self, event: Event) -> None:
        """Pass an event to every client waiting on the build; one that has gone, or
        stopped reading, is dropped."""
        for listener in list(self.listeners):
            with trio.move_on_after(LISTENER_STALL) as waited:
                try:
                    await listener(event)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.listeners.remove(listener)
            if waited.cancelled_caught:
                self.listeners.remove(listener)

"""A build in progress, as the requests that wait for it see it (`Job`), and what the
request that runs it hears as it goes (`Hooks`)."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from daemon.build.events import Event, Listener
from daemon.sched.scheduler import Running


class Hooks(Protocol):
    """What the request running a build hears of it, on the loop."""

    def spawned(self) -> None:
        """The builder runs (`ahead.py` takes dependents' locks then)."""

    def placed(self) -> None:
        """The outputs are in the store, their registration not committed yet: builds
        that need them may start (`early.py`)."""

    def registered(self) -> None:
        """The outputs are valid."""

    async def may_register(self) -> str | None:
        """Asked before the outputs are registered: why they must not be (an input whose
        registration failed after it was placed, `early.py`), or None once every input
        is valid."""


class NoHooks:
    """For a build no request's graph waits on (a check, a repair)."""

    def spawned(self) -> None:
        pass

    def placed(self) -> None:
        pass

    def registered(self) -> None:
        pass

    async def may_register(self) -> str | None:
        return None


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
    spawned: bool = False  # a builder runs or ran
    # What the requests that joined call once a builder runs.
    _on_spawn: list[Callable[[], None]] = field(default_factory=list)

    def running(self) -> None:
        """Its builder runs."""
        self.spawned = True
        self.hooks.spawned()
        for call in self._on_spawn:
            call()

    def when_spawned(self, call: Callable[[], None]) -> None:
        """`call()` once a builder runs: now, if one does."""
        if self.spawned:
            call()
        else:
            self._on_spawn.append(call)

    async def tell(self, event: Event) -> None:
        """Pass an event to every client waiting on the build; one that has gone is
        dropped."""
        for listener in list(self.listeners):
            try:
                await listener(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.listeners.remove(listener)

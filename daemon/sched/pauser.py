"""Pausing a build: the one interface the scheduler pauses and resumes sandboxes through.

Two implementations: the freezer (`freezer.py`, a cgroup per build, frozen at once) and
its fallback, signals (`sigstop.py`, SIGSTOP and SIGCONT of the sandbox's process tree).
The composition root (`daemon/compose.py`) picks the freezer when the machine has a usable
hierarchy, else signals; a build whose cgroup cannot be written any more goes on with
signals (`scheduler.Running`).
"""

from typing import Protocol

from daemon.proc.processes import Process


class Pauser(Protocol):
    @property
    def cgroups(self) -> str:
        """Where the spawner makes each sandbox's cgroup (`SpawnRequest.freezer`); "" for
        none."""
        ...

    def pause(self, proc: Process) -> None:
        """Stop the builder `proc` and everything it started.  OSError: it cannot be done
        this way (the caller falls back to signals)."""
        ...

    def resume(self, proc: Process) -> None:
        """Let a paused builder go on; OSError as for `pause`."""
        ...

    def reaped(self, proc: Process) -> None:
        """The builder is reaped: what was made for it goes (in a worker thread)."""
        ...

    def close(self) -> None:
        """The daemon stops: what is left goes."""
        ...

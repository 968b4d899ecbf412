"""Pausing a build's whole process tree with SIGSTOP, and resuming it with SIGCONT.

The builder is pid 1 of its own pid namespace; everything it starts is its descendant
(orphans are reparented to it, not to us), so its tree is the sandbox.  The tree is
found through `/proc/<pid>/task/<tid>/children`.  Stopping goes top down and is repeated
until no new process turns up: a parent still running while we walk may fork.

Signals from the daemon, in an ancestor pid namespace, reach the namespace's init even
without a handler, so SIGSTOP stops the builder itself too.  A stop shows in the waitpid
status only with WUNTRACED, which the process monitor does not ask for: stopping does not
disturb reaping.  A cgroup freezer is atomic (`freezer.py`); this is its fallback, and the
pauser where no freezer hierarchy is usable (`pauser.py`).
"""

import contextlib
import os
import signal

from daemon.proc.processes import Process


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return found


def tree(pid: int) -> list[int]:
    """`pid` and its descendants, parents before children."""
    order, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        order.append(p)
        todo.extend(_children(p))
    return order


def _signal(pids: list[int], sig: int) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)


def stop_tree(pid: int) -> None:
    stopped: set[int] = set()
    while True:
        new = [p for p in tree(pid) if p not in stopped]
        if not new:
            return
        _signal(new, signal.SIGSTOP)
        stopped.update(new)


def continue_tree(pid: int) -> None:
    # Children first: a parent resumed first could see them stopped and act on it.
    _signal(list(reversed(tree(pid))), signal.SIGCONT)


class Signals:
    """The `Pauser` by signals: nothing to make for a build, nothing to remove after."""

    cgroups = ""

    def pause(self, proc: Process) -> None:
        stop_tree(proc.pid)

    def resume(self, proc: Process) -> None:
        continue_tree(proc.pid)

    def reaped(self, proc: Process) -> None:
        pass

    def close(self) -> None:
        pass


SIGNALS = Signals()

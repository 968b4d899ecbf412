"""Child processes of the daemon, each with one reaper: its own pidfd.

`spawn` uses posix_spawn (clone with CLONE_VFORK and exec: safe in a process with threads,
unlike fork), opens a pidfd for the child at once, and `Process.wait` waits for the pidfd
to become readable on the trio loop and then reaps that child, and only that child, with
`waitid(P_PIDFD)`.  An exit status is kept until asked for, however late.
"""

import os
import signal
from collections.abc import Mapping, Sequence

import trio


class Process:
    def __init__(self, pid: int, argv: Sequence[str]) -> None:
        self.pid = pid
        self.argv = list(argv)
        self.pidfd: int | None = os.pidfd_open(pid)
        self.returncode: int | None = None
        self._watched = False
        self._exited = trio.Event()

    async def wait(self) -> int:
        """The exit code, or -N for a death by signal N."""
        if self.returncode is None and not self._watched:
            # One system task watches the pidfd (trio allows one waiter per fd), so any
            # number of callers can wait, and be cancelled, without losing the status.
            self._watched = True
            trio.lowlevel.spawn_system_task(self._watch)
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    async def _watch(self) -> None:
        assert self.pidfd is not None
        await trio.lowlevel.wait_readable(self.pidfd)
        self._reap()

    def _reap(self) -> None:
        assert self.pidfd is not None
        info = os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED)
        assert info is not None
        self.returncode = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        trio.lowlevel.notify_closing(self.pidfd)
        os.close(self.pidfd)
        self.pidfd = None
        self._exited.set()

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        if self.pidfd is not None:
            signal.pidfd_send_signal(self.pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def spawn(
    argv: Sequence[str],
    fds: Mapping[int, int] | None = None,
    env: Mapping[str, str] | None = None,
) -> Process:
    """Start `argv` with the parent's fds mapped to child fd numbers, {child: parent}."""
    actions = [(os.POSIX_SPAWN_DUP2, parent, child) for child, parent in (fds or {}).items()]
    pid = os.posix_spawn(
        argv[0], list(argv), dict(env if env is not None else os.environ), file_actions=actions
    )
    return Process(pid, argv)

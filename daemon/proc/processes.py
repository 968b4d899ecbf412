"""Child processes of the daemon and the one task that reaps them all.

The daemon is a child subreaper (`PR_SET_CHILD_SUBREAPER`): builders (spares the
spawner's spare program orphans as soon as it makes them) and anything they leave behind
come back to it.
`ProcessMonitor.run` is the only code in the daemon that calls `waitpid`: on every
SIGCHLD it reaps every exited child with `waitpid(-1, WNOHANG)` (signals coalesce, so it
loops until none is left) and hands each status to the `Process` registered for that pid.
A status that arrives before its pid is registered (a builder that exits before the
spawner's reply reaches us) is kept and given to the `Process` registered soon after;
statuses of processes nobody registers (grandchildren orphaned to us, spares) are kept only
for a while and up to a bound.  Pids are reused: a status kept for a pid is never given to
a `register` made after it expired, or while a process with that pid runs (another one).

Nothing else in the daemon may wait for children: no `subprocess`, no
`trio.run_process`; they would lose statuses to this loop or steal them from it.
`spawn` starts helpers with posix_spawn (clone with CLONE_VFORK and exec: safe in a
process with threads, unlike fork).
"""

import contextlib
import ctypes
import os
import signal
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import trio

_PR_SET_CHILD_SUBREAPER = 36
# Statuses of pids nobody registered (grandchildren orphaned to the subreaper, or a
# builder that exited before the spawner's reply) kept for a later `register`: far more
# than builds can start between a spawn and its reply, and a few hundred KiB at most.
MAX_UNCLAIMED = 4096
# How long such a status waits for its `register`.  Between a builder's spawn reply and its
# registration pass milliseconds (a busy loop: a second or so); kept longer, a status
# outlives its pid, which a new builder may get once pids wrap (32,768 of them by default
# on small machines): it would then be taken for exited while it runs.
UNCLAIMED_TTL = 10.0


class Process:
    def __init__(self, pid: int, argv: Sequence[str]) -> None:
        self.pid = pid
        self.argv = list(argv)
        self.returncode: int | None = None
        # A builder: the cgroup of its own it runs in, for the freezer ("" if none).
        self.cgroup = ""
        self._exited = trio.Event()

    async def wait(self) -> int:
        """The exit code, or -N for a death by signal N."""
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def _set_status(self, status: int) -> None:
        self.returncode = os.waitstatus_to_exitcode(status)
        self._exited.set()

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ProcessMonitor:
    """Reaps children.  `reap_all` (the daemon, a subreaper): every child, with
    `waitpid(-1)`.  Otherwise (a library user or a test process that also runs
    `subprocess`): only the pids registered here, each with `waitpid(pid)`."""

    def __init__(self, reap_all: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.reap_all = reap_all
        self._clock = clock
        self._live: dict[int, Process] = {}
        # pid -> (status, when reaped), oldest first.
        self._unclaimed: OrderedDict[int, tuple[int, float]] = OrderedDict()
        self.reaped = 0

    @staticmethod
    def become_subreaper() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"PR_SET_CHILD_SUBREAPER: {os.strerror(err)}")

    def register(self, pid: int, argv: Sequence[str]) -> Process:
        proc = Process(pid, argv)
        self._expire()
        kept = self._unclaimed.pop(pid, None)
        if kept is not None and not _pid_in_use(pid):
            proc._set_status(kept[0])
        else:
            self._live[pid] = proc
        return proc

    def _expire(self) -> None:
        deadline = self._clock() - UNCLAIMED_TTL
        while self._unclaimed and next(iter(self._unclaimed.values()))[1] < deadline:
            self._unclaimed.popitem(last=False)

    def spawn(
        self,
        argv: Sequence[str],
        fds: Mapping[int, int] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Process:
        """Start `argv` with parent fds mapped to child fd numbers, {child: parent}."""
        actions = [(os.POSIX_SPAWN_DUP2, parent, child) for child, parent in (fds or {}).items()]
        pid = os.posix_spawn(
            argv[0], list(argv), dict(os.environ if env is None else env), file_actions=actions
        )
        return self.register(pid, argv)

    def reap(self) -> None:
        """Collect every exited child now; never blocks."""
        if not self.reap_all:
            for pid in list(self._live):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    self._collected(pid, status)
            return
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._collected(pid, status)

    def _collected(self, pid: int, status: int) -> None:
        self.reaped += 1
        proc = self._live.pop(pid, None)
        if proc is not None:
            proc._set_status(status)
        else:
            # Popped first, so that the order stays the order of reaping.
            self._unclaimed.pop(pid, None)
            self._unclaimed[pid] = (status, self._clock())
            self._expire()
            while len(self._unclaimed) > MAX_UNCLAIMED:
                self._unclaimed.popitem(last=False)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGCHLD) as signals:
            # Children that exited before the receiver existed sent their SIGCHLD already.
            self.reap()
            task_status.started()
            async for _ in signals:
                self.reap()


def _pid_in_use(pid: int) -> bool:
    """Whether some process has `pid` now.  A status kept for it was reaped, so its process
    is gone: a process with the pid (even a zombie) is another, and the status not its.
    (A stat of procfs, in memory: it does not block the loop.)"""
    return os.path.exists(f"/proc/{pid}")

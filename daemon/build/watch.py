"""A running builder, watched until it exits: its log streamed line by line to whoever
waits for the build, as it comes, within the build's limits of time, silence and log
size; a builder over one is killed, its whole sandbox with it (pid 1 of its namespace).

While it runs, the scheduler may pause it (`Running.watch`): its deadlines are set aside
then, and given back, whatever was left of them, when it resumes.
"""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from daemon.build.logs import LogTail
from daemon.build.request import BuildOptions
from daemon.proc.processes import Process
from daemon.sched.retry import Cause
from daemon.sched.scheduler import Running

# What one read of the log pipe takes at most: a pipe's default capacity (64 KiB), so one
# read empties it.
LOG_CHUNK = 64 << 10


@dataclass(frozen=True)
class Ending:
    code: int  # the exit code, or -N for a death by signal N
    why: str  # why weft stopped it, "" if it exited on its own
    cause: Cause


class Watch:
    def __init__(
        self,
        proc: Process,
        stream: trio.lowlevel.FdStream,
        log: LogTail,
        limits: BuildOptions,
        on_line: Callable[[str], Awaitable[None]],
        run: Running | None,
    ) -> None:
        self.proc = proc
        self.stream = stream
        self.log = log
        self.limits = limits
        self.on_line = on_line
        self.run = run
        self._why = ""
        self._cause = Cause.EXIT

    async def until_exit(self) -> Ending:
        """Stream the log until EOF while waiting for the builder, within the limits."""
        silent = trio.CancelScope(deadline=trio.current_time() + self.limits.max_silent_time)
        deadline = trio.CancelScope(deadline=trio.current_time() + self.limits.timeout)
        if self.run is not None:
            self.run.watch(self.proc, [deadline, silent])
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, silent)
                try:
                    with deadline, silent:
                        code = await self.proc.wait()
                except trio.Cancelled:
                    # The client went away or the daemon is stopping: the whole sandbox dies.
                    self.proc.kill()
                    raise
                limits = self.limits
                if self._why:
                    pass
                elif deadline.cancelled_caught:
                    self._why, self._cause = f"timed out after {limits.timeout:g} s", Cause.TIMEOUT
                elif silent.cancelled_caught:
                    silence = limits.max_silent_time
                    self._why, self._cause = f"was silent for {silence:g} s", Cause.SILENT
                if deadline.cancelled_caught or silent.cancelled_caught:
                    self.proc.kill()
                    code = await self.proc.wait()
        finally:
            if self.run is not None:
                self.run.unwatch()
        return Ending(code, self._why, self._cause)

    async def _pump(self, silent: trio.CancelScope) -> None:
        async with self.stream:
            while chunk := await self.stream.receive_some(LOG_CHUNK):
                silent.deadline = trio.current_time() + self.limits.max_silent_time
                for line in self.log.add(chunk):
                    await self.on_line(line)
                if self.log.size > self.limits.max_log_size:
                    limit = self.limits.max_log_size
                    self._why = f"exceeded the log size limit of {limit} bytes"
                    self._cause = Cause.LOG_LIMIT
                    self.proc.kill()
                    break

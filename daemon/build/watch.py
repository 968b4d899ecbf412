"""A running builder, watched until it exits: its log streamed line by line to whoever
waits for the build, as it comes, within the build's limits of time, silence and log
size; a builder over one is killed, its whole sandbox with it (pid 1 of its namespace).

Over its time or silence limit it first gets SIGTERM, and `KILL_GRACE` to exit on its
own (docs/sandbox.md): a builder that traps it can stop its children and say why.  A pid
1 without a handler never sees SIGTERM, so one that does not trap it waits out the grace
and then gets SIGKILL.  Over the log limit, or when its client goes, it is killed at
once: what it would say next is what is refused, and nobody waits for it.

A build with environments is watched the same way, its first process being the session
runner (`daemon/build/session.py`), with the grace `environment-grace` (weft.toml) in
which the runner stops the running step and runs the exit actions due; a cancellation
stops it the same way (its exit actions always run), within that grace, while the log is
still read (kept, up to its limit, but sent to nobody): a runner whose log pipe is full
waits to write it, and would wait out the grace without running an exit action.

While it runs, the scheduler may pause it (`Running.watch`): its deadlines are set aside
then, and given back, whatever was left of them, when it resumes.  Or evict it (on-pause =
data): killed, it ends as evicted (`Cause.EVICTED`), not as failed.
"""

import signal
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
# Between SIGTERM and SIGKILL for a builder over a time limit: long enough for a shell's
# trap to stop its children and print a line, short enough that the slot is not held
# long by a builder that ignores it.
KILL_GRACE = 3.0


@dataclass(frozen=True)
class Ending:
    code: int  # the exit code, or -N for a death by signal N
    why: str  # why weft stopped it, "" if it exited on its own
    cause: Cause
    # A build with environments: what failed, said after "failed" in the error (" at
    # enter tools: exit code 3", ": killed by signal SIGSEGV"); "" when the exit code
    # says it all.
    failed: str = ""


class Watch:
    def __init__(
        self,
        proc: Process,
        stream: trio.lowlevel.FdStream,
        log: LogTail,
        limits: BuildOptions,
        on_line: Callable[[str], Awaitable[None]],
        run: Running | None,
        grace: float = KILL_GRACE,
        session: bool = False,
    ) -> None:
        """`grace`: between SIGTERM and SIGKILL; `session`: the process is a session
        runner, stopped within the grace when the watch is cancelled too."""
        self.proc = proc
        self.grace = grace
        self.session = session
        self.stream = stream
        self.log = log
        self.limits = limits
        self.on_line = on_line
        self.run = run
        self._why = ""
        self._cause = Cause.EXIT
        # Set when `_pump` has left the stream: only one task may read it at a time.
        self._pumped = trio.Event()

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
                    # The client went away or the daemon is stopping: the whole sandbox
                    # dies, a session's once its exit actions had the grace to run.
                    if self.session:
                        with trio.CancelScope(shield=True):
                            await self._stop_draining()
                    self.proc.kill()
                    raise
                limits = self.limits
                stopped = deadline.cancelled_caught or silent.cancelled_caught
                # (One that exited 0 before the scheduler's kill reached it is built.)
                if self.run is not None and self.run.evicted and (stopped or code != 0):
                    # Killed by the scheduler to free its memory: its attempt is requeued.
                    self._why, self._cause = "was evicted under memory pressure", Cause.EVICTED
                elif self._why:
                    pass
                elif deadline.cancelled_caught:
                    self._why, self._cause = f"timed out after {limits.timeout:g} s", Cause.TIMEOUT
                elif silent.cancelled_caught:
                    silence = limits.max_silent_time
                    self._why, self._cause = f"was silent for {silence:g} s", Cause.SILENT
                if stopped:
                    code = await self._stop()
        finally:
            if self.run is not None:
                self.run.unwatch()
        return Ending(code, self._why, self._cause)

    async def _stop(self) -> int:
        """SIGTERM, then SIGKILL if it has not exited within the grace; its exit code."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            with trio.move_on_after(self.grace):
                return await self.proc.wait()
        except trio.Cancelled:
            self.proc.kill()
            raise
        self.proc.kill()
        return await self.proc.wait()

    async def _stop_draining(self) -> None:
        """`_stop` a cancelled session, its log read meanwhile (`_drain`), then no more."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._drain)
            await self._stop()
            nursery.cancel_scope.cancel()

    async def _drain(self) -> None:
        """The log after a cancellation: kept up to the limit, the rest dropped."""
        await self._pumped.wait()
        while chunk := await self.stream.receive_some(LOG_CHUNK):
            if self.log.size <= self.limits.max_log_size:
                self.log.add(chunk)

    async def _pump(self, silent: trio.CancelScope) -> None:
        # The stream is borrowed: its owner (the attempt's log pipe) closes it.
        try:
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
        finally:
            self._pumped.set()

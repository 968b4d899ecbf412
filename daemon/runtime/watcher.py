"""Watching runtimes' processes: a pidfd each, waited on by a task of the watcher's own
nursery, which the daemon runs for as long as it serves.

A runtime's process is the client that registered it (store-run execs its command in
place), which is no child of the daemon: it is found by pid, and a pid can be reused.
So a process is known by its pid and its start time (/proc/PID/stat field 22, ticks
since boot) on one boot (the kernel's boot id); the start time is read before and again
after `pidfd_open`, so that the pidfd is known to be of the process whose start time is
recorded.  A pidfd turns readable when its process exits, zombie or not.

The tasks are bounded by the runtimes' live limit per user (`MAX_LIVE_PER_USER`) times
the users allowed to connect: one task and one descriptor each.
"""

import logging
import os
import time
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger("weft.runtimes")

BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"
# /proc/PID/stat's times are in these (USER_HZ).
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Field 22 (starttime), counted from field 3, the first after the command's ')'.
_START_FIELD = 22 - 3


def boot_id() -> str:
    with open(BOOT_ID_FILE) as f:
        return f.read().strip()


def start_time(pid: int) -> int | None:
    """When process `pid` started, in ticks since boot; None if there is none.  The
    command name, in parentheses, may hold spaces and ')': the fields are those after
    the last ')'."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(stat[stat.rindex(b")") + 1 :].split()[_START_FIELD])


def real_uid(pid: int) -> int | None:
    """The real uid of process `pid`, None if there is none."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


def ticks_now() -> float:
    """Now, on the clock start times are read on (boot time, suspend included)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) * CLOCK_TICKS


def open_process(
    pid: int, start: int | None = None, before: float | None = None
) -> tuple[int, int] | None:
    """A pidfd of the process `pid` is meant to be, and its start time; None if that one
    is gone.  Meant: the one that started at `start` (a record's), or one that started no
    later than `before` (ticks: the caller, which existed when its request came)."""
    first = start_time(pid)
    if first is None or (start is not None and first != start):
        return None
    # A tick of slack: start times are rounded down to ticks, and `before` is not.
    if before is not None and first > before + 1:
        return None
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    if start_time(pid) != first:
        os.close(fd)
        return None
    return fd, first


class Watcher:
    """Calls `on_exit(id)` once the process of each runtime it watches exits."""

    def __init__(self, on_exit: Callable[[str], Awaitable[None]]) -> None:
        self._on_exit = on_exit
        self._nursery: trio.Nursery | None = None

    async def run(
        self,
        live: list[tuple[str, int]],
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Watch `live` (ids and their pidfds, taken over), then whatever `watch` is
        given, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for runtime_id, pidfd in live:
                self.watch(runtime_id, pidfd)
            task_status.started()
            await trio.sleep_forever()

    def watch(self, runtime_id: str, pidfd: int) -> None:
        """Take `pidfd` over: it is closed once its process exits, or the daemon stops."""
        try:
            if self._nursery is None:
                raise RuntimeError("the runtime watcher is not running")
            self._nursery.start_soon(self._wait, runtime_id, pidfd)
        except RuntimeError:
            os.close(pidfd)
            raise

    async def _wait(self, runtime_id: str, pidfd: int) -> None:
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            trio.lowlevel.notify_closing(pidfd)
            os.close(pidfd)
        try:
            await self._on_exit(runtime_id)
        except Exception:
            # A fault boundary: one runtime's bookkeeping must not end the daemon.
            log.exception("runtime %s: recording its end failed", runtime_id)

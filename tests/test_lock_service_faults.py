"""The lock service under faults around the locker: requests cancelled while no locker
serves leave no descriptor open, and a grant nobody waits for any more whose release
fails is logged, not raised into the daemon."""

import errno
import logging
import os
import signal
from collections.abc import Collection
from pathlib import Path

import pytest
import trio

from daemon.proc import locks
from daemon.proc.locks import LockService, start_locker_process
from daemon.proc.processes import ProcessMonitor
from daemon.wire.locker import Lock, Mode, Request, Unlock
from tests.test_helper_faults import until

# Enough requests that a leak of one descriptor each stands out from any noise.
REQUESTS = 20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def no_locker(
    monitor: ProcessMonitor, cpus: Collection[int] | None = None, bytes_file: str | None = None
) -> object:
    raise OSError(errno.EAGAIN, "no locker for now")


async def test_lock_requests_cancelled_while_waiting_for_a_new_locker_leave_no_fd_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monitor = ProcessMonitor(reap_all=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        proc, sock = start_locker_process(monitor)
        # Every next locker fails to start: the requests below wait for one.
        monkeypatch.setattr(locks, "start_locker_process", no_locker)
        svc = LockService(monitor, proc, sock)
        await nursery.start(svc.run)
        os.kill(svc.locker_pid, signal.SIGKILL)
        with trio.fail_after(10):
            await proc.wait()
        await trio.sleep(0.2)  # the death is handled, the restart failing
        before = open_fds()
        async with trio.open_nursery() as requests:
            for i in range(REQUESTS):
                path = str(tmp_path / f"{i}.lock")
                requests.start_soon(svc.lock, path, Mode.EXCLUSIVE, f"build:{i}")
            # Each has opened its lock file and waits for a locker: then it is cancelled,
            # as `_died` cancels the scopes of owners that held locks.
            await until(lambda: open_fds() >= before + REQUESTS)
            requests.cancel_scope.cancel()
        assert open_fds() == before
        await svc.aclose()
        nursery.cancel_scope.cancel()


class UnlockFails(LockService):
    """A locker connection on which an abandoned grant comes back unclaimed (the request
    is not withdrawn) and its unlock fails with an error other than the helper's death."""

    async def _abandoned(self, rid: int, request: Request) -> None:
        if isinstance(request, Lock):
            self._abandoned_locks[rid] = request.owner

    async def _send(self, request: Request, fd: int | None = None, rid: int | None = None) -> bool:
        if isinstance(request, Unlock) and request.owner == "abandoner":
            raise OSError(errno.EIO, "injected send failure")
        return await super()._send(request, fd, rid)


async def test_a_failed_unlock_of_a_grant_nobody_awaits_is_logged_and_the_locker_serves_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monitor = ProcessMonitor(reap_all=False)
    contended = str(tmp_path / "a.lock")
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        svc = UnlockFails(monitor, *start_locker_process(monitor))
        await nursery.start(svc.run)
        first = await svc.lock(contended, Mode.EXCLUSIVE, "first")
        with trio.move_on_after(0.3):
            await svc.lock(contended, Mode.EXCLUSIVE, "abandoner")  # waits, then gives up
        locker = svc.locker_pid
        # The waiting request is granted now, and nobody awaits the grant.
        await svc.unlock(first, "first")
        with trio.fail_after(10):
            await until(lambda: "could not release" in caplog.text)
            held = await svc.lock(str(tmp_path / "b.lock"), Mode.EXCLUSIVE, "after")
        assert held.path.endswith("b.lock")
        assert svc.locker_pid == locker and svc.restarts == 0
        await svc.aclose()
        nursery.cancel_scope.cancel()
    assert any(r.levelno == logging.WARNING for r in caplog.records)

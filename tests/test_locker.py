"""The locker: a real locker process, real lock files, real outside lockers."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio

from daemon.proc.locks import (
    LockerDied,
    LockLost,
    LockService,
    WouldBlock,
    running_locker,
)
from daemon.wire.locker import (
    BYTES,
    LOCK_BYTE_NEEDS,
    LOCK_NEEDS,
    MALFORMED,
    Cancel,
    Lock,
    LockByte,
    Mode,
    ReleaseOwner,
    Reply,
    Status,
    Unlock,
    byte_of,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)
from daemon.wire.packets import pack, rights, unpack
from locker.table import LockTable, Outcome
from tests.daemon_fixtures import start_daemon

ROOT = Path(__file__).parent.parent


def locker() -> "AbstractAsyncContextManager[LockService]":
    return running_locker()


def outside_can_lock(path: Path, shared: bool = False) -> bool:
    """Whether a separate process gets an fcntl lock on `path` right now."""
    kind = "LOCK_SH" if shared else "LOCK_EX"
    code = textwrap.dedent(f"""
        import fcntl, os, sys
        fd = os.open({str(path)!r}, os.O_RDWR)
        try:
            fcntl.lockf(fd, fcntl.{kind} | fcntl.LOCK_NB)
        except OSError:
            sys.exit(1)
        sys.exit(0)
    """)
    return subprocess.run([sys.executable, "-c", code]).returncode == 0


def outside_can_lock_byte(path: Path, name: str) -> bool:
    """Whether a separate process gets an fcntl lock on `name`'s byte of the byte-lock
    file `path` right now."""
    code = textwrap.dedent(f"""
        import fcntl, os, sys
        fd = os.open({str(path)!r}, os.O_RDWR)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, {byte_of(name)})
        except OSError:
            sys.exit(1)
        sys.exit(0)
    """)
    return subprocess.run([sys.executable, "-c", code]).returncode == 0


def hold_byte_outside(path: Path, name: str) -> subprocess.Popen[bytes]:
    """A separate process holding `name`'s byte of `path`, once this returns."""
    code = textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(path)!r}, os.O_RDWR)
        fcntl.lockf(fd, fcntl.LOCK_EX, 1, {byte_of(name)})
        print("held", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
    return proc


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- the table's rules, on their own -------------------------------------------------


class FreeKernel:
    """No other process ever holds anything: only the table's own rules apply."""

    def __init__(self) -> None:
        self.released: list[tuple[int, int]] = []

    def acquire(self, key: tuple[int, int], exclusive: bool) -> bool:
        return True

    def release(self, key: tuple[int, int]) -> None:
        self.released.append(key)


def test_table_fifo_never_starves_an_exclusive_waiter() -> None:
    t = LockTable(FreeKernel())
    k = (1, 1)
    assert t.lock(k, 1, "a", Mode.SHARED, True) == [Outcome(1, Status.GRANTED)]
    assert t.lock(k, 2, "x", Mode.EXCLUSIVE, True) == []
    # A later shared request queues behind the exclusive one, though it is compatible
    # with the current holder.
    assert t.lock(k, 3, "b", Mode.SHARED, True) == []
    assert t.unlock(k, "a") == [Outcome(2, Status.GRANTED)]
    assert t.unlock(k, "x") == [Outcome(3, Status.GRANTED)]
    assert t.lock(k, 4, "c", Mode.EXCLUSIVE, False) == [Outcome(4, Status.REFUSED)]
    assert t.release_owner("b") == []
    assert t.inodes == {}


def test_table_reentry_cancel_and_release_owner() -> None:
    kernel = FreeKernel()
    t = LockTable(kernel)
    k = (1, 2)
    assert t.lock(k, 1, "a", Mode.EXCLUSIVE, True) == [Outcome(1, Status.GRANTED)]
    assert t.lock(k, 2, "b", Mode.SHARED, True) == []
    assert t.lock(k, 3, "a", Mode.SHARED, True) == [Outcome(3, Status.GRANTED)]  # re-entry
    assert t.lock(k, 4, "c", Mode.EXCLUSIVE, True) == []
    assert t.cancel(4) == [Outcome(4, Status.CANCELLED)]
    assert t.unlock(k, "a") == []
    assert t.release_owner("a") == [Outcome(2, Status.GRANTED)]
    assert t.lock(k, 5, "b", Mode.EXCLUSIVE, True)[0].status is Status.FAILED  # no upgrades
    assert t.unlock(k, "b") == []
    assert kernel.released == [k]


# -- the messages, on their own ----------------------------------------------------


def test_requests_and_replies_read_back_as_written_in_the_documented_maps() -> None:
    requests = [
        (Lock("build:x", Mode.SHARED, wait=False), 1),
        (LockByte("build:x", Mode.EXCLUSIVE, BYTES - 1), 0),
        (Unlock("build:x", (5, 7), delete=True), 0),
        (Unlock("build:x", (5, 7, 9)), 0),
        (ReleaseOwner("session:3"), 0),
        (Cancel(12), 0),
    ]
    for request, descriptors in requests:
        rid, fields = unpack(pack(42, encode_request(request)))
        assert rid == 42
        assert decode_request(fields, descriptors) == request
    # The maps of docs/locking.md, which both ends have always written.
    assert encode_request(Lock("o", Mode.EXCLUSIVE)) == {
        "op": "lock",
        "mode": "exclusive",
        "wait": True,
        "owner": "o",
    }
    assert encode_request(LockByte("o", Mode.SHARED, 5, wait=False)) == {
        "op": "lock-byte",
        "mode": "shared",
        "wait": False,
        "owner": "o",
        "offset": 5,
    }
    assert byte_of("/s/abc-out") == byte_of("/s/abc-out") < BYTES != byte_of("/s/abd-out")
    assert encode_request(Unlock("o", (1, 2))) == {
        "op": "unlock",
        "owner": "o",
        "key": [1, 2],
        "delete": False,
    }
    for reply in (Reply(Status.GRANTED, (5, 7)), Reply(Status.FAILED, None, "cannot lock: x")):
        assert unpack(pack(3, encode_reply(reply))) == (3, encode_reply(reply))
        assert decode_reply(encode_reply(reply)) == reply
    assert encode_reply(Reply(Status.RELEASED)) == {"status": "released"}


def _raw_locker() -> tuple[subprocess.Popen[bytes], socket.socket]:
    """A locker process and our end of its socket, spoken to in raw packets."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen(
        [sys.executable, "-m", "locker", str(theirs.fileno())],
        pass_fds=[theirs.fileno()],
        cwd=ROOT,
    )
    theirs.close()
    ours.settimeout(10)
    return proc, ours


def test_a_malformed_request_is_answered_failed_and_the_locker_serves_on(tmp_path: Path) -> None:
    proc, sock = _raw_locker()
    try:
        lock_fields = encode_request(Lock("a", Mode.EXCLUSIVE, wait=False))
        byte_fields = encode_request(LockByte("a", Mode.EXCLUSIVE, 1, wait=False))
        for data, answer in (
            (b"\x91", (-1, MALFORMED)),  # an array cut short
            (pack(None, lock_fields), (-1, MALFORMED)),
            (pack(7, {"op": "unlock", "owner": "a"}), (7, MALFORMED)),
            (pack(8, {"op": "cancel", "request": "9"}), (8, MALFORMED)),
            (pack(9, lock_fields), (9, LOCK_NEEDS)),
            (pack(9, {**lock_fields, "mode": ["exclusive"]}), (9, LOCK_NEEDS)),
            (pack(10, {"op": "frob"}), (10, "unknown op 'frob'")),
            (pack(12, {**byte_fields, "offset": BYTES}), (12, LOCK_BYTE_NEEDS)),
            (pack(12, {**byte_fields, "offset": -1}), (12, LOCK_BYTE_NEEDS)),
            (pack(13, byte_fields), (13, "the locker has no byte-lock file")),
        ):
            sock.send(data)
            rid, fields = unpack(sock.recv(4096))
            assert (rid, decode_reply(fields)) == (answer[0], Reply(Status.FAILED, None, answer[1]))
        path = tmp_path / "x.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            sock.sendmsg([pack(11, lock_fields)], rights(fd))
            st = os.fstat(fd)
        finally:
            os.close(fd)
        rid, fields = unpack(sock.recv(4096))
        assert (rid, decode_reply(fields)) == (11, Reply(Status.GRANTED, (st.st_dev, st.st_ino)))
        assert not outside_can_lock(path)
    finally:
        sock.close()
        assert proc.wait(timeout=10) == 0


# -- a real locker -------------------------------------------------------------------


async def test_mutual_exclusion_no_lost_updates(tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    counter.write_text("0")
    lock = str(tmp_path / "counter.lock")
    async with locker() as svc:

        async def bump(owner: str) -> None:
            for _ in range(20):
                async with svc.exclusive([lock], owner):
                    value = int(counter.read_text())
                    await trio.sleep(0)
                    counter.write_text(str(value + 1))

        async with trio.open_nursery() as n:
            for i in range(10):
                n.start_soon(bump, f"owner{i}")
    assert counter.read_text() == "200"


async def test_conflicts_with_outside_fcntl_users_and_shows_in_lslocks(tmp_path: Path) -> None:
    path = tmp_path / "shared.lock"
    async with locker() as svc:
        async with svc.exclusive([str(path)], "me"):
            assert not await trio.to_thread.run_sync(outside_can_lock, path)
            out = await trio.to_thread.run_sync(
                lambda: (
                    subprocess.run(
                        ["lslocks", "-n", "-o", "PID,TYPE,PATH"], capture_output=True, text=True
                    ).stdout
                )
            )
            rows = [line.split() for line in out.splitlines()]
            assert [str(svc.locker_pid), "POSIX", str(path)] in rows
        async with svc.shared([str(path)], "me"):
            assert await trio.to_thread.run_sync(outside_can_lock, path, True)
            assert not await trio.to_thread.run_sync(outside_can_lock, path)
        assert await trio.to_thread.run_sync(outside_can_lock, path)


async def test_waits_for_an_outside_holder_without_blocking_others(tmp_path: Path) -> None:
    a, b = tmp_path / "a.lock", tmp_path / "b.lock"
    a.touch()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(a)!r}, os.O_RDWR)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        sys.stdin.readline()
    """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    async with locker() as svc:
        got_a = trio.Event()

        async def want_a() -> None:
            async with svc.exclusive([str(a)], "waiter"):
                got_a.set()

        async with trio.open_nursery() as n:
            n.start_soon(want_a)
            await trio.sleep(0.2)
            assert not got_a.is_set()
            with trio.fail_after(1):
                async with svc.exclusive([str(b)], "other"):
                    pass
            holder.stdin.write("\n")
            holder.stdin.flush()
            with trio.fail_after(5):
                await got_a.wait()
    holder.wait()


async def test_waiting_on_a_never_delays_b_or_the_release_of_c(tmp_path: Path) -> None:
    a, b, c = (str(tmp_path / f"{x}.lock") for x in "abc")
    async with locker() as svc, svc.exclusive([a], "holder-a"), trio.open_nursery() as n:
        c_held = await svc.lock(c, Mode.EXCLUSIVE, "holder-c")

        async def wait_for_a() -> None:
            async with svc.exclusive([a], "waiter"):
                pass

        n.start_soon(wait_for_a)
        await trio.sleep(0.05)
        with trio.fail_after(0.5):
            async with svc.exclusive([b], "b-user"):
                pass
            await svc.unlock(c_held, "holder-c")
            async with svc.exclusive([c], "c-user", wait=False):
                pass
        n.cancel_scope.cancel()


async def test_sorted_order_means_no_deadlock(tmp_path: Path) -> None:
    paths = [str(tmp_path / f"{i}.lock") for i in range(4)]
    async with locker() as svc:

        async def worker(i: int) -> None:
            order = paths if i % 2 else list(reversed(paths))
            for _ in range(25):
                async with svc.exclusive(order, f"w{i}"):
                    await trio.sleep(0)

        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                for i in range(6):
                    n.start_soon(worker, i)


async def test_would_block_and_cancelled_waiters(tmp_path: Path) -> None:
    path = str(tmp_path / "x.lock")
    async with locker() as svc:
        async with svc.exclusive([path], "one"):
            with pytest.raises(WouldBlock):
                async with svc.exclusive([path], "two", wait=False):
                    pass
            with trio.move_on_after(0.1) as scope:
                async with svc.exclusive([path], "three"):
                    raise AssertionError("granted while held")
            assert scope.cancelled_caught
        # The cancelled waiter left nothing behind: the lock is free for a newcomer.
        with trio.fail_after(2):
            async with svc.exclusive([path], "four", wait=False):
                pass


async def test_stale_lock_file_is_taken_again(tmp_path: Path) -> None:
    path = str(tmp_path / "out.lock")
    async with locker() as svc:
        first = await svc.lock(path, Mode.EXCLUSIVE, "builder")
        got: list[tuple[int, int]] = []

        async def second() -> None:
            held = await svc.lock(path, Mode.EXCLUSIVE, "waiter")
            got.append(held.key)
            await svc.unlock(held, "waiter")

        async with trio.open_nursery() as n:
            n.start_soon(second)
            await trio.sleep(0.1)
            await svc.unlock(first, "builder", delete=True)
        # The waiter holds the file now at the path, not the deleted one (whose inode
        # number the new file may well reuse), and it is empty: not marked deleted.
        st = os.stat(path)
        assert got == [(st.st_dev, st.st_ino)]
        assert st.st_size == 0


async def test_lock_file_stays_while_its_owner_holds_it_again(tmp_path: Path) -> None:
    # One owner holding a lock file twice: the first release must not delete the file
    # the second hold still protects.
    path = str(tmp_path / "out.lock")
    async with locker() as svc:
        async with svc.exclusive([path], "build:x", delete=True):
            async with svc.exclusive([path], "build:x", wait=False, delete=True):
                pass
            assert os.path.exists(path)
            with pytest.raises(WouldBlock):
                async with svc.exclusive([path], "check:x", wait=False):
                    pass
        assert not os.path.exists(path)


async def test_clobbering_sequence_keeps_the_lock_and_bounded_fds(tmp_path: Path) -> None:
    """The thread's sequence: open twice, lock both, close one, open again, lock, close
    the older, ...  Here each lock is a new open by the daemon, sent and closed at once."""
    path = tmp_path / "clobber.lock"
    rounds = 100_000
    async with locker() as svc:
        previous = await svc.lock(str(path), Mode.SHARED, "owner-0")
        start_fds = fd_count(svc.locker_pid)
        daemon_fds = fd_count(os.getpid())
        for i in range(1, rounds + 1):
            current = await svc.lock(str(path), Mode.SHARED, f"owner-{i % 2}")
            await svc.unlock(previous, f"owner-{(i - 1) % 2}")
            previous = current
            if i % 25_000 == 0:
                assert not await trio.to_thread.run_sync(outside_can_lock, path)
                assert fd_count(svc.locker_pid) == start_fds
        assert fd_count(os.getpid()) == daemon_fds
        assert not await trio.to_thread.run_sync(outside_can_lock, path)
        await svc.unlock(previous, f"owner-{rounds % 2}")
        assert await trio.to_thread.run_sync(outside_can_lock, path)


async def test_daemon_fd_count_does_not_grow_with_locks_held(tmp_path: Path) -> None:
    async with locker() as svc:
        before = fd_count(os.getpid())
        async with svc.exclusive([str(tmp_path / f"{i}.lock") for i in range(1000)], "many"):
            assert fd_count(os.getpid()) == before
            assert fd_count(svc.locker_pid) >= 1000


async def test_locker_killed_is_replaced_and_owners_lose_cleanly(tmp_path: Path) -> None:
    held_path, other = str(tmp_path / "held.lock"), str(tmp_path / "other.lock")
    async with locker() as svc:
        old_pid = svc.locker_pid
        body_finished = False
        outcome: list[BaseException] = []

        async def holder() -> None:
            nonlocal body_finished
            try:
                async with svc.exclusive([held_path], "builder"):
                    await trio.sleep(30)
                    body_finished = True
            except LockLost as e:
                outcome.append(e)

        async def waiter() -> None:
            try:
                await svc.lock(held_path, Mode.EXCLUSIVE, "second")
            except LockerDied as e:
                outcome.append(e)

        async with trio.open_nursery() as n:
            n.start_soon(holder)
            await trio.sleep(0.1)
            n.start_soon(waiter)
            await trio.sleep(0.1)
            os.kill(old_pid, signal.SIGKILL)
        assert not body_finished
        assert sorted(type(e).__name__ for e in outcome) == ["LockLost", "LockerDied"]
        assert svc.locker_pid != old_pid and svc.restarts == 1
        # The lost lock is really free, and the new locker serves.
        assert await trio.to_thread.run_sync(outside_can_lock, Path(held_path))
        with trio.fail_after(5):
            async with svc.exclusive([held_path, other], "after"):
                assert not await trio.to_thread.run_sync(outside_can_lock, Path(held_path))


def test_daemon_killed_frees_its_locks_at_once(tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "state")
    lock = d.state / "var" / "daemon.lock"
    locker_pids = [
        int(p)
        for p in os.listdir("/proc")
        if p.isdigit() and "-m\0locker\x003\0" in _cmdline(int(p)) and _ppid(int(p)) == d.proc.pid
    ]
    assert len(locker_pids) == 1
    assert not outside_can_lock(lock)
    d.proc.kill()
    d.proc.wait()
    t = time.monotonic()
    while os.path.exists(f"/proc/{locker_pids[0]}") and _state(locker_pids[0]) != "Z":
        assert time.monotonic() - t < 1.0
        time.sleep(0.005)
    assert time.monotonic() - t < 0.1 + 0.05
    assert outside_can_lock(lock)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read()
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")
async def test_a_lock_file_deleted_on_a_full_disk_leaves_the_locker_serving(tmp_path: Path) -> None:
    disk = tmp_path / "full"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=True)
    try:
        async with locker() as svc:
            pid = svc.locker_pid
            path = str(disk / "out.lock")
            async with svc.exclusive([path], "build", delete=True):
                # The disk fills while the build runs: the deletion token cannot be written.
                with open(disk / "filler", "wb") as f, contextlib.suppress(OSError):
                    f.write(b"x" * (128 << 10))
            assert not os.path.exists(path)
            with trio.fail_after(10):
                async with svc.exclusive([str(tmp_path / "next.lock")], "next"):
                    pass
            assert (svc.locker_pid, svc.restarts) == (pid, 0)
    finally:
        subprocess.run(["umount", str(disk)], check=True)

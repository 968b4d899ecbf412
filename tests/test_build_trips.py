"""What a trivial build costs the daemon, cut without changing what a build sees or what
is kept: the store dir's mount points under a slot's tmp/ kept from build to build (as
the spare made them, else made anew), the logs and history records of several builds
written in one worker-thread trip and one transaction, every empty log a link to one
file, and the output locks' files made in the trip that looks for the outputs.  Real
daemons, sandboxes and lockers."""

import functools
import gzip
import os
import shutil
import stat
import subprocess
import uuid
from pathlib import Path

import trio

from daemon.build.logs import EMPTY_LOG, BuildLogs
from daemon.build.slots import mount_chain, prepare_workdir
from daemon.proc.locks import running_locker
from daemon.proc.workers import LINGER, Workers
from daemon.wire.locker import byte_of
from store.db import Database
from store.history import AttemptRecord, History
from tests.daemon_fixtures import Graph
from tests.test_locker import hold_byte_outside, outside_can_lock_byte

SLOT_UID = 30007
# What a builder prints of its /tmp: every entry but the store's contents, its mode and
# owner.
LOOK = (
    "cd /tmp && find . | grep -v /store/ | sort"
    " | while read f; do stat -c '%n %a %u %g' \"$f\"; done > $out"
)


def _look(graph: Graph) -> str:
    drv = graph.sh(f"look-{uuid.uuid4().hex[:8]}", LOOK)
    assert [r["status"] for r in graph.build(drv)] == ["built"]
    return Path(drv.out).read_text()


def test_a_build_sees_the_same_tmp_whatever_the_last_one_did_to_its_mount_points(
    one_slot: Graph,
) -> None:
    graph = one_slot
    first = _look(graph)
    assert _look(graph) == first
    area, chain = mount_chain(graph.daemon.store_dir)
    tmp = graph.daemon.state / "var" / "builds" / "0" / "tmp"
    if area == "tmp":
        # Kept for the next build, emptied.
        assert os.listdir(tmp) == [chain[0]]
        assert os.listdir(tmp.joinpath(*chain)) == []
        top = f"/tmp/{chain[0]}"
        below = f"/tmp/{'/'.join(chain[:2])}"
        meddle = graph.sh(
            "meddle",
            f"chmod 0777 {top} && chmod 0700 {below} && echo x > {top}/left"
            f" && mkdir {below}/more && echo y > /tmp/loose && touch $out",
        )
        assert [r["status"] for r in graph.build(meddle)] == ["built"]
    else:
        assert os.listdir(tmp) == []
    assert _look(graph) == first


def test_a_slots_kept_mount_points_are_made_anew_when_not_as_the_spare_made_them(
    tmp_path: Path,
) -> None:
    work = tmp_path / "builds" / "0"
    store_dir = "/tmp/st/state/store"
    _, chain = mount_chain(store_dir)
    prepare_workdir(work, store_dir, SLOT_UID, SLOT_UID)
    tmp = work / "tmp"

    def made() -> Path:
        """The chain as the spare makes it: the build user's, 0755."""
        here = tmp
        for name in chain:
            here = here / name
            if not here.exists():
                here.mkdir()
                os.chown(here, SLOT_UID, SLOT_UID)
                here.chmod(0o755)
        return here

    made()
    (tmp / "st" / "stray").write_text("x")
    prepare_workdir(work, store_dir, SLOT_UID, SLOT_UID)
    assert os.listdir(tmp) == ["st"] and os.listdir(tmp / "st") == ["state"]
    spoilers = [
        lambda p: p.chmod(0o777),
        lambda p: os.chown(p, SLOT_UID + 1, SLOT_UID),
        lambda p: os.setxattr(p, "user.mark", b"1"),
        lambda p: subprocess.run(["chattr", "+d", str(p)], check=True),
    ]
    for spoil in spoilers:
        made()
        spoil(tmp / "st" / "state")
        prepare_workdir(work, store_dir, SLOT_UID, SLOT_UID)
        assert os.listdir(tmp / "st") == [], spoil
    # A symlink in the chain's place is removed, not followed.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("not the slot's")
    shutil.rmtree(tmp / "st")
    (tmp / "st").symlink_to(outside)
    prepare_workdir(work, store_dir, SLOT_UID, SLOT_UID)
    assert os.listdir(tmp) == [] and (outside / "keep").read_text() == "not the slot's"
    # A store dir elsewhere keeps nothing in tmp/.
    made()
    prepare_workdir(work, "/var/tmp/st/state/store", SLOT_UID, SLOT_UID)
    assert os.listdir(tmp) == []
    st = os.lstat(tmp)
    assert stat.S_IMODE(st.st_mode) == 0o1777


async def test_background_calls_handed_in_together_run_in_one_trip_each_told_its_own() -> None:
    workers = Workers()
    sizes: list[int] = []

    def double(args: list[int]) -> list[int]:
        sizes.append(len(args))
        return [a * 2 for a in args]

    def refuse(args: list[str]) -> list[str]:
        raise OSError("disk full")

    results: dict[int, int] = {}
    errors: list[str] = []

    async def one(n: int) -> None:
        results[n] = await workers.batched(double, n)

    async def refused(word: str) -> None:
        try:
            await workers.batched(refuse, word)
        except OSError as e:
            errors.append(f"{word}: {e}")

    async with trio.open_nursery() as nursery:
        for n in range(5):
            nursery.start_soon(one, n)
        nursery.start_soon(refused, "a")
        nursery.start_soon(refused, "b")
    assert results == {n: n * 2 for n in range(5)}
    assert sizes == [5]
    assert sorted(errors) == ["a: disk full", "b: disk full"]
    # A caller cancelled while it waits: its call runs all the same.
    with trio.move_on_after(0):
        await workers.batched(double, 7)
    assert await workers.batched(double, 8) == 16
    assert sum(sizes) == 7


async def test_calls_that_linger_wait_for_company_until_one_that_does_not_or_the_time_is_up(
    mock_clock: trio.testing.MockClock,
) -> None:
    workers = Workers()
    trips: list[list[str]] = []

    def note(args: list[str]) -> list[str]:
        trips.append(args)
        return args

    async def calls(*names: str, linger: bool = True) -> None:
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(workers.batched, note, name, linger)
                await trio.testing.wait_all_tasks_blocked()

    # Lingering calls wait together, the clock standing still, until one that does not
    # linger sends them all at once.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(calls, "a", "b")
        await trio.testing.wait_all_tasks_blocked()
        assert trips == []
        nursery.start_soon(functools.partial(calls, "now", linger=False))
    assert trips == [["a", "b", "now"]]
    # A lingering call alone goes once its time is up, and not before.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(calls, "c")
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(LINGER * 0.9)
        await trio.testing.wait_all_tasks_blocked()
        assert trips[1:] == []
        mock_clock.jump(LINGER * 0.2)
    assert trips[1:] == [["c"]]
    # One that does not linger goes at once, with the clock standing still.
    await workers.batched(note, "d")
    assert trips[2:] == [["d"]]


def _attempt(drv: str, n: int, outcome: str, code: int) -> AttemptRecord:
    return AttemptRecord(drv, n, 1.0, 2.0, outcome, code, {}, {}, 1, 0.0)


def test_records_written_in_one_transaction_mark_a_flaky_derivation_as_one_by_one(
    tmp_path: Path,
) -> None:
    history = History(Database(tmp_path / "db.sqlite"))
    marks = history.record_many(
        [
            _attempt("/s/a.drv", 1, "exit", 1),
            _attempt("/s/b.drv", 1, "built", 0),
            _attempt("/s/a.drv", 2, "built", 0),
        ]
    )
    assert marks == [False, False, True]
    assert history.is_flaky("/s/a.drv") and not history.is_flaky("/s/b.drv")
    assert [a.outcome for a in history.attempts("/s/a.drv")] == ["exit", "built"]


async def test_outputs_locked_as_bytes_wait_for_each_other_and_for_other_processes(
    tmp_path: Path,
) -> None:
    bytes_file = tmp_path / "var" / "output-locks"
    bytes_file.parent.mkdir()
    out, other = "/s/aaaa-out", "/s/bbbb-out"
    open_before = len(os.listdir("/proc/self/fd"))
    async with running_locker(bytes_file=str(bytes_file)) as locks:
        order: list[str] = []

        async def build(owner: str, names: list[str], hold: float) -> None:
            async with locks.exclusive_bytes(names, owner) as held:
                order.append(f"{owner} in")
                assert [h.key[2] for h in held] == sorted(byte_of(n) for n in names)
                await trio.sleep(hold)
                order.append(f"{owner} out")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(build, "first", [out, other], 0.2)
            await trio.testing.wait_all_tasks_blocked()
            # Another output is another byte: not held up.
            with trio.fail_after(5):
                async with locks.exclusive_bytes(["/s/cccc-out"], "third"):
                    pass
            nursery.start_soon(build, "second", [out], 0)
        assert order == ["first in", "first out", "second in", "second out"]
        # Held, the byte is locked for other processes too; let go, it is free, and no
        # file was made for it.
        async with locks.exclusive_bytes([out], "fourth"):
            assert not await trio.to_thread.run_sync(outside_can_lock_byte, bytes_file, out)
        assert await trio.to_thread.run_sync(outside_can_lock_byte, bytes_file, out)
        # Another process holding it: the locker waits until it lets go.
        holder = hold_byte_outside(bytes_file, out)
        try:
            with trio.move_on_after(0.3):
                async with locks.exclusive_bytes([out], "fifth"):
                    raise AssertionError("granted while another process held it")
        finally:
            holder.kill()
            holder.communicate()
        with trio.fail_after(5):
            async with locks.exclusive_bytes([out], "fifth"):
                pass
    assert os.listdir(bytes_file.parent) == ["output-locks"]
    assert bytes_file.stat().st_size == 0
    assert len(os.listdir("/proc/self/fd")) == open_before


def test_silent_builds_logs_are_links_to_one_empty_log_and_read_as_empty(graph: Graph) -> None:
    quiet = [graph.sh(f"quiet{i}", f"echo {i} > $out") for i in range(3)]
    loud = graph.sh("loud", "echo said; echo x > $out")
    assert [r["status"] for r in graph.build(*quiet, loud, max_jobs=2)] == ["built"] * 4
    log_dir = graph.daemon.state / "var" / "log"
    empty = os.stat(log_dir / EMPTY_LOG)
    for drv in quiet:
        log = log_dir / f"{os.path.basename(drv.path)}.gz"
        assert (os.stat(log).st_ino, gzip.decompress(log.read_bytes())) == (empty.st_ino, b"")
    said = log_dir / f"{os.path.basename(loud.path)}.gz"
    assert gzip.decompress(said.read_bytes()) == b"said\n"
    assert os.stat(said).st_ino != empty.st_ino


def test_a_log_stored_over_an_empty_one_leaves_the_others_empty(tmp_path: Path) -> None:
    logs = BuildLogs(tmp_path)
    logs.store("/s/a-x.drv", b"")
    logs.store("/s/b-y.drv", b"")
    logs.store("/s/a-x.drv", b"now something\n")
    assert logs.read("/s/a-x.drv") == b"now something\n"
    assert logs.read("/s/b-y.drv") == b""
    # A broken empty log is made again before it is linked anywhere.
    (tmp_path / EMPTY_LOG).unlink()
    (tmp_path / EMPTY_LOG).write_bytes(b"junk")
    again = BuildLogs(tmp_path)
    again.store("/s/c-z.drv", b"")
    assert again.read("/s/c-z.drv") == b"" and again.read("/s/b-y.drv") == b""

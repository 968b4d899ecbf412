"""Recovery after kill -9: a dead owner is dead once it exits, zombie or not, and the
next daemon undoes a killed collection before it answers anyone."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest

from bench.daemons import start_daemon, stop_daemon
from store import Store
from store.tmparea import owner_alive, owner_token

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent
# Enough paths for a collection of several batches (paced, starting at `store.gc.BATCH_SIZE`,
# 256), so that a kill lands in the middle of one; the case had thousands.
PATHS = 3000
ROOTED = 50


def proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def wait_for_zombie(pid: int) -> None:
    """Until `pid`, a child of ours that we do not reap yet, has exited."""
    deadline = time.monotonic() + 10
    while proc_state(pid) != "Z":
        assert time.monotonic() < deadline, f"{pid} did not exit"
        time.sleep(0.002)


@pytest.fixture
def var_tmp() -> Iterator[Path]:
    # Not all under /tmp: state dirs elsewhere must work as well.
    d = Path(tempfile.mkdtemp(prefix="weft-recovery-", dir="/var/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_a_zombie_owner_is_dead_and_a_running_one_alive() -> None:
    r, w = os.pipe()
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys; from store.tmparea import owner_token; "
            f"os.write({w}, owner_token().encode()); os.close({w}); sys.stdin.read()",
        ],
        cwd=ROOT,
        pass_fds=(w,),
        stdin=subprocess.PIPE,
    )
    os.close(w)
    with os.fdopen(r, "rb") as f:
        token = f.read().decode()
    assert token.startswith(f"{child.pid}.")
    assert owner_alive(token)
    assert child.stdin is not None
    child.stdin.close()
    wait_for_zombie(child.pid)
    try:
        assert not owner_alive(token)
    finally:
        child.wait()
    assert not owner_alive(token)


def test_an_owner_token_of_a_recycled_pid_or_another_boot_is_dead() -> None:
    mine = owner_token()
    pid, _, identity = mine.partition(".")
    start, _, boot = identity.partition("-")
    assert owner_alive(mine) and boot
    assert not owner_alive(f"{pid}.{int(start) - 1}-{boot}")
    assert not owner_alive(f"{pid}.{start}-{'0' * len(boot)}")
    assert not owner_alive(f"{pid}.{start}")
    assert not owner_alive("not-a-token")


KILLED_COLLECTOR = textwrap.dedent("""
    import os, signal, sys
    from store import Store, gc
    from store.gc import moving
    store = Store.open(sys.argv[1])
    real, calls = moving.move_out, 0
    def move_out(store_fd, into_fd, name):
        global calls
        calls += 1
        if calls == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(store_fd, into_fd, name)
    moving.move_out = move_out
    gc.delete(store, gc.plan(store))
""")


def fill(state: Path, n: int, rooted: int) -> set[str]:
    """`n` small paths, the first `rooted` of them kept by roots; all registered paths."""
    store = Store.open(state)
    infos = store.add_texts([(f"t{i}", f"text {i}\n", ()) for i in range(n)])
    for info in infos[:rooted]:
        os.symlink(info.path, state / "var" / "gcroots" / os.path.basename(info.path))
    store.close()
    return {i.path for i in infos}


def registered(state: Path) -> set[str]:
    conn = apsw.Connection(str(state / "var" / "db" / "db.sqlite"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return {r[0] for r in conn.execute("SELECT path FROM ValidPaths")}
    finally:
        conn.close()


def test_a_collection_killed_mid_batch_is_undone_while_its_process_is_a_zombie(
    var_tmp: Path,
) -> None:
    state = var_tmp / "state"
    fill(state, 600, 0)
    # Killed inside the first batch's transaction: 100 paths renamed out, none unregistered.
    child = subprocess.Popen([sys.executable, "-c", KILLED_COLLECTOR, str(state), "101"], cwd=ROOT)
    try:
        wait_for_zombie(child.pid)
        moved_out = [
            name
            for entry in os.listdir(state / "store" / ".tmp")
            for name in os.listdir(state / "store" / ".tmp" / entry)
        ]
        assert len(moved_out) == 100
        store = Store.open(state)
        assert proc_state(child.pid) == "Z"
    finally:
        child.wait()
    try:
        assert os.listdir(store.tmp.path) == []
        report = store.verify()
        assert report.ok, report
        assert len(registered(state)) == 600
    finally:
        store.close()


def kill_during_gc(state: Path, daemon: subprocess.Popen[bytes]) -> subprocess.Popen[str]:
    """Start `store-gc` and kill -9 the daemon as soon as paths are being moved out."""
    tmp = state / "store" / ".tmp"
    env = {**os.environ, "WEFT_STATE_DIR": str(state)}
    gc = subprocess.Popen(
        [BIN / "store-gc"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with os.scandir(tmp) as entries:
            if any(e.name.endswith(".del") and os.listdir(e.path) for e in entries):
                break
    daemon.send_signal(signal.SIGKILL)
    return gc


def test_store_verify_right_after_a_daemon_killed_during_store_gc_finds_all_it_registered(
    var_tmp: Path,
) -> None:
    """The killed daemon stays a zombie (we do not reap it) while the next one starts."""
    state = var_tmp / "state"
    fill(state, PATHS, ROOTED)
    rooted = {os.readlink(p) for p in (state / "var" / "gcroots").iterdir() if p.is_symlink()}
    assert len(rooted) == ROOTED
    caught_mid_batch = 0
    for round_ in range(3):
        old = start_daemon(state)
        gc = kill_during_gc(state, old.proc)
        try:
            wait_for_zombie(old.proc.pid)
            gc.communicate(timeout=30)
            before = registered(state)
            assert rooted <= before
            # Registered paths the killed collection had renamed out, uncommitted.
            caught_mid_batch += len(before - {p for p in before if os.path.lexists(p)})
            new = start_daemon(state)
            assert proc_state(old.proc.pid) == "Z"
        finally:
            old.proc.wait()
        try:
            env = {**os.environ, "WEFT_STATE_DIR": str(state)}
            verify = subprocess.run(
                [BIN / "store-verify", "--json"], env=env, capture_output=True, text=True
            )
            assert verify.returncode == 0, (round_, verify.stdout, verify.stderr)
            assert json.loads(verify.stdout)["missing"] == []
            # Nothing registered was lost: what the killed collection had not committed is
            # back, and the recovery unregistered nothing.
            assert registered(state) == before
            assert all(os.path.exists(p) for p in before)
            assert os.listdir(state / "store" / ".tmp") == []
        finally:
            stop_daemon(new)
        if caught_mid_batch and round_:
            break
    # The kill came between a batch's renames and its commit at least once: the case meant.
    assert caught_mid_batch

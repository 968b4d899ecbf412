"""A collection in two stages and its space given back after: paths moved out beside the
transactions, refused ones put back, the removal in bounded threads that end when idle,
and a daemon that answers before the space is back, finishes it when stopped, and leaves
nothing half done when killed."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.daemons import DaemonProc, start_daemon, stop_daemon
from store import Store, gc
from store.gc import reclaim
from store.gc.reclaim import Reclaimer
from tests.daemon_fixtures import run_as_nobody
from tests.test_gc import _all_valid, _consistent, _text

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(params=["/tmp", "/var/tmp"])
def state_parent(request: pytest.FixtureRequest) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="weft-reclaim-", dir=request.param))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _deletion_dirs(store_dir: Path) -> list[str]:
    return [n for n in os.listdir(store_dir / ".tmp") if n.endswith(".del")]


def _fill(store: Store, n: int, tag: str = "") -> list[str]:
    return [i.path for i in store.add_texts([(f"t{i}", f"{tag} {i}\n", ()) for i in range(n)])]


def _reclaim_threads() -> int:
    return sum(t.name == "gc-reclaim" for t in threading.enumerate())


def _wait_for_no_reclaim_threads() -> None:
    deadline = time.monotonic() + 5
    while _reclaim_threads():
        assert time.monotonic() < deadline, "idle removal threads never ended"
        time.sleep(0.01)


def test_a_collection_that_does_not_wait_returns_with_its_paths_out_of_the_store(
    store: Store,
) -> None:
    paths = _fill(store, 600)
    reclaimer = Reclaimer(lambda: gc.remove_unused_links(store))
    result = gc.delete(store, gc.plan(store), reclaimer=reclaimer, wait=False)
    assert sorted(result.deleted) == sorted(paths)
    # Unregistered and gone from their names at once, whatever the removal's progress.
    assert not _all_valid(store)
    assert not any(os.path.lexists(p) for p in paths)
    assert result.bytes_freed == sum(len(f"{i}\n") + 1 for i in range(600))
    reclaimer.wait()
    assert _deletion_dirs(Path(store.store_dir)) == []
    _consistent(store)


def test_removal_threads_stay_within_their_limit_and_end_when_idle(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reclaim, "LINGER_SECONDS", 0.05)
    _wait_for_no_reclaim_threads()  # an earlier test's, lingering
    _fill(store, 2000)
    seen: list[int] = []
    reclaimer = Reclaimer(threads=4)
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(_reclaim_threads())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        gc.delete(store, gc.plan(store), batch_size=100, reclaimer=reclaimer, wait=True)
    finally:
        stop.set()
        watcher.join()
    assert 1 <= max(seen) <= 4
    assert reclaimer.totals.entries_removed == 2000
    _wait_for_no_reclaim_threads()


def test_a_dead_chain_goes_in_waves_and_a_pin_on_its_head_keeps_it_whole(store: Store) -> None:
    chain = [_text(store, "c0")]
    for i in range(1, 9):
        chain.append(_text(store, f"c{i}", (chain[-1],)))
    wide = [_text(store, f"w{i}", (chain[0],)) for i in range(5)]
    plan = gc.plan(store)
    order = plan.dead
    # Referrers before references; no dead path refers to another of its wave.
    for path in chain[1:]:
        assert order.index(path) < order.index(chain[chain.index(path) - 1])
    waves = {p: plan.rows[p][1] for p in order}
    assert len({waves[w] for w in wide}) == 1
    store.pins.pin("late", [chain[-1]])  # after the marking: the head and all below stay
    result = gc.delete(store, plan, batch_size=2)
    assert set(result.deleted) == set(wide)
    assert set(result.kept) == set(chain)
    assert all(os.path.exists(p) for p in chain)
    store.pins.release("late")
    assert set(gc.delete(store, gc.plan(store), batch_size=3).deleted) == set(chain)
    _consistent(store)


def test_a_path_refused_after_it_was_moved_out_is_back_in_place(store: Store) -> None:
    dead = _fill(store, 300, "dead")
    plan = gc.plan(store)
    # Added after the marking, unpinned: only the database keeps its reference alive, and
    # the mover has renamed that reference out by the time its transaction is refused.
    user = _text(store, "user", (dead[150],))
    result = gc.delete(store, plan, batch_size=64)
    assert result.kept == [dead[150]]
    assert Path(dead[150]).read_text() == "dead 150\n"
    assert _all_valid(store) == {dead[150], user}
    _consistent(store)


def test_a_user_that_is_not_root_collects_read_only_directories(state_parent: Path) -> None:
    os.chmod(state_parent, 0o777)
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from store import Store, gc
        store = Store.open({str(state_parent / "state")!r})
        tree = {str(state_parent / "tree")!r}
        os.makedirs(tree + "/sub")
        with open(tree + "/sub/file", "w") as f:
            f.write("12345")
        path = store.add_path(tree).path
        assert oct(os.stat(path).st_mode & 0o777) == "0o555", oct(os.stat(path).st_mode)
        result = gc.delete(store, gc.plan(store))
        assert result.deleted == [path] and result.bytes_freed == 5, result
        assert not os.path.lexists(path)
        assert [n for n in os.listdir(store.tmp.path)] == []
        store.close()
    """)
    done = run_as_nobody(code)
    assert done.returncode == 0, done.stderr


KILLED_MOVER = textwrap.dedent("""
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
    gc.delete(store, gc.plan(store), batch_size=int(sys.argv[3]))
""")


@pytest.mark.parametrize("kill_at", [50, 451])
def test_a_collection_killed_while_it_moves_paths_out_loses_nothing_registered(
    state_parent: Path, kill_at: int
) -> None:
    state = state_parent / "state"
    store = Store.open(state)
    _fill(store, 600)
    store.close()
    # Batches of 200: killed in the first batch (nothing committed) or in the third, with
    # the first two (or only the first) committed and the next moved out uncommitted.
    child = subprocess.run(
        [sys.executable, "-c", KILLED_MOVER, str(state), str(kill_at), "200"], cwd=ROOT
    )
    assert child.returncode == -signal.SIGKILL
    store = Store.open(state)
    try:
        registered = _all_valid(store)
        assert 600 - kill_at < len(registered) <= 600
        assert _deletion_dirs(state / "store") == []
        _consistent(store)
    finally:
        store.close()


def _store_gc(d: DaemonProc) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WEFT_STATE_DIR": str(d.state)}
    return subprocess.run([BIN / "store-gc"], env=env, capture_output=True, text=True, timeout=120)


def _registered_and_present(state: Path) -> set[str]:
    store = Store.open(state)
    try:
        _consistent(store)
        return _all_valid(store)
    finally:
        store.close()


def test_a_daemon_answers_store_gc_then_gives_the_space_back(state_parent: Path) -> None:
    state = state_parent / "state"
    store = Store.open(state)
    paths = _fill(store, 3000)
    kept = paths[0]
    os.symlink(kept, state / "var" / "gcroots" / "kept")
    store.close()
    d = start_daemon(state)
    try:
        out = _store_gc(d)
        assert out.returncode == 0, out.stderr
        assert sorted(out.stdout.split()) == sorted(paths[1:])
        assert "2999 store paths deleted" in out.stderr
        assert not any(os.path.lexists(p) for p in paths[1:])
        deadline = time.monotonic() + 60
        while _deletion_dirs(state / "store"):
            assert time.monotonic() < deadline, "the space never came back"
            time.sleep(0.01)
        again = _store_gc(d)  # nothing left: a second collection deletes nothing
        assert again.returncode == 0 and again.stdout == ""
    finally:
        stop_daemon(d)
    assert d.proc.returncode == 0, d.log.read_text()
    assert _registered_and_present(state) == {kept}


def test_a_daemon_stopped_while_it_gives_space_back_finishes_first(state_parent: Path) -> None:
    state = state_parent / "state"
    store = Store.open(state)
    _fill(store, 4000)
    store.close()
    d = start_daemon(state)
    try:
        out = _store_gc(d)
        assert out.returncode == 0, out.stderr
        removing = bool(_deletion_dirs(state / "store"))
    finally:
        stop_daemon(d)
    assert d.proc.returncode == 0, d.log.read_text()
    # Whether or not the removal was still going when SIGTERM came, none is left over.
    assert _deletion_dirs(state / "store") == [], removing
    assert _registered_and_present(state) == set()


def test_a_daemon_killed_while_it_gives_space_back_leaves_a_whole_store(
    state_parent: Path,
) -> None:
    state = state_parent / "state"
    store = Store.open(state)
    paths = _fill(store, 4000)
    os.symlink(paths[7], state / "var" / "gcroots" / "kept")
    store.close()
    d = start_daemon(state)
    try:
        out = _store_gc(d)
        assert out.returncode == 0, out.stderr
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
    finally:
        stop_daemon(d)
    # The next open removes what the killed daemon had not: unregistered already.
    assert _registered_and_present(state) == {paths[7]}
    assert _deletion_dirs(state / "store") == []


def test_an_entry_that_cannot_be_removed_is_counted_and_the_rest_goes(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _fill(store, 100)
    stuck = os.path.basename(paths[42])
    real_unlink = os.unlink

    def unlink(path: str, *args: object, **kwargs: object) -> None:
        if os.path.basename(str(path)) == stuck:
            raise PermissionError(1, "Operation not permitted", str(path))
        real_unlink(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "unlink", unlink)
    reclaimer = Reclaimer()
    result = gc.delete(store, gc.plan(store), reclaimer=reclaimer)
    monkeypatch.undo()
    assert sorted(result.deleted) == sorted(paths)  # unregistered all the same
    assert reclaimer.totals.errors >= 1 and reclaimer.totals.entries_removed == 99
    # Left in its deletion directory, which the next open (after this process) removes.
    (left,) = _deletion_dirs(Path(store.store_dir))
    assert os.listdir(Path(store.store_dir) / ".tmp" / left) == [stuck]
    _consistent(store)

"""kill -9 at any moment during adds leaves a complete valid path or, after the next
open, no path and no debris."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import apsw
import pytest

from store import Store

ROOT = Path(__file__).parent.parent


def assert_clean(state: Path) -> Store:
    store = Store.open(state)
    assert os.listdir(store.tmp.path) == [], "temporary debris left"
    on_disk = {
        os.path.join(store.store_dir, n)
        for n in os.listdir(store.store_dir)
        if not n.startswith(".")
    }
    with store.db.connection() as conn:
        registered = {r[0] for r in conn.execute("SELECT path FROM ValidPaths")}
    assert on_disk == registered
    report = store.verify()
    assert report.ok, report
    return store


ADDER = textwrap.dedent("""
    import os, sys, random
    from pathlib import Path
    from store import Store
    state, work = sys.argv[1], Path(sys.argv[2])
    store = Store.open(state)
    rng = random.Random(int(sys.argv[3]))
    i = 0
    while True:
        i += 1
        src = work / f"src{i}"
        src.mkdir()
        for j in range(rng.randint(1, 40)):
            (src / f"f{j}").write_bytes(os.urandom(rng.choice([0, 10, 5000, 300000])))
        store.add_path(src, name="tree")
        store.add_text("note", f"text {rng.random()}")
""")


def test_random_kills_during_adds(tmp_path: Path) -> None:
    state = tmp_path / "state"
    rng = random.Random(42)
    for round_ in range(25):
        work = tmp_path / f"work{round_}"
        work.mkdir()
        child = subprocess.Popen(
            [sys.executable, "-c", ADDER, str(state), str(work), str(round_)], cwd=ROOT
        )
        time.sleep(rng.uniform(0.3, 0.6))
        child.send_signal(signal.SIGKILL)
        child.wait()
    store = assert_clean(state)
    with store.db.connection() as conn:
        assert conn.execute("SELECT count(*) FROM ValidPaths").fetchone()[0] > 0
    store.close()


# Each crash point patches a call the add makes and SIGKILLs the process right after its
# n-th use; `left` is what must be on disk then, so the point is surely the one meant.
CRASH_POINTS = {
    "while writing": ("os", "write", 1, {"store": 0, "tmp": 1, "registered": 0, "pending": 0}),
    "after the journal entry": (
        "store.db:Database",
        "write",
        1,
        {"store": 0, "tmp": 1, "registered": 0, "pending": 1},
    ),
    "after the rename into the store": (
        "os",
        "rename",
        1,
        {"store": 1, "tmp": 0, "registered": 0, "pending": 1},
    ),
    "after the commit": (
        "store.db:Database",
        "write",
        2,
        {"store": 1, "tmp": 0, "registered": 1, "pending": 0},
    ),
}
KILLER = textwrap.dedent("""
    import importlib, os, signal, sys
    from store import Store
    state, src, owner, attr, nth = sys.argv[1:6]
    store = Store.open(state)
    module, _, cls = owner.partition(":")
    target = importlib.import_module(module)
    if cls:
        target = getattr(target, cls)
    real = getattr(target, attr)
    calls = 0
    def patched(*args, **kwargs):
        global calls
        result = real(*args, **kwargs)
        calls += 1
        if calls == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(target, attr, patched)
    store.add_path(src)
""")


def what_is_left(state: Path) -> dict[str, int]:
    store_dir = state / "store"
    conn = apsw.Connection(str(state / "var" / "db" / "db.sqlite"))
    registered = conn.execute("SELECT count(*) FROM ValidPaths").fetchone()[0]
    pending = conn.execute("SELECT count(*) FROM PendingAdds").fetchone()[0]
    conn.close()
    return {
        "store": len([n for n in os.listdir(store_dir) if not n.startswith(".")]),
        "tmp": len(os.listdir(store_dir / ".tmp")),
        "registered": registered,
        "pending": pending,
    }


@pytest.mark.parametrize("point", sorted(CRASH_POINTS))
def test_kill_at_each_step(tmp_path: Path, varied_tree: Path, point: str) -> None:
    state = tmp_path / "state"
    module, fn, nth, left = CRASH_POINTS[point]
    child = subprocess.run(
        [sys.executable, "-c", KILLER, str(state), str(varied_tree), module, fn, str(nth)],
        cwd=ROOT,
    )
    assert child.returncode == -signal.SIGKILL
    assert what_is_left(state) == left
    store = assert_clean(state)
    # The add either happened completely or not at all, and it can be done again.
    info = store.add_path(varied_tree)
    assert store.verify([info.path]).ok
    store.close()

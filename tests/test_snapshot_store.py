"""Build snapshots in a real store: what a capture keeps and refuses, the records and their
bounds, rooting and collection, a capture killed half-way, and the schema migration.

Real files made on the host as a builder's (root runs the tests), a real SQLite file, state
dirs under /tmp and /var/tmp.  Restoring is in tests/test_snapshot_restore.py.
"""

import dataclasses
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import apsw
import pytest

from store import gc
from store.db import MIGRATIONS, SCHEMA_VERSION
from store.durabledirs import Scope
from store.history import History
from store.snapshotfs import Capture, capture
from store.snapshots import (
    MAX_SNAPSHOTS_PER_DRV,
    SnapshotRecord,
    SnapshotState,
    SnapshotTooLarge,
)
from store.store import Store
from tests.conftest import tree_listing
from tests.test_store import a_derivation

BUILDER = 30042
OWNER = 30043
DURABLE = {"cache": "/build/durable"}


@pytest.fixture(name="state_root", params=["tmp", "var-tmp"])
def state_root_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    if request.param == "tmp":
        yield tmp_path / "state"
        return
    top = Path(tempfile.mkdtemp(prefix="weft-snapshots-", dir="/var/tmp"))
    yield top / "state"
    shutil.rmtree(top)


@pytest.fixture(name="store")
def store_fixture(state_root: Path) -> Iterator[Store]:
    s = Store.open(state_root)
    yield s
    s.close()


@dataclass
class Stopped:
    """A stopped build's directories on the host, as its sandbox left them."""

    drv: str
    build: Path
    tmp: Path
    out: Path

    def capture(
        self,
        store: Store,
        scope: Scope = Scope.DATA,
        state: SnapshotState = SnapshotState.COMMITTED,
        attempt: int = 1,
        candidates: tuple[str, ...] = (),
        durable: dict[str, str] = DURABLE,
        **kw: int,
    ) -> SnapshotRecord:
        c = Capture(
            drv=self.drv,
            attempt=attempt,
            scope=scope,
            reason="evicted" if state is SnapshotState.PAUSED else "failed",
            state=state,
            owner=OWNER,
            durable_dirs=durable,
            build_dir=self.build,
            tmp_dir=self.tmp,
            outputs={"out": self.out, "dev": self.out.parent / "never-made"},
            builder_uid=BUILDER,
            candidates=candidates,
        )
        return capture(store, c, **kw)


def builders(*paths: Path) -> None:
    for top in paths:
        for p in [top, *top.rglob("*")]:
            os.lchown(p, BUILDER, BUILDER)


def a_stopped_build(store: Store, where: Path, name: str = "thing") -> Stopped:
    """A build that wrote `durable/n` (its durable dir), `scratch/x`, /tmp and half an output."""
    build = where / "build"
    (build / "durable" / "sub").mkdir(parents=True)
    (build / "durable" / "n").write_text("n1")
    (build / "durable" / "sub" / "tool").write_text("#!/bin/sh\n")
    (build / "durable" / "sub" / "tool").chmod(0o755)
    (build / "scratch").mkdir()
    (build / "scratch" / "x").write_text("x")
    tmp = where / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    (tmp / "t").write_text("t")
    out = where / "out"
    out.mkdir()
    (out / "partial").write_text("half")
    builders(build, tmp, out)
    return Stopped(a_derivation(store, name), build, tmp, out)


def members(path: str) -> set[str]:
    return {os.fsdecode(k) for k in tree_listing(Path(path))}


def test_a_data_snapshot_keeps_the_durable_dirs_and_a_full_one_everything_written(
    store: Store, tmp_path: Path
) -> None:
    b = a_stopped_build(store, tmp_path)
    data = b.capture(store, Scope.DATA)
    durable = {"durable", "durable/cache", "durable/cache/n", "durable/cache/sub"}
    durable |= {"durable/cache/sub/tool"}
    assert members(data.path) == durable | {"snapshot.json"}
    full = b.capture(store, Scope.FULL, attempt=2)
    # A full snapshot keeps the durable dirs where the build had them, not twice.
    assert not members(full.path) & durable
    assert members(full.path) - members(data.path) == {
        "build",
        "build/durable",
        "build/durable/n",
        "build/durable/sub",
        "build/durable/sub/tool",
        "build/scratch",
        "build/scratch/x",
        "tmp",
        "tmp/t",
        "outputs",
        "outputs/out",
        "outputs/out/partial",
    }
    assert Path(full.path, "outputs/out/partial").read_text() == "half"
    assert os.path.basename(full.path).endswith("-thing-snapshot")
    manifest = json.loads(Path(full.path, "snapshot.json").read_text())
    assert manifest == {
        "weft-snapshot": 1,
        "drv": b.drv,
        "attempt": 2,
        "scope": "full",
        "reason": "failed",
        "created": full.created,
        "durableDirs": DURABLE,
    }
    assert store.snapshots.get(full.path) == full
    assert store.snapshots.get(data.path) == data
    assert data.scope is Scope.DATA and data.state is SnapshotState.COMMITTED
    assert data.owner == OWNER and data.durable_dirs == DURABLE
    assert full.nar_size == store.path_info(full.path).nar_size
    assert store.verify([data.path, full.path]).ok


def test_a_snapshot_takes_no_setuid_bit_no_hard_link_to_another_users_file_and_no_fifo(
    store: Store, tmp_path: Path
) -> None:
    b = a_stopped_build(store, tmp_path)
    secret = tmp_path / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    os.link(secret, b.build / "scratch" / "stolen")  # a hard link to a root-owned file
    os.link(secret, b.build / "durable" / "stolen")
    setuid = b.build / "durable" / "setuid"
    setuid.write_text("#!/bin/sh\n")
    os.chown(setuid, BUILDER, BUILDER)
    os.chmod(setuid, 0o6777)
    os.mkfifo(b.build / "durable" / "fifo")
    (b.build / "durable" / "shadow").symlink_to("/etc/shadow")
    (b.build / "durable" / "sub").chmod(0o1777)
    # A durable dir the builder made a symlink to a directory outside: not followed.
    (b.build / "etc").symlink_to("/etc")
    durable = {**DURABLE, "evil": "/build/etc"}
    for attempt, scope in enumerate(Scope):
        snap = Path(b.capture(store, scope, durable=durable, attempt=attempt).path)
        kept = snap / ("durable/cache" if scope is Scope.DATA else "build/durable")
        assert not (kept / "stolen").exists() and not (snap / "build/scratch/stolen").exists()
        assert not (kept / "fifo").exists() and not (snap / "durable" / "evil").exists()
        assert stat.S_IMODE((kept / "setuid").stat().st_mode) == 0o555
        assert stat.S_IMODE((kept / "sub").stat().st_mode) == 0o555
        assert stat.S_IMODE((kept / "n").stat().st_mode) == 0o444
        assert os.readlink(kept / "shadow") == "/etc/shadow"
        assert {p.lstat().st_uid for p in [snap, *snap.rglob("*")]} == {0}
        entries = [p for p in [snap, *snap.rglob("*")] if not p.is_symlink()]
        assert not any(p.stat().st_mode & 0o7222 for p in entries)
        if scope is Scope.FULL:
            assert os.readlink(snap / "build" / "etc") == "/etc"
    assert secret.read_text() == "root only" and secret.stat().st_mode & 0o777 == 0o600


def test_a_snapshot_over_the_size_limit_is_not_made_and_leaves_nothing_behind(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = a_stopped_build(store, tmp_path)
    big = b.build / "durable" / "big"
    big.write_bytes(os.urandom(1 << 20))
    os.chown(big, BUILDER, BUILDER)
    before = set(os.listdir(store.store_dir))
    with pytest.raises(SnapshotTooLarge, match="over 65,536 bytes"):
        b.capture(store, limit=64 << 10)
    assert store.snapshots.of_drv(b.drv) == []
    assert os.listdir(store.tmp.path) == []
    assert set(os.listdir(store.store_dir)) == before
    # The count is the archive's, to the byte (a fixed clock: the same snapshot each time).
    monkeypatch.setattr("store.snapshotfs.time.time", lambda: 1_700_000_000.5)
    made = b.capture(store)
    with pytest.raises(SnapshotTooLarge):
        b.capture(store, limit=made.nar_size - 1)
    assert b.capture(store, limit=made.nar_size) == made
    assert os.listdir(store.tmp.path) == []


def test_references_to_the_input_closure_and_the_derivation_are_found(
    store: Store, tmp_path: Path
) -> None:
    b = a_stopped_build(store, tmp_path)
    lib = store.add_text("lib", "a library").path
    tool = store.add_text("tool", "a tool").path
    unused = store.add_text("unused", "never named").path
    (b.build / "durable" / "lib").symlink_to(lib)
    (b.build / "scratch" / "x").write_text(f"ran {tool}/bin/tool")
    candidates = (lib, tool, unused)
    data = b.capture(store, Scope.DATA, candidates=candidates)
    assert sorted(store.references(data.path)) == sorted([b.drv, lib])
    full = b.capture(store, Scope.FULL, attempt=2, candidates=candidates)
    assert sorted(store.references(full.path)) == sorted([b.drv, lib, tool])


def test_the_seventeenth_committed_snapshot_drops_the_oldest_and_a_paused_one_replaces_its_own(
    store: Store, tmp_path: Path
) -> None:
    b = a_stopped_build(store, tmp_path)
    made = [b.capture(store, attempt=n) for n in range(1, MAX_SNAPSHOTS_PER_DRV + 2)]
    kept = store.snapshots.of_drv(b.drv)
    assert kept == made[:0:-1]  # newest first, the first one gone
    assert store.snapshots.get(made[0].path) is None
    assert store.snapshots.paused(b.drv) is None
    paused = b.capture(store, state=SnapshotState.PAUSED, attempt=20)
    assert store.snapshots.paused(b.drv) == paused
    again = b.capture(store, state=SnapshotState.PAUSED, attempt=21)
    assert store.snapshots.paused(b.drv) == again
    assert store.snapshots.get(paused.path) is None
    assert store.snapshots.of_drv(b.drv) == [again, *kept]
    other = a_stopped_build(store, tmp_path / "other", "other")
    mine = other.capture(store)
    assert store.snapshots.of_drv(other.drv) == [mine]
    assert len(store.snapshots.of_drv(b.drv)) == MAX_SNAPSHOTS_PER_DRV + 1


def test_the_snapshot_just_recorded_is_kept_even_if_the_clock_went_back(
    store: Store, tmp_path: Path
) -> None:
    b = a_stopped_build(store, tmp_path)
    first = b.capture(store, state=SnapshotState.PAUSED)
    # Made while the clock was an hour ahead, since set right.
    ahead = dataclasses.replace(first, created=first.created + 3600)
    store.snapshots.record(ahead)
    second = b.capture(store, state=SnapshotState.PAUSED, attempt=2)
    assert store.snapshots.paused(b.drv) == second
    assert store.snapshots.get(first.path) is None


def test_a_snapshot_is_a_root_until_forgotten_then_collected(store: Store, tmp_path: Path) -> None:
    b = a_stopped_build(store, tmp_path)
    lib = store.add_text("lib", "a library").path
    (b.build / "durable" / "lib").symlink_to(lib)
    snap = b.capture(store, candidates=(lib,))
    roots = [r for r in gc.find_roots(store) if r.path == snap.path]
    assert [r.source for r in roots] == ["{snapshot of thing}"]
    assert not {snap.path, lib, b.drv} & set(gc.delete(store, gc.plan(store)).deleted)
    assert store.is_valid(snap.path) and store.verify([snap.path]).ok
    assert store.snapshots.forget(snap.path) == snap
    assert store.snapshots.forget(snap.path) is None
    assert snap.path not in {r.path for r in gc.find_roots(store)}
    result = gc.delete(store, gc.plan(store))
    assert {snap.path, lib, b.drv} <= set(result.deleted)
    assert not os.path.lexists(snap.path)


def test_snapshots_are_found_by_derivation_output_or_their_own_path(
    store: Store, tmp_path: Path
) -> None:
    b = a_stopped_build(store, tmp_path)
    one, two = b.capture(store), b.capture(store, Scope.FULL, attempt=2)
    src = tmp_path / "built"
    src.write_text("built")
    out = f"{store.store_dir}/{store.parse(b.drv).hash_part}-thing"
    store.add_outputs(b.drv, {"out": (str(src), out)}, [])
    assert store.snapshots.for_target(b.drv) == [two, one]
    assert store.snapshots.for_target(out) == [two, one]
    assert store.snapshots.for_target(one.path) == [one]
    assert store.snapshots.for_target(store.add_text("x", "x").path) == []
    assert store.snapshots.roots() == sorted(
        [("snapshot of thing", one.path), ("snapshot of thing", two.path)],
        key=lambda r: r[1],
    )
    assert one.as_dict()["scope"] == "data" and two.as_dict()["state"] == "committed"
    json.dumps(two.as_dict())


def _store_names(store: Store) -> set[str]:
    return {n for n in os.listdir(store.store_dir) if not n.startswith(".")}


_KILLED_CAPTURE = """
import os, signal, sys
from pathlib import Path
from store.durabledirs import Scope
from store.snapshotfs import Capture, capture
from store.snapshots import SnapshotState, Snapshots
from store.snapshotcopy import Stager
from store.store import Store

root, build, drv, point = sys.argv[1:]
def die(*args, **kw):
    os.kill(os.getpid(), signal.SIGKILL)
target = {"staging": (Stager, "_copy"), "recording": (Snapshots, "record")}[point]
setattr(*target, die)
store = Store.open(root)
c = Capture(drv=drv, attempt=1, scope=Scope.DATA, reason="failed",
    state=SnapshotState.COMMITTED, owner=0, durable_dirs={"cache": "/build/durable"},
    build_dir=Path(build), tmp_dir=None, outputs={}, builder_uid=int(os.environ["BUILDER"]),
    candidates=())
capture(store, c)
"""


@pytest.mark.parametrize("point", ["staging", "recording"])
def test_a_capture_killed_half_way_leaves_no_record_and_its_debris_goes(
    store: Store, state_root: Path, tmp_path: Path, point: str
) -> None:
    b = a_stopped_build(store, tmp_path)
    before = _store_names(store)
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_CAPTURE, str(state_root), str(b.build), b.drv, point],
        cwd=Path(__file__).parent.parent,
        env={**os.environ, "BUILDER": str(BUILDER)},
    )
    assert child.returncode == -signal.SIGKILL
    assert os.listdir(store.tmp.path) != [] or point == "recording"
    store.recover()  # as the next open of the store does
    assert os.listdir(store.tmp.path) == []
    assert store.snapshots.of_drv(b.drv) == []
    left = _store_names(store) - before
    if point == "recording":
        # Added, never recorded: garbage, not a snapshot.
        (name,) = left
        assert name.endswith("-thing-snapshot")
        assert f"{store.store_dir}/{name}" in gc.delete(store, gc.plan(store)).deleted
    else:
        assert left == set()
    assert store.verify().ok


def test_a_version_3_database_opens_at_version_4_with_its_rows(
    state_root: Path, tmp_path: Path
) -> None:
    db_dir = state_root / "var" / "db"
    db_dir.mkdir(parents=True)
    conn = apsw.Connection(str(db_dir / "db.sqlite"))
    for step, migration in enumerate(MIGRATIONS[:3]):
        conn.execute(migration)
        conn.execute(f"PRAGMA user_version = {step + 1}")
    conn.execute(
        "INSERT INTO BuildAttempts (drv, attempt, start_time, end_time, outcome, exit_code,"
        " load_start, load_peak, parallelism, paused) VALUES"
        " ('/x/old.drv', 1, 1.0, 2.0, 'exit', 1, '{}', '{}', 1, 0)"
    )
    conn.execute("INSERT INTO Flaky (drv, marked) VALUES ('/x/old.drv', 5)")
    conn.close()
    with Store.open(state_root) as s:
        with s.db.connection() as c:
            assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        history = History(s.db)
        (old,) = history.attempts("/x/old.drv")
        assert (old.outcome, old.exit_code, old.snapshot) == ("exit", 1, None)
        assert history.is_flaky("/x/old.drv")
        b = a_stopped_build(s, tmp_path)
        snap = b.capture(s)
        assert s.snapshots.of_drv(b.drv) == [snap]
    with Store.open(state_root) as s:  # and opens again as it is
        assert s.snapshots.get(snap.path) == snap

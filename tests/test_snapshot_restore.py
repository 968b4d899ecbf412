"""Restoring build snapshots onto a build's directories, and the snapshot each attempt in
the history left: real snapshots of real files (tests/test_snapshot_store.py makes them),
restored as root, written to as the builder."""

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from store.durabledirs import Scope
from store.errors import StoreError
from store.history import AttemptRecord, History
from store.snapshotfs import Restore, RestoreTarget, restore
from store.store import Store
from tests.test_snapshot_store import (  # noqa: F401 (fixtures, used by name)
    a_stopped_build,
    state_root_fixture,
    store_fixture,
)

USER = 30044  # the next build's builder


@pytest.fixture
def slots() -> Iterator[Path]:
    """Where the next build's slot is: a directory its builder may pass through (pytest's
    own are root's only), as var/builds is."""
    top = Path(tempfile.mkdtemp(prefix="weft-slots-"))
    top.chmod(0o755)
    yield top
    shutil.rmtree(top)


def a_target(where: Path, durable: dict[str, str]) -> RestoreTarget:
    """An emptied slot: the build dir and /tmp as the daemon makes them."""
    build, tmp = where / "build", where / "tmp"
    build.mkdir(parents=True)
    where.chmod(0o755)
    tmp.mkdir()
    tmp.chmod(0o1777)
    os.chown(build, USER, USER)
    return RestoreTarget(build, tmp, {"out": where / "out"}, durable, USER, USER)


def owned(top: Path) -> dict[str, tuple[int, int, int]]:
    """Relative path -> (uid, gid, mode) of everything under `top`."""
    return {
        str(p.relative_to(top)): (
            p.lstat().st_uid,
            p.lstat().st_gid,
            stat.S_IMODE(p.lstat().st_mode),
        )
        for p in top.rglob("*")
        if not p.is_symlink()
    }


def as_builder(*command: str) -> None:
    subprocess.run(
        ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups", *command], check=True
    )


def test_a_data_restore_fills_the_targets_durable_dirs_writable_by_its_builder(
    store: Store, tmp_path: Path, slots: Path
) -> None:
    b = a_stopped_build(store, tmp_path / "old")
    (b.build / "durable" / "lib").symlink_to("sub/tool")
    snap = b.capture(store, Scope.DATA)
    target = a_target(slots / "new", {"cache": "/build/my cache/ccache", "db": "/build/db"})
    assert restore(store.store_dir, snap, target, Restore.DATA) == ["durable/cache"]
    cache = target.build_dir / "my cache" / "ccache"
    assert (cache / "n").read_text() == "n1"
    assert os.readlink(cache / "lib") == "sub/tool"
    assert os.lstat(cache / "lib").st_uid == USER
    assert owned(target.build_dir) == {
        "my cache": (USER, USER, 0o755),
        "my cache/ccache": (USER, USER, 0o755),
        "my cache/ccache/n": (USER, USER, 0o644),
        "my cache/ccache/sub": (USER, USER, 0o755),
        "my cache/ccache/sub/tool": (USER, USER, 0o755),
    }
    assert os.listdir(target.tmp_dir) == [] and not target.outputs["out"].exists()
    as_builder("sh", "-c", f"echo more >> '{cache}/n' && mkdir '{cache}/sub/new'")
    assert (cache / "n").read_text() == "n1more\n"


def test_a_full_restore_puts_back_the_build_dir_tmp_and_partial_output_over_what_is_there(
    store: Store, tmp_path: Path, slots: Path
) -> None:
    b = a_stopped_build(store, tmp_path / "old")
    snap = b.capture(store, Scope.FULL)
    target = a_target(slots / "new", {"cache": "/build/durable"})
    (target.build_dir / "scratch").mkdir()
    (target.build_dir / "scratch" / "x").write_text("stale")
    (target.build_dir / "scratch" / "mine").write_text("kept")
    (target.build_dir / "durable").write_text("a file where a dir goes")
    got = restore(store.store_dir, snap, target, Restore.FULL)
    assert got == ["build", "tmp", "outputs/out"]
    assert (target.build_dir / "scratch" / "x").read_text() == "x"
    assert (target.build_dir / "scratch" / "mine").read_text() == "kept"
    assert (target.build_dir / "durable" / "n").read_text() == "n1"
    assert (target.tmp_dir / "t").read_text() == "t"
    assert (target.outputs["out"] / "partial").read_text() == "half"
    assert stat.S_IMODE(target.tmp_dir.stat().st_mode) == 0o1777
    for top in (target.tmp_dir, target.outputs["out"]):
        assert {o[:2] for o in owned(top).values()} == {(USER, USER)}
    assert owned(target.build_dir)["durable/sub/tool"] == (USER, USER, 0o755)
    assert owned(target.outputs["out"].parent)["out"] == (USER, USER, 0o755)
    as_builder("sh", "-c", f"echo done > '{target.outputs['out']}/partial'")


def test_a_full_snapshot_restores_as_data_from_its_build_dir_into_another_layout(
    store: Store, tmp_path: Path
) -> None:
    b = a_stopped_build(store, tmp_path / "old")
    snap = b.capture(store, Scope.FULL)
    target = a_target(tmp_path / "new", {"cache": "/build/elsewhere"})
    assert restore(store.store_dir, snap, target, Restore.DATA) == ["durable/cache"]
    assert set(owned(target.build_dir)) == {
        "elsewhere",
        "elsewhere/n",
        "elsewhere/sub",
        "elsewhere/sub/tool",
    }
    assert os.listdir(target.tmp_dir) == []


def test_a_data_snapshot_cannot_be_restored_in_full(store: Store, tmp_path: Path) -> None:
    b = a_stopped_build(store, tmp_path / "old")
    snap = b.capture(store, Scope.DATA)
    target = a_target(tmp_path / "new", {})
    with pytest.raises(StoreError, match="data snapshot: it holds no build dir"):
        restore(store.store_dir, snap, target, Restore.FULL)
    assert os.listdir(target.build_dir) == []


def test_a_partial_output_whose_store_dir_is_not_laid_out_is_not_restored(
    store: Store, tmp_path: Path
) -> None:
    b = a_stopped_build(store, tmp_path / "old")
    snap = b.capture(store, Scope.FULL)
    target = a_target(tmp_path / "new", {})
    target.outputs["out"] = tmp_path / "new" / "root" / "store" / "out"
    assert restore(store.store_dir, snap, target, Restore.FULL) == ["build", "tmp"]
    assert not (tmp_path / "new" / "root").exists()


def test_a_restore_follows_no_symlink_a_previous_builder_left(store: Store, tmp_path: Path) -> None:
    b = a_stopped_build(store, tmp_path / "old")
    full = b.capture(store, Scope.FULL)
    outside = tmp_path / "outside"
    outside.mkdir()
    target = a_target(tmp_path / "new", {"cache": "/build/deep/cache"})
    (target.build_dir / "deep").symlink_to(outside)
    (target.build_dir / "scratch").symlink_to(outside)
    (target.tmp_dir / "t").symlink_to(outside / "t")
    restore(store.store_dir, full, target, Restore.DATA)
    restore(store.store_dir, full, target, Restore.FULL)
    assert os.listdir(outside) == []
    assert not (target.build_dir / "deep").is_symlink()
    assert (target.build_dir / "deep" / "cache" / "n").read_text() == "n1"
    assert (target.build_dir / "scratch" / "x").read_text() == "x"
    assert not (target.tmp_dir / "t").is_symlink()
    # A build dir that is itself a symlink is refused, not followed.
    linked = tmp_path / "linked"
    linked.symlink_to(outside)
    moved = RestoreTarget(linked, None, {}, target.durable_dirs, USER, USER)
    with pytest.raises(OSError):
        restore(store.store_dir, full, moved, Restore.DATA)
    assert os.listdir(outside) == []


def test_each_attempt_in_the_history_keeps_the_snapshot_it_left(
    store: Store, tmp_path: Path
) -> None:
    b = a_stopped_build(store, tmp_path / "old")
    snap = b.capture(store)
    history = History(store.db)
    common = dict(
        drv=b.drv,
        start_time=1.0,
        end_time=2.0,
        exit_code=None,
        load_start={},
        load_peak={},
        parallelism=1,
        paused=0.0,
    )
    history.record(AttemptRecord(attempt=1, outcome="evicted", snapshot=snap.path, **common))
    history.record(AttemptRecord(attempt=2, outcome="built", **common))  # type: ignore[arg-type]
    first, second = history.attempts(b.drv)
    assert (first.outcome, first.snapshot) == ("evicted", snap.path)
    assert second.snapshot is None
    assert first.as_dict()["snapshot"] == snap.path
    # An eviction is no failure: a success after it does not make the derivation flaky.
    assert not history.is_flaky(b.drv)

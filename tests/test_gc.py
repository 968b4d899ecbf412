"""Garbage collection and upkeep on a real store: roots, marking, deletion, races, optimise."""

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from store import gc
from store.layout import StateDir
from store.store import Store, StoreError
from store.tmparea import DELETION
from tests.test_store import a_derivation


def _text(store: Store, name: str, refs: tuple[str, ...] = ()) -> str:
    return store.add_text(name, f"{name} {' '.join(refs)}", refs).path


def _collect(store: Store, **kw: object) -> gc.GCResult:
    return gc.delete(store, gc.plan(store), **kw)  # type: ignore[arg-type]


def _all_valid(store: Store) -> set[str]:
    with store.db.connection() as conn:
        return {r[0] for r in conn.execute("SELECT path FROM ValidPaths")}


def _on_disk(store: Store) -> set[str]:
    return {
        os.path.join(store.store_dir, n)
        for n in os.listdir(store.store_dir)
        if not n.startswith(".") and not n.endswith(".lock")
    }


def _consistent(store: Store) -> None:
    assert _all_valid(store) == _on_disk(store)
    assert store.verify().ok


def test_direct_root_keeps_its_closure_and_the_rest_goes(store: Store) -> None:
    lib = _text(store, "lib")
    app = _text(store, "app", (lib,))
    junk = _text(store, "junk", (lib,))
    os.symlink(app, store.state.gcroots_dir / "app")
    result = _collect(store)
    assert result.deleted == [junk]
    assert _all_valid(store) == {app, lib}
    _consistent(store)


def test_a_root_inside_a_store_path_and_a_plain_file_root(store: Store, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "tool").write_text("#!/bin/sh\n")
    tool = store.add_path(tree).path
    named = _text(store, "named")
    os.symlink(f"{tool}/bin/tool", store.state.gcroots_dir / "tool")
    (store.state.gcroots_dir / os.path.basename(named)).write_text("")
    assert not _collect(store).deleted
    roots = {r.path for r in gc.find_roots(store)}
    assert roots == {tool, named}


def test_indirect_roots_follow_the_users_link_and_dangling_ones_are_dropped(
    store: Store, tmp_path: Path
) -> None:
    kept = _text(store, "kept")
    dropped = _text(store, "dropped")
    auto = store.state.gcroots_dir / "auto"
    for name, target in (("kept", kept), ("dropped", dropped)):
        link = tmp_path / f"result-{name}"
        link.symlink_to(target)
        os.symlink(link, auto / name)
    (tmp_path / "result-dropped").unlink()
    result = _collect(store)
    assert result.deleted == [dropped]
    assert os.listdir(auto) == ["kept"]
    assert {(r.source, r.path) for r in gc.find_roots(store)} == {
        (str(tmp_path / "result-kept"), kept)
    }


def test_an_indirect_root_keeps_its_path_until_the_users_link_goes(
    store: Store, tmp_path: Path
) -> None:
    kept = _text(store, "kept")
    link = tmp_path / "result"
    link.symlink_to(kept)
    entry = gc.add_indirect_root(store, str(link))
    assert entry.parent == store.state.gcroots_dir / "auto"
    assert os.readlink(entry) == str(link)
    # Made again, the same entry is put in place again: nothing else appears beside it.
    assert gc.add_indirect_root(store, str(link)) == entry
    assert os.listdir(entry.parent) == [entry.name]
    assert not _collect(store).deleted
    assert [(r.source, r.path) for r in gc.find_roots(store)] == [(str(link), kept)]
    with pytest.raises(StoreError, match="not absolute"):
        gc.add_indirect_root(store, "result")
    link.unlink()
    assert _collect(store).deleted == [kept]
    assert not os.path.lexists(entry)


def test_pins_are_roots_and_released_pins_are_not(store: Store) -> None:
    a = store.add_text("a", "a", pin="client-1").path
    b = store.add_text("b", "b", pin="client-2").path
    roots = gc.find_roots(store)
    assert {(r.source, r.path) for r in roots} == {("{client-1}", a), ("{client-2}", b)}
    store.pins.release("client-2")
    assert _collect(store).deleted == [b]
    assert _all_valid(store) == {a}


def test_keep_derivations_and_keep_outputs(store: Store, tmp_path: Path) -> None:
    drv = a_derivation(store, "x")
    src = tmp_path / "out"
    src.write_text("built")
    out_path = f"{store.store_dir}/{store.parse(drv).hash_part}-x"
    (info,) = store.add_outputs(drv, {"out": (str(src), out_path)}, [])
    os.symlink(info.path, store.state.gcroots_dir / "out")
    # keep-derivations (the default): the .drv that built a live path stays.
    plan = gc.plan(store, keep_outputs=False, keep_derivations=True)
    assert drv in plan.live
    assert gc.plan(store, keep_outputs=False, keep_derivations=False).dead == [drv]
    # keep-outputs: the outputs of a live derivation stay.
    os.unlink(store.state.gcroots_dir / "out")
    os.symlink(drv, store.state.gcroots_dir / "drv")
    assert gc.plan(store, keep_outputs=False, keep_derivations=True).dead == [out_path]
    assert gc.plan(store, keep_outputs=True, keep_derivations=True).dead == []


def test_max_freed_stops_early_and_dry_run_lists_what_a_real_run_deletes(store: Store) -> None:
    paths = [store.add_text(f"p{i}", "x" * 10_000).path for i in range(20)]
    plan = gc.plan(store)
    assert sorted(plan.dead) == sorted(paths)
    dry = gc.simulate(plan, None)
    result = _collect(store, max_freed=35_000)
    assert 35_000 <= result.bytes_freed < 60_000
    assert 4 <= len(result.deleted) <= 5
    rest = gc.simulate(gc.plan(store), None)
    assert set(rest) == set(dry) - set(result.deleted)
    assert set(_collect(store).deleted) == set(rest)
    assert not _all_valid(store)


def test_delete_only_dead_paths(store: Store) -> None:
    lib = _text(store, "lib")
    app = _text(store, "app", (lib,))
    dead = _text(store, "dead")
    os.symlink(app, store.state.gcroots_dir / "app")
    with pytest.raises(gc.StillAlive, match="referenced by"):
        gc.restrict(gc.plan(store), [lib], store)
    with pytest.raises(gc.StillAlive, match="a root"):
        gc.restrict(gc.plan(store), [app], store)
    user = _text(store, "user", (dead,))
    with pytest.raises(gc.StillAlive, match="refers to it"):
        gc.restrict(gc.plan(store), [dead], store)
    result = gc.delete(store, gc.restrict(gc.plan(store), [dead, user], store))
    assert result.deleted == [user, dead]
    assert _all_valid(store) == {app, lib}


def test_a_path_pinned_after_marking_survives_with_its_closure(store: Store) -> None:
    lib = _text(store, "lib")
    app = _text(store, "app", (lib,))
    plan = gc.plan(store)
    assert set(plan.dead) == {app, lib}
    store.pins.pin("late client", [app])
    result = gc.delete(store, plan)
    assert result.deleted == []
    assert set(result.kept) == {app, lib}
    _consistent(store)


def test_a_path_added_after_marking_keeps_its_references(store: Store) -> None:
    lib = _text(store, "lib")
    plan = gc.plan(store)
    # Unpinned on purpose: the database alone must refuse to drop a referenced path.
    user = _text(store, "user", (lib,))
    assert gc.delete(store, plan).kept == [lib]
    assert _all_valid(store) == {lib, user}
    _consistent(store)


def test_pinning_waits_while_the_path_is_being_deleted(store: Store) -> None:
    path = store.add_text("victim", "v").path
    assert store.pins.begin_delete(path)
    got: list[bool] = []

    def pin_then_check() -> None:
        store.pins.pin("client", [path])
        got.append(store.is_valid(path))

    t = threading.Thread(target=pin_then_check)
    t.start()
    time.sleep(0.2)
    assert not got  # still waiting
    store.invalidate(path)
    store.pins.end_delete([path])
    t.join(5)
    assert got == [False]  # it saw the deletion finished, never a half-deleted path
    again = store.add_text("victim", "v", pin="client").path
    assert again == path and store.is_valid(path) and os.path.exists(path)


def test_gc_while_threads_add_and_pin(store: Store) -> None:
    """Adders pin, then look up or add; a collector loops.  Nothing pinned is lost, and
    the database and the disk agree afterwards."""
    stop = threading.Event()
    errors: list[BaseException] = []
    kept: list[tuple[str, list[str]]] = []

    def adder(n: int) -> None:
        try:
            i = 0
            while not stop.is_set():
                owner = f"adder-{n}-{i}"
                shared = store.add_text("shared", "common content", pin=owner).path
                mine = store.add_text(f"a{n}", f"{n} {i}", (shared,), pin=owner).path
                for p in (shared, mine):
                    assert os.path.exists(p), p
                kept.append((owner, [shared, mine]))
                if i % 2:
                    store.pins.release(owner)
                i += 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=adder, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    collected = 0
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        collected += len(_collect(store, batch_size=4).deleted)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert collected > 0
    pinned = store.pins.pinned()
    for owner, paths in kept:
        if set(paths) <= pinned:
            assert all(store.is_valid(p) and os.path.exists(p) for p in paths), owner
    _consistent(store)


def test_a_deletion_interrupted_before_its_commit_is_undone(store: Store) -> None:
    path = store.add_text("survivor", "content").path
    gone = store.add_text("gone", "content 2").path
    # As a collector leaves its batch if it dies between the renames and the commit (of
    # `survivor`) and after the commit (of `gone`): a dead owner's deletion directory.
    batch = store.tmp.path / f"999999.1.0{DELETION}"
    batch.mkdir()
    os.rename(path, batch / os.path.basename(path))
    store.invalidate(gone)
    os.rename(gone, batch / os.path.basename(gone))
    store.close()
    reopened = Store(store.state)
    assert reopened.is_valid(path) and Path(path).read_text() == "content"
    assert not os.path.lexists(gone)
    assert os.listdir(reopened.tmp.path) == []
    reopened.close()


def test_optimise_links_identical_files_once(store: Store, tmp_path: Path) -> None:
    payload = os.urandom(100_000)
    srcs = []
    for i in range(3):
        d = tmp_path / f"t{i}"
        d.mkdir()
        (d / "same").write_bytes(payload)
        (d / f"own{i}").write_bytes(os.urandom(1000))
        srcs.append(store.add_path(d).path)
    exe = tmp_path / "exe"
    exe.write_bytes(payload)
    exe.chmod(0o755)
    exe_path = store.add_path(exe).path
    hashes = {p: store.path_info(p).nar_hash for p in [*srcs, exe_path]}
    stats = store.optimise()
    assert stats.bytes_saved == 2 * len(payload)
    inodes = {os.stat(f"{p}/same").st_ino for p in srcs}
    assert len(inodes) == 1
    # Same bytes but executable: a different file to an archive, so not linked.
    assert os.stat(exe_path).st_ino not in inodes
    assert store.optimise().bytes_saved == 0  # idempotent
    report = store.verify()
    assert report.ok and {p: store.path_info(p).nar_hash for p in hashes} == hashes
    # The collector frees a shared file only with its last user, and then its link.
    result = gc.delete(store, gc.restrict(gc.plan(store), srcs[:2], store))
    assert result.links_removed == 2  # their own files' entries, not the shared one
    assert result.bytes_freed == 2 * 1000  # a file is freed with its last link
    assert os.stat(f"{srcs[2]}/same").st_nlink == 2
    result = _collect(store)
    assert result.links_removed >= 1
    assert os.listdir(store.state.links_dir) == []


@pytest.mark.parametrize("err", [errno.EMLINK, errno.ENOSPC])
@pytest.mark.parametrize("refused", ["the shared entry", "a store file's new link"])
def test_optimise_leaves_a_file_it_cannot_link(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int, refused: str
) -> None:
    payload = os.urandom(10_000)
    paths = []
    for i in range(2):
        f = tmp_path / f"f{i}"
        f.write_bytes(payload)
        paths.append(store.add_path(f).path)
    links = str(store.state.links_dir)
    real_link = os.link

    def link(src: str, dst: str) -> None:
        # The kernel's answer for a file with too many links, or a directory that is full.
        if str(dst).startswith(links) == (refused == "the shared entry"):
            raise OSError(err, os.strerror(err), str(dst))
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link)
    assert store.optimise().bytes_saved == 0
    monkeypatch.undo()
    assert os.stat(paths[0]).st_ino != os.stat(paths[1]).st_ino
    assert [Path(p).read_bytes() for p in paths] == [payload, payload]
    assert store.verify().ok
    assert os.listdir(store.tmp.path) == []
    # Once the kernel allows it, the same files are linked.
    assert store.optimise().bytes_saved == len(payload)
    assert os.stat(paths[0]).st_ino == os.stat(paths[1]).st_ino


def test_auto_optimise_links_new_paths(tmp_path: Path) -> None:
    s = Store(StateDir.at(tmp_path / "state"), auto_optimise=True)
    a = s.add_text("a", "same text, twice over " * 100).path
    b = s.add_text("b", "same text, twice over " * 100).path
    assert os.stat(a).st_ino == os.stat(b).st_ino
    assert s.verify().ok
    s.close()


def test_optimise_and_collect_at_once(store: Store) -> None:
    """Optimising while the collector removes paths and `.links` entries: every file
    keeps its contents, and no entry outlives its last user."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def optimiser() -> None:
        try:
            while not stop.is_set():
                store.optimise()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=optimiser)
    t.start()
    kept: list[str] = []
    for i in range(30):
        owner = f"round-{i}"
        paths = [
            store.add_text(f"f{i}-{j}", f"shared {j % 3}\n" * 500, pin=owner).path for j in range(6)
        ]
        kept.append(paths[0])
        store.pins.release(owner)
        store.pins.pin("keeper", [paths[0]])
        _collect(store)
    stop.set()
    t.join()
    assert not errors, errors[0]
    _collect(store)  # what the optimiser had pinned while the last round collected
    assert _all_valid(store) == set(kept)
    _consistent(store)
    store.optimise()
    _collect(store)
    for entry in os.scandir(store.state.links_dir):
        assert entry.stat().st_nlink > 1, entry.name


def test_a_pin_handed_over_to_a_root_behind_the_walk_keeps_its_path(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A client pins, writes a root on disk, then unpins (store-run's runtimes,
    # `store-build -o`).  If the root appears after the walk over gcroots/ passed and the
    # pin is gone before the deletion, only the collection's memory of pins saves it.
    path = store.add_text("handed-over", "kept\n", []).path
    from store.gc import roots as roots_module

    real_walk = os.walk

    def walk_then_hand_over(top, *args, **kwargs):  # type: ignore[no-untyped-def]
        yield from real_walk(top, *args, **kwargs)
        owner = object()
        store.pins.pin(owner, [path])
        os.symlink(path, store.state.gcroots_dir / "late-root")
        store.pins.release(owner)

    monkeypatch.setattr(roots_module.os, "walk", walk_then_hand_over)
    with store.pins.collecting():
        plan = gc.plan(store)
        assert path in plan.dead  # the walk missed the root, and the pin is gone
        result = gc.delete(store, plan)
    assert path not in result.deleted and store.is_valid(path)
    monkeypatch.undo()
    assert path in gc.plan(store).live  # the next collection sees the root itself

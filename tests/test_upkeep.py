"""The daemon's collector answering `store-gc`'s modes, on a real store (no daemon)."""

import os
from pathlib import Path

import pytest

from daemon.proc.workers import Workers
from daemon.settings import Settings
from daemon.upkeep.collector import Collector, DeadPaths, GCMode, LivePaths, RootsFound
from store import gc
from store.paths import InvalidPath
from store.store import Store


def _text(store: Store, name: str, refs: tuple[str, ...] = ()) -> str:
    return store.add_text(name, f"{name} {' '.join(refs)}", refs).path


async def test_each_gc_mode_lists_what_it_says_and_only_collect_deletes(store: Store) -> None:
    lib = _text(store, "lib")
    app = _text(store, "app", (lib,))
    dead = [_text(store, f"dead{i}") for i in range(3)]
    os.symlink(app, store.state.gcroots_dir / "app")
    collector = Collector(store, Settings(), Workers())

    roots = await collector.run(GCMode.PRINT_ROOTS)
    assert roots == RootsFound([gc.Root(str(store.state.gcroots_dir / "app"), app)])
    assert await collector.run(GCMode.PRINT_LIVE) == LivePaths(sorted([app, lib]))
    sizes = {p: store.path_info(p).nar_size for p in dead}  # type: ignore[union-attr]
    assert await collector.run(GCMode.PRINT_DEAD) == DeadPaths(sorted(dead), sum(sizes.values()))
    # A dry run with a byte limit lists the dead paths a collection would stop after.
    one = await collector.run(GCMode.DRY_RUN, max_freed=1)
    assert isinstance(one, DeadPaths) and len(one.paths) == 1
    assert one.nar_bytes == sizes[one.paths[0]]
    only = await collector.run(GCMode.DRY_RUN, only=[dead[0]])
    assert only == DeadPaths([dead[0]], sizes[dead[0]])
    assert store.valid_paths([app, lib, *dead]) == {app, lib, *dead}

    deleted = await collector.run(GCMode.COLLECT, only=[dead[1]])
    assert isinstance(deleted, gc.GCResult) and deleted.deleted == [dead[1]]
    rest = await collector.run(GCMode.COLLECT)
    assert isinstance(rest, gc.GCResult) and sorted(rest.deleted) == sorted([dead[0], dead[2]])
    assert store.valid_paths([app, lib, *dead]) == {app, lib}


async def test_a_gc_request_naming_a_live_or_malformed_path_deletes_nothing(
    store: Store, tmp_path: Path
) -> None:
    lib = _text(store, "lib")
    os.symlink(lib, store.state.gcroots_dir / "lib")
    dead = _text(store, "dead")
    collector = Collector(store, Settings(), Workers())
    with pytest.raises(gc.StillAlive, match="a root"):
        await collector.run(GCMode.COLLECT, only=[lib, dead])
    with pytest.raises(gc.StillAlive, match="a root"):
        await collector.run(GCMode.PRINT_DEAD, only=[lib])
    with pytest.raises(InvalidPath):
        await collector.run(GCMode.PRINT_ROOTS, only=[str(tmp_path / "not-in-the-store")])
    assert store.valid_paths([lib, dead]) == {lib, dead}

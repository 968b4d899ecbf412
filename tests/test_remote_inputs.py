"""The input root, Command and Action of a remote build (`remote/inputs.py`,
`remote/action.py`): the closure at its store paths beside `build/` and `weft-derivation`,
taken apart again as a worker does, and messages canonical enough that two daemons asking
for the same build ask for the same Action."""

import os
from pathlib import Path

import pytest

from remote.action import (
    STORE_DIR_PROPERTY,
    action_for,
    add_action,
    command_for,
    platform_for,
    platform_properties,
)
from remote.digests import Blobs, Digest, NodeKind, PathNode, node_of, sha256_digest, to_proto
from remote.errors import DigestMismatch, NotRepresentable
from remote.inputs import derivation_digest, input_root, read_input_root
from remote.wire import reapi_pb2

STORE = "/tmp/x/state/store"


def _directories(blobs: Blobs) -> dict[Digest, reapi_pb2.Directory]:
    """Every blob of `blobs` that parses as a Directory, as a worker would find them."""
    found = {}
    for digest in blobs:
        source = blobs.source(digest)
        if isinstance(source, bytes):
            try:
                found[digest] = reapi_pb2.Directory.FromString(source)
            except Exception:
                continue
    return found


def _closure(tmp_path: Path) -> dict[str, PathNode]:
    lib = tmp_path / "lib"
    (lib / "bin").mkdir(parents=True)
    (lib / "bin" / "tool").write_text("#!/bin/sh\n")
    (lib / "bin" / "tool").chmod(0o755)
    src = tmp_path / "src"
    src.write_text("source")
    return {
        f"{STORE}/aaaa-lib": node_of(str(lib)),
        f"{STORE}/bbbb-src": node_of(str(src)),
        f"{STORE}/cccc-link": PathNode(NodeKind.SYMLINK, None, target=f"{STORE}/aaaa-lib"),
        f"{STORE}/dddd-x.drv": node_of(str(src)),
    }


def test_the_closure_lies_at_its_store_paths_beside_build_and_the_derivation(
    tmp_path: Path,
) -> None:
    nodes = _closure(tmp_path)
    blobs = Blobs()
    root = input_root(STORE, nodes, f"{STORE}/dddd-x.drv", blobs)
    dirs = _directories(blobs)

    top = dirs[root]
    assert [d.name for d in top.directories] == ["build", "tmp"]
    assert [f.name for f in top.files] == ["weft-derivation"]
    assert blobs.source(top.files[0].digest) == f"{STORE}/dddd-x.drv".encode()
    build = top.directories[0].digest
    assert dirs[Digest(build.hash, build.size_bytes)] == reapi_pb2.Directory()
    where = top
    for name in ["tmp", "x", "state", "store"]:
        (entry,) = [d for d in where.directories if d.name == name]
        where = dirs[Digest(entry.digest.hash, entry.digest.size_bytes)]
    assert [f.name for f in where.files] == ["bbbb-src", "dddd-x.drv"]
    assert [d.name for d in where.directories] == ["aaaa-lib"]
    assert [(s.name, s.target) for s in where.symlinks] == [("cccc-link", f"{STORE}/aaaa-lib")]

    drv = blobs.source(derivation_digest(dirs, root))
    parsed = read_input_root(dirs, root, STORE, drv)
    assert parsed.drv_path == f"{STORE}/dddd-x.drv"
    assert {p: (n.kind, n.digest, n.is_executable, n.target) for p, n in parsed.paths.items()} == {
        p: (n.kind, n.digest, n.is_executable, n.target) for p, n in nodes.items()
    }


def test_the_same_closure_in_any_order_gives_the_same_root(tmp_path: Path) -> None:
    nodes = _closure(tmp_path)
    backwards = dict(reversed(list(nodes.items())))
    one = input_root(STORE, nodes, f"{STORE}/dddd-x.drv", Blobs())
    two = input_root(STORE, backwards, f"{STORE}/dddd-x.drv", Blobs())
    assert one == two


@pytest.mark.parametrize(
    "store_dir", ["/build/store", "/weft-derivation", "relative/store", "/a//b"]
)
def test_a_store_dir_the_layout_cannot_hold_is_refused(tmp_path: Path, store_dir: str) -> None:
    with pytest.raises(NotRepresentable):
        input_root(store_dir, {}, f"{store_dir}/x.drv", Blobs())


def test_a_path_outside_the_store_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("f")
    with pytest.raises(NotRepresentable):
        input_root(STORE, {"/elsewhere/aaaa-f": node_of(str(tmp_path / "f"))}, "/x.drv", Blobs())


def test_a_worker_refuses_an_input_root_that_lies(tmp_path: Path) -> None:
    nodes = _closure(tmp_path)
    blobs = Blobs()
    root = input_root(STORE, nodes, f"{STORE}/dddd-x.drv", blobs)
    dirs = _directories(blobs)
    with pytest.raises(DigestMismatch):
        read_input_root(dirs, root, STORE, f"{STORE}/other.drv".encode())
    with pytest.raises(NotRepresentable):  # another store dir than the worker's
        read_input_root(dirs, root, "/other/store", f"{STORE}/dddd-x.drv".encode())
    # A Directory swapped for another under the same digest.
    where = dirs[root]
    for _ in range(4):
        entry = where.directories[-1]
        where = dirs[Digest(entry.digest.hash, entry.digest.size_bytes)]
    swapped = reapi_pb2.Directory()
    swapped.CopyFrom(where)
    swapped.symlinks.add(name="eeee-more", target="/etc")
    dirs[sha256_digest(where.SerializeToString(deterministic=True))] = swapped
    with pytest.raises(DigestMismatch):
        read_input_root(dirs, root, STORE, f"{STORE}/dddd-x.drv".encode())


@pytest.mark.parametrize("name", ["eeee-fine", "bbbb-src", "..", "a/b", ""])
def test_a_worker_refuses_a_store_entry_it_cannot_lay_out(name: str) -> None:
    drv = f"{STORE}/bbbb-src".encode()
    store = reapi_pb2.Directory()
    store.files.add(name="bbbb-src", digest=to_proto(sha256_digest(b"x")))
    store.symlinks.add(name=name, target="/etc")
    blobs = Blobs()
    digest = blobs.add_message(store)
    for component in reversed(["x", "state", "store"]):
        wrapper = reapi_pb2.Directory()
        wrapper.directories.add(name=component, digest=to_proto(digest))
        digest = blobs.add_message(wrapper)
    top = reapi_pb2.Directory()
    top.files.add(name="weft-derivation", digest=to_proto(sha256_digest(drv)))
    top.directories.add(name="tmp", digest=to_proto(digest))
    root = blobs.add_message(top)
    if name == "eeee-fine":
        parsed = read_input_root(_directories(blobs), root, STORE, drv)
        assert parsed.paths[f"{STORE}/{name}"].target == "/etc"
        return
    with pytest.raises(NotRepresentable):
        read_input_root(_directories(blobs), root, STORE, drv)


def test_commands_and_actions_are_canonical() -> None:
    platform = platform_for(STORE, {"pool": "big", "OSFamily": "linux"})
    assert [p.name for p in platform.properties] == ["ISA", "OSFamily", "pool", STORE_DIR_PROPERTY]
    assert platform_properties(STORE)["ISA"] == os.uname().machine
    env = {"out": f"{STORE}/o", "PATH": "/path-not-set", "HOME": "/homeless"}
    one = command_for(["/bin/sh", "-c", "x"], env, [f"{STORE}/b", f"{STORE}/a"], platform)
    two = command_for(
        ["/bin/sh", "-c", "x"], dict(reversed(env.items())), [f"{STORE}/a", f"{STORE}/b"], platform
    )
    assert one.SerializeToString(deterministic=True) == two.SerializeToString(deterministic=True)
    assert [e.name for e in one.environment_variables] == ["HOME", "PATH", "out"]
    assert list(one.output_paths) == ["tmp/x/state/store/a", "tmp/x/state/store/b"]
    assert one.working_directory == "build"

    root = sha256_digest(b"root")
    blobs = Blobs()
    digest = add_action(blobs, one, root, 90.5)
    action = reapi_pb2.Action.FromString(blobs.source(digest))
    assert action.command_digest == to_proto(
        sha256_digest(one.SerializeToString(deterministic=True))
    )
    assert action.input_root_digest == to_proto(root)
    assert action.timeout.ToNanoseconds() == 90_500_000_000
    assert action.platform == platform and not action.do_not_cache
    assert not action_for(digest, root, None, platform).HasField("timeout")


def test_the_store_dir_property_is_weft_own() -> None:
    with pytest.raises(ValueError):
        platform_for(STORE, {STORE_DIR_PROPERTY: "/elsewhere"})


def test_a_store_path_whose_name_is_not_utf8_is_not_representable(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("f")
    odd = os.fsdecode(b"/tmp/x/state/store/aaaa-\xff")
    with pytest.raises(NotRepresentable):
        input_root(STORE, {odd: node_of(str(tmp_path / "f"))}, f"{STORE}/x.drv", Blobs())
    with pytest.raises(NotRepresentable):
        input_root(STORE, {}, odd + ".drv", Blobs())
    with pytest.raises(NotRepresentable):
        input_root(os.fsdecode(b"/tmp/\xfe/store"), {}, "/tmp/x.drv", Blobs())

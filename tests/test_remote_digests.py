"""REAPI Merkle trees of real paths on disk (`remote/digests.py`) and the store's table that
keeps them (`store/remotedigests.py`, `remote/storenodes.py`): canonical, never following a
symlink, refusing what REAPI cannot name, computed once per path and gone with the path."""

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest

from remote import digests as digests_module
from remote import storenodes
from remote.digests import (
    Blobs,
    NodeKind,
    add_blobs_of,
    node_of,
    sha256_digest,
    to_proto,
)
from remote.errors import NotRepresentable
from remote.wire import reapi_pb2
from store import Store, gc
from store.db import MIGRATIONS, SCHEMA_VERSION
from store.gc import unregister
from store.remotedigests import RemoteDigests


def _digest(data: bytes) -> reapi_pb2.Digest:
    return reapi_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def _bytes(message: reapi_pb2.Directory) -> bytes:
    return message.SerializeToString(deterministic=True)


def _tree_of_every_kind(root: Path) -> Path:
    (root / "sub" / "empty").mkdir(parents=True)
    (root / "sub" / "leaf").write_bytes(b"leaf\n")
    (root / "tool").write_bytes(b"#!/bin/sh\n")
    (root / "tool").chmod(0o755)
    (root / "data").write_bytes(b"data\n")
    (root / "abs-link").symlink_to("/etc/passwd")
    (root / "rel-link").symlink_to("sub")
    return root


def test_a_tree_hashes_to_the_directories_reapi_spells_out(tmp_path: Path) -> None:
    root = _tree_of_every_kind(tmp_path / "t")
    empty = reapi_pb2.Directory()
    sub = reapi_pb2.Directory()
    sub.files.add(name="leaf", digest=_digest(b"leaf\n"))
    sub.directories.add(name="empty", digest=_digest(_bytes(empty)))
    top = reapi_pb2.Directory()
    top.files.add(name="data", digest=_digest(b"data\n"))
    top.files.add(name="tool", digest=_digest(b"#!/bin/sh\n"), is_executable=True)
    top.directories.add(name="sub", digest=_digest(_bytes(sub)))
    top.symlinks.add(name="abs-link", target="/etc/passwd")
    top.symlinks.add(name="rel-link", target="sub")

    blobs = Blobs()
    node = node_of(str(root), blobs)

    assert node.kind is NodeKind.DIRECTORY
    assert to_proto(node.digest) == _digest(_bytes(top))
    tree = reapi_pb2.Tree.FromString(node.tree)
    assert tree.root == top
    assert {_bytes(c) for c in tree.children} == {_bytes(sub), _bytes(empty)}
    # File contents stay on disk until sent; Directory messages are kept as bytes.
    assert blobs.source(sha256_digest(b"leaf\n")) == str(root / "sub" / "leaf")
    assert blobs.source(sha256_digest(_bytes(sub))) == _bytes(sub)
    assert len(blobs) == 6  # leaf, data, tool, and three directories
    assert sha256_digest(b"root:x:0:0") not in blobs


def test_entries_are_in_name_order_whatever_order_they_were_made_in(tmp_path: Path) -> None:
    names = ["zeta", "Alpha", "caf\u00e9", "\U0001f600", "beta", "a.b", "a-b"]
    first, second = tmp_path / "one", tmp_path / "two"
    for where, order in ((first, names), (second, list(reversed(names)))):
        where.mkdir()
        for name in order:
            (where / name).write_text(name)
    one, two = node_of(str(first)), node_of(str(second))
    assert one.digest == two.digest
    listed = [f.name for f in reapi_pb2.Tree.FromString(one.tree).root.files]
    assert listed == sorted(names, key=lambda n: n.encode())


def test_the_executable_bit_counts_and_times_do_not(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x")
    plain = node_of(str(f))
    os.utime(f, (1, 1))
    assert node_of(str(f)) == plain
    f.chmod(0o700)
    executable = node_of(str(f))
    assert executable.is_executable and not plain.is_executable
    assert executable.digest == plain.digest == sha256_digest(b"x")


def test_a_symlink_is_a_node_of_its_own_and_never_followed(tmp_path: Path) -> None:
    (tmp_path / "l").symlink_to("/etc/passwd")
    blobs = Blobs()
    node = node_of(str(tmp_path / "l"), blobs)
    assert (node.kind, node.digest, node.target) == (NodeKind.SYMLINK, None, "/etc/passwd")
    assert len(blobs) == 0


@pytest.mark.parametrize("where", ["name", "target", "fifo"])
def test_what_reapi_cannot_name_is_not_representable(tmp_path: Path, where: str) -> None:
    root = tmp_path / "t"
    root.mkdir()
    raw = os.fsencode(root)
    if where == "name":
        open(os.path.join(raw, b"bad-\xff"), "wb").close()
    elif where == "target":
        os.symlink(b"/nix/\xfe", os.path.join(raw, b"link"))
    else:
        os.mkfifo(root / "pipe")
    with pytest.raises(NotRepresentable):
        node_of(str(root))


def test_a_kept_tree_gives_every_blob_back_without_reading_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _tree_of_every_kind(tmp_path / "t")
    walked = Blobs()
    node = node_of(str(root), walked)

    def no_reading(path: str) -> None:
        raise AssertionError(f"{path} was read")

    monkeypatch.setattr(digests_module, "file_digest", no_reading)
    again = Blobs()
    add_blobs_of(str(root), node, again)
    assert set(again) == set(walked)
    assert {d: again.source(d) for d in again} == {d: walked.source(d) for d in walked}


def _count(store: Store) -> int:
    with store.db.connection() as conn:
        return int(conn.execute("SELECT count(*) FROM RemoteDigests").fetchone()[0])


@pytest.fixture
def var_store() -> Iterator[Store]:
    """A store under /var/tmp (the others are under /tmp)."""
    where = tempfile.mkdtemp(prefix="weft-rd-", dir="/var/tmp")
    try:
        with Store.open(Path(where) / "state") as store:
            yield store
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_a_path_is_hashed_once_per_store_and_its_row_goes_with_it(
    var_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _tree_of_every_kind(tmp_path / "src")
    path = var_store.add_path(src, name="tree").path
    table = RemoteDigests(var_store.db)
    first = storenodes.path_nodes(table, [path], Blobs())
    assert _count(var_store) == 1

    monkeypatch.setattr(storenodes, "node_of", lambda *a: pytest.fail("walked again"))
    blobs = Blobs()
    assert storenodes.path_nodes(table, [path], blobs) == first
    assert blobs.source(sha256_digest(b"leaf\n")) == f"{path}/sub/leaf"

    var_store.invalidate(path)
    assert _count(var_store) == 0 and table.get([path]) == {}


@pytest.fixture(params=["collector's checks", "database's checks"])
def checks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "database's checks":
        monkeypatch.setattr(unregister, "KNOWN_FOREIGN_KEYS", frozenset())
    return str(request.param)


def test_the_collector_takes_a_paths_row_with_it(store: Store, tmp_path: Path, checks: str) -> None:
    kept_src, gone_src = tmp_path / "kept", tmp_path / "gone"
    kept_src.write_text("kept")
    gone_src.write_text("gone")
    kept = store.add_path(kept_src).path
    gone = store.add_path(gone_src).path
    table = RemoteDigests(store.db)
    storenodes.path_nodes(table, [kept, gone], Blobs())
    root = store.state.gcroots_dir / "kept"
    root.parent.mkdir(parents=True, exist_ok=True)
    root.symlink_to(kept)
    assert gone in gc.delete(store, gc.plan(store)).deleted
    assert set(table.get([kept, gone])) == {kept}
    assert _count(store) == 1


def test_a_version_4_database_gains_the_table_and_keeps_its_paths(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "var" / "db").mkdir(parents=True)
    conn = apsw.Connection(str(state / "var" / "db" / "db.sqlite"))
    for step, migration in enumerate(MIGRATIONS[:4]):
        conn.execute(migration)
        conn.execute(f"PRAGMA user_version = {step + 1}")
    conn.close()
    with Store.open(state) as store:
        with store.db.connection() as c:
            assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        src = tmp_path / "f"
        src.write_text("f")
        path = store.add_path(src).path
        table = RemoteDigests(store.db)
        storenodes.path_nodes(table, [path], Blobs())
        assert table.get([path])[path].digest == sha256_digest(b"f")


def test_a_node_for_a_path_no_longer_valid_is_not_kept(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_text("f")
    path = store.add_path(src).path
    node = node_of(path)
    store.invalidate(path)
    RemoteDigests(store.db).put({path: node})
    assert _count(store) == 0

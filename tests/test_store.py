import io
import os
import stat
import tempfile
import threading
from pathlib import Path

import apsw
import pytest

import store.adds as adds_module
from store import HashMismatch, InvalidReference, NotValid, Store, nar
from store.db import SCHEMA_VERSION, SchemaTooNew
from store.hashing import hash_path
from store.nar import UnsupportedFileType
from store.paths import InvalidPath
from store.recipe import LocalStore, derivation, using
from store.store import StoreError
from tests.conftest import make_varied_tree, tree_listing


def test_add_path_is_canonical_and_registered(store: Store, varied_tree: Path) -> None:
    (varied_tree / "text").chmod(0o666)
    (varied_tree / "sub").chmod(0o777)
    os.chmod(varied_tree / "seven", 0o6755)
    info = store.add_path(varied_tree)
    assert info.path.startswith(store.store_dir + "/")
    assert info.path.endswith("-tree")
    assert tree_listing(Path(info.path)) == tree_listing(varied_tree)
    for dirpath, dirnames, filenames in os.walk(info.path):
        for n in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, n))
            assert st.st_mtime == 1
            if not stat.S_ISLNK(st.st_mode):
                assert stat.S_IMODE(st.st_mode) in (0o444, 0o555)
    assert stat.S_IMODE(os.lstat(info.path).st_mode) == 0o555
    assert stat.S_IMODE(os.lstat(Path(info.path) / "seven").st_mode) == 0o555
    assert (info.nar_hash, info.nar_size) == hash_path(varied_tree)
    assert info.ca == f"source:{info.nar_hash}"
    assert os.listdir(store.tmp.path) == []


def test_add_single_file_and_symlink(store: Store, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("content")
    link = tmp_path / "link"
    link.symlink_to("file")
    fi = store.add_path(f)
    li = store.add_path(link)
    assert Path(fi.path).read_text() == "content"
    assert os.readlink(li.path) == "file"
    assert store.add_path(f, name="renamed").path.endswith("-renamed")


def test_same_content_same_path_and_re_add_is_a_noop(store: Store, varied_tree: Path) -> None:
    first = store.add_path(varied_tree)
    again = store.add_path(varied_tree)
    assert again == first
    from_nar = store.add_nar(io.BytesIO(b"".join(nar.dump(varied_tree))).read, "tree")
    assert from_nar == first


def test_add_nar_checks_expected_hash(store: Store, varied_tree: Path) -> None:
    data = b"".join(nar.dump(varied_tree))
    with pytest.raises(HashMismatch):
        store.add_nar(io.BytesIO(data).read, "tree", expected_hash="blake3:" + "0" * 64)
    assert os.listdir(store.tmp.path) == []
    h, _ = hash_path(varied_tree)
    assert store.add_nar(io.BytesIO(data).read, "tree", expected_hash=h).nar_hash == h


def test_refuses_special_files(store: Store, tmp_path: Path) -> None:
    d = tmp_path / "withfifo"
    d.mkdir()
    os.mkfifo(d / "fifo")
    with pytest.raises(UnsupportedFileType, match="fifo"):
        store.add_path(d)
    with pytest.raises(UnsupportedFileType):
        store.add_path("/dev/null")
    assert os.listdir(store.tmp.path) == []
    assert sorted(os.listdir(store.store_dir)) == [".links", ".tmp"]


def test_invalid_names_and_references(store: Store, tmp_path: Path) -> None:
    f = tmp_path / "bad name"
    f.write_text("x")
    with pytest.raises(InvalidPath):
        store.add_path(f)
    missing = store.store_dir + "/" + "0" * 32 + "-missing"
    with pytest.raises(InvalidReference, match="missing"):
        store.add_text("t", "x", [missing])
    with pytest.raises(InvalidPath):
        store.add_text("t", "x", ["/not/in/store"])
    assert sorted(os.listdir(store.store_dir)) == [".links", ".tmp"]


def test_queries(store: Store) -> None:
    a = store.add_text("a", "a")
    b = store.add_text("b", "b", [a.path])
    c = store.add_text("c", "c", [a.path, b.path])
    d = store.add_text("d", "d")
    assert store.is_valid(c.path)
    assert not store.is_valid(store.store_dir + "/" + "0" * 32 + "-x")
    assert store.valid_paths([a.path, d.path, store.store_dir + "/" + "1" * 32 + "-x"]) == {
        a.path,
        d.path,
    }
    info = store.path_info(c.path)
    assert info is not None
    assert info.references == tuple(sorted([a.path, b.path]))
    assert info.nar_size > 0 and info.registration_time > 0
    assert store.references(b.path) == [a.path]
    assert store.referrers(a.path) == sorted([b.path, c.path])
    assert store.closure([c.path]) == [a.path, b.path, c.path]
    assert store.closure([c.path, d.path])[-1] in (c.path, d.path)
    assert set(store.closure([c.path, d.path])) == {a.path, b.path, c.path, d.path}
    with pytest.raises(NotValid):
        store.closure([store.store_dir + "/" + "0" * 32 + "-x"])
    with pytest.raises(NotValid):
        store.referrers(store.store_dir + "/" + "0" * 32 + "-x")


def test_closure_of_a_long_chain_is_topological(store: Store) -> None:
    prev: list[str] = []
    paths = []
    for i in range(300):
        p = store.add_text(f"n{i}", str(i), prev).path
        paths.append(p)
        prev = [p]
    assert store.closure([paths[-1]]) == paths


def test_verify_reports_corruption_and_missing(store: Store, tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("good")
    good = store.add_path(f)
    bad = store.add_text("bad", "original")
    gone = store.add_text("gone", "will vanish")
    os.chmod(bad.path, 0o644)
    Path(bad.path).write_text("tampered")
    os.unlink(gone.path)
    report = store.verify()
    assert report.checked == 3
    assert report.missing == [gone.path]
    assert [m[0] for m in report.mismatched] == [bad.path]
    assert store.verify([good.path]).ok


def test_reference_integrity_in_the_database(store: Store) -> None:
    a = store.add_text("a", "a")
    b = store.add_text("b", "b", [a.path])
    with store.db.connection() as conn:
        with pytest.raises(apsw.ConstraintError):
            conn.execute("DELETE FROM ValidPaths WHERE path = ?", (a.path,))
        conn.execute("INSERT INTO Refs SELECT id, id FROM ValidPaths WHERE path = ?", (b.path,))
        conn.execute("DELETE FROM ValidPaths WHERE path = ?", (b.path,))
        assert conn.execute("SELECT count(*) FROM Refs").fetchone()[0] == 0
        conn.execute("DELETE FROM ValidPaths WHERE path = ?", (a.path,))


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    s = Store.open(tmp_path / "st")
    s.close()
    conn = apsw.Connection(str(tmp_path / "st" / "var" / "db" / "db.sqlite"))
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaTooNew, match="newer than this weft supports"):
        Store.open(tmp_path / "st")


def test_database_settings(store: Store) -> None:
    with store.db.connection() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_same_content_from_many_threads_is_one_path(store: Store, varied_tree: Path) -> None:
    results: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            if i % 2:
                results.append(store.add_path(varied_tree).path)
            else:
                data = b"".join(nar.dump(varied_tree))
                results.append(store.add_nar(io.BytesIO(data).read, "tree").path)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1
    assert sorted(os.listdir(store.store_dir)) == sorted([".links", ".tmp", Path(results[0]).name])
    assert os.listdir(store.tmp.path) == []
    with store.db.connection() as conn:
        assert conn.execute("SELECT count(*) FROM ValidPaths").fetchone()[0] == 1
    assert store.verify().ok


def test_readers_do_not_block_a_writer(store: Store) -> None:
    a = store.add_text("a", "a")
    with store.db.read() as conn:
        assert conn.execute("SELECT count(*) FROM ValidPaths").fetchone()[0] == 1
        b = store.add_text("b", "b")
        # The open read transaction still sees its snapshot.
        assert conn.execute("SELECT count(*) FROM ValidPaths").fetchone()[0] == 1
    assert store.valid_paths([a.path, b.path]) == {a.path, b.path}


def test_unregistered_debris_at_the_destination_is_replaced(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_text("real content")
    path = store.add_path(src).path
    # Make it debris: on disk, corrupted, unregistered.
    with store.db.connection() as conn:
        conn.execute("DELETE FROM ValidPaths WHERE path = ?", (path,))
    os.chmod(path, 0o644)
    Path(path).write_text("half-written junk")
    again = store.add_path(src)
    assert again.path == path
    assert Path(path).read_text() == "real content"
    assert store.verify().ok


def test_add_nar_with_known_hash_of_a_valid_path_reads_nothing(
    store: Store, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.write_text("x")
    info = store.add_path(src)

    def read(n: int) -> bytes:
        raise AssertionError("the stream was read")

    assert store.add_nar(read, "src", expected_hash=info.nar_hash) == info


def test_re_adding_an_unchanged_tree_reads_nothing(
    store: Store, varied_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = 1_000_000_000
    for dirpath, dirnames, filenames in os.walk(varied_tree):
        for n in dirnames + filenames:
            os.utime(os.path.join(dirpath, n), (old, old), follow_symlinks=False)
    # ctime cannot be set back: let the cache's racy window pass over it instead.
    monkeypatch.setattr("store.sourcecache.RACY_SECONDS", -5.0)
    first = store.add_path(varied_tree)

    def no_copy(*args: object) -> None:
        raise AssertionError("the tree was copied again")

    real_copy = adds_module.copy_tree
    monkeypatch.setattr(adds_module, "copy_tree", no_copy)
    assert store.add_path(varied_tree) == first
    # Any change is seen, even one that keeps sizes and mtimes: ctime moves.
    (varied_tree / "text").chmod(0o644)
    Path(varied_tree / "text").write_text("HELLO\n")
    os.utime(varied_tree / "text", (old, old))
    monkeypatch.setattr(adds_module, "copy_tree", real_copy)
    changed = store.add_path(varied_tree)
    assert changed.path != first.path
    assert Path(changed.path, "text").read_text() == "HELLO\n"


def test_fresh_trees_are_not_cached(store: Store, tmp_path: Path) -> None:
    from store.sourcecache import signature

    f = tmp_path / "fresh"
    f.write_text("just written")
    assert signature(f) is None


def test_add_outputs_registers_references_and_deriver(store: Store, tmp_path: Path) -> None:
    dep = store.add_text("dep", "a dependency")
    unused = store.add_text("unused", "not referred to")
    drv = store.path_info(a_derivation(store, "thing", (dep.path,)))
    assert drv is not None
    sd = store.store_dir
    out_path, doc_path = f"{sd}/{'1' * 32}-thing", f"{sd}/{'2' * 32}-thing-doc"
    out, doc = tmp_path / "out", tmp_path / "doc"
    out.mkdir()
    (out / "bin").write_bytes(b"\x7fELF..." + dep.path.encode() + b"\0" + out_path.encode())
    os.chmod(out / "bin", 0o4755)
    doc.write_text(f"see {out_path}")
    infos = store.add_outputs(
        drv.path,
        {"out": (str(out), out_path), "doc": (str(doc), doc_path)},
        candidates=[dep.path, unused.path],
    )
    by_path = {i.path: i for i in infos}
    assert by_path[out_path].references == tuple(sorted([dep.path, out_path]))
    assert by_path[doc_path].references == (out_path,)
    assert by_path[out_path].deriver == drv.path
    assert stat.S_IMODE(os.stat(f"{out_path}/bin").st_mode) == 0o555
    assert os.stat(out_path).st_uid == os.geteuid()
    with store.db.connection() as conn:
        rows = sorted(
            conn.execute(
                "SELECT d.id, d.path FROM DerivationOutputs d JOIN ValidPaths v ON v.id = d.drv "
                "WHERE v.path = ?",
                (drv.path,),
            )
        )
    assert rows == [("doc", doc_path), ("out", out_path)]
    assert store.verify().ok
    assert os.listdir(store.tmp.path) == []


def test_outputs_referring_to_each_other_in_a_cycle_are_refused(
    store: Store, tmp_path: Path
) -> None:
    sd = store.store_dir
    out_path, doc_path = f"{sd}/{'1' * 32}-thing", f"{sd}/{'2' * 32}-thing-doc"
    (tmp_path / "out").write_text(f"{out_path} {doc_path}")
    (tmp_path / "doc").write_text(f"see {out_path}")
    with pytest.raises(StoreError, match="cycle"):
        store.add_outputs(
            f"{sd}/{'3' * 32}-thing.drv",
            {"out": (str(tmp_path / "out"), out_path), "doc": (str(tmp_path / "doc"), doc_path)},
            [],
        )
    assert store.valid_paths([out_path, doc_path]) == set()
    assert not os.path.lexists(out_path) and not os.path.lexists(doc_path)
    assert os.listdir(store.tmp.path) == []


def test_fixed_output_hash_mismatch_registers_nothing(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "fetched"
    out.write_text("unexpected")
    path = f"{store.store_dir}/{'3' * 32}-fetched"
    with pytest.raises(HashMismatch):
        store.add_outputs(
            "/nowhere.drv",
            {"out": (str(out), path)},
            [],
            expected_hashes={"out": "blake3:" + "0" * 64},
        )
    assert not store.is_valid(path) and not os.path.exists(path)
    assert os.listdir(store.tmp.path) == []
    want, _ = hash_path(out)
    (info,) = store.add_outputs(
        "/nowhere.drv", {"out": (str(out), path)}, [], expected_hashes={"out": want}
    )
    assert info.ca == f"fixed:out:{want}"


def test_migration_from_version_1(tmp_path: Path) -> None:
    from store.db import _V1

    db = tmp_path / "st" / "var" / "db"
    db.mkdir(parents=True)
    conn = apsw.Connection(str(db / "db.sqlite"))
    conn.execute(_V1)
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    with Store.open(tmp_path / "st") as s:
        info = s.add_text("t", "content")
        assert s.path_with_hash(info.nar_hash) == info.path
        with s.db.connection() as c:
            assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            plan = " ".join(
                r[3]
                for r in c.execute(
                    "EXPLAIN QUERY PLAN SELECT path FROM ValidPaths WHERE hash = 'x'"
                )
            )
            assert "IndexHash" in plan


def _builder_like_tree(root: Path) -> Path:
    """What a builder may leave: odd modes and owners, setuid bits, extended attributes."""
    make_varied_tree(root, large_size=1 << 20)
    (root / "script.sh").chmod(0o4775)
    (root / "text").chmod(0o666)
    os.setxattr(root / "text", "user.origin", b"builder")
    os.setxattr(root / "sub", "user.origin", b"builder")
    (root / "sub" / "deeper").chmod(0o700)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.chown(os.path.join(dirpath, name), 30000, 30000, follow_symlinks=False)
    os.chown(root, 30000, 30000)
    return root


def test_taking_a_tree_moves_it_and_makes_it_canonical_as_a_copy_would(tmp_path: Path) -> None:
    from store.ingest import copy_tree, take_tree

    src = _builder_like_tree(tmp_path / "out")
    copied = copy_tree(src, tmp_path / "copy")
    inode = os.stat(src / "text").st_ino
    taken = take_tree(src, tmp_path / "taken")
    assert taken == copied
    assert not os.path.lexists(src)
    assert os.stat(tmp_path / "taken" / "text").st_ino == inode
    assert tree_listing(tmp_path / "taken") == tree_listing(tmp_path / "copy")
    assert hash_path(tmp_path / "taken") == (taken.nar_hash, taken.nar_size)
    for dirpath, dirnames, filenames in os.walk(tmp_path / "taken"):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in [*dirnames, *filenames])]:
            st = os.lstat(name)
            assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid()), name
            assert st.st_mtime == 1, name
            if not stat.S_ISLNK(st.st_mode):
                assert stat.S_IMODE(st.st_mode) in (0o444, 0o555), name
                assert os.listxattr(name) == [], name


def test_taking_a_tree_with_a_fifo_fails(tmp_path: Path) -> None:
    from store.ingest import take_tree

    src = tmp_path / "out"
    src.mkdir()
    os.mkfifo(src / "pipe")
    with pytest.raises(UnsupportedFileType):
        take_tree(src, tmp_path / "taken")


def test_taking_a_tree_from_another_file_system_copies_it(tmp_path: Path) -> None:
    from store.ingest import copy_tree, take_tree

    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        src = _builder_like_tree(Path(other) / "out")
        if os.stat(other).st_dev == os.stat(tmp_path).st_dev:
            pytest.fail("/dev/shm is on the same file system as the test's directory")
        taken = take_tree(src, tmp_path / "taken")
        assert taken == copy_tree(src, tmp_path / "copy")
    assert tree_listing(tmp_path / "taken") == tree_listing(tmp_path / "copy")


def a_derivation(store: Store, name: str, inputs: tuple[str, ...] = ()) -> str:
    """A real `.drv` (the store refuses any other file named so), never built."""
    with using(LocalStore(store)):
        return derivation(name, "/bin/sh", ["-c", "exit 1"], inputs=inputs).path


def _output(store: Store, tmp_path: Path, drv: str, name: str) -> str:
    """A built output of `drv` (which need not be valid), registered with it as deriver."""
    src = tmp_path / name
    src.write_text(f"built {name}")
    path = f"{store.store_dir}/{store.parse(drv).hash_part}-{name}"
    (info,) = store.add_outputs(drv, {"out": (str(src), path)}, [])
    return info.path


def test_a_derivation_is_its_own_deriver_and_an_output_names_the_one_that_built_it(
    store: Store, tmp_path: Path
) -> None:
    drv = a_derivation(store, "thing")
    out = _output(store, tmp_path, drv, "thing")
    source = store.add_text("source", "not built").path
    assert store.resolve_deriver(drv) == drv
    assert store.resolve_deriver(out) == drv
    assert store.resolve_deriver(source) is None
    # A .drv is its own even before it is added; anything else must be valid.
    assert store.resolve_deriver(f"{store.store_dir}/{'3' * 32}-later.drv").endswith("later.drv")
    assert store.resolve_deriver(f"{store.store_dir}/{'3' * 32}-later") is None
    with pytest.raises(InvalidPath):
        store.resolve_deriver("/elsewhere/thing.drv")


def test_paths_are_grouped_by_the_valid_derivation_that_can_rebuild_them(
    store: Store, tmp_path: Path
) -> None:
    drv = a_derivation(store, "two")
    first, second = _output(store, tmp_path, drv, "first"), _output(store, tmp_path, drv, "second")
    gone_drv = f"{store.store_dir}/{'4' * 32}-gone.drv"
    orphan_out = _output(store, tmp_path, gone_drv, "orphan")
    source = store.add_text("source", "not built").path
    unknown = f"{store.store_dir}/{'5' * 32}-unknown"
    groups = store.by_deriver([second, source, orphan_out, first, unknown])
    assert groups.rebuildable == {drv: [second, first]}
    assert groups.orphans == [source, orphan_out, unknown]


def test_a_dump_is_the_archive_of_a_valid_path_and_refused_for_others(
    store: Store, varied_tree: Path
) -> None:
    info = store.add_path(varied_tree)
    assert b"".join(store.dump(info.path)) == b"".join(nar.dump(info.path))
    with pytest.raises(NotValid):
        store.dump(f"{store.store_dir}/{'6' * 32}-unknown")

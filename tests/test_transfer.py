"""store-export and store-import between real daemons, and hostile streams refused with
nothing registered (`docs/export.md`).

A store path's hash covers its store dir, so two stores that exchange paths have the same
store dir, as two machines with /nix/store do.  Here the second store lives on another
file system location (/tmp, where the first is under /var/tmp) and its daemon runs in a
mount namespace of its own that shows it at the first one's path: two stores, two
daemons, one store dir.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest

from bench.daemons import DaemonProc, start_daemon, stop_daemon, wait_for_socket
from daemon.cli.blocking import BlockingClient, DaemonError, chunk_reader
from store import nar
from tests.daemon_fixtures import Graph, run_as_nobody
from tests.transfer_streams import Entry, archive_of_file, output, source, stream
from tests.weft_cli import weft


def start_daemon_seeing(physical: Path, logical: Path) -> DaemonProc:
    """A daemon on the state dir `physical`, which its own mount namespace shows at
    `logical`: its store dir is `<logical>/store`."""
    physical.mkdir(parents=True)
    log = physical.parent / "daemon.log"
    script = 'mount --bind "$1" "$2" && exec "$3" -m daemon.cli.daemon --foreground --init '
    script += '--state-dir "$2"'
    unshare = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [*unshare, str(physical), str(logical), sys.executable],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
        )
    sock = str(physical / "var" / "daemon.sock")
    wait_for_socket(sock, proc)
    return DaemonProc(physical, sock, proc, log)


@pytest.fixture
def twins(tmp_path: Path) -> Iterator[tuple[DaemonProc, DaemonProc]]:
    where = Path(tempfile.mkdtemp(prefix="weft-export-", dir="/var/tmp"))
    first = start_daemon(where / "state")
    second = start_daemon_seeing(tmp_path / "elsewhere" / "state", where / "state")
    yield first, second
    stop_daemon(second)
    stop_daemon(first)
    shutil.rmtree(where, ignore_errors=True)


def info_without_time(client: BlockingClient, path: str) -> dict:
    info = client.call("path-info", path=path)
    del info["registration_time"]
    return info


def derivation_outputs(state: Path, paths: set[str]) -> set[tuple[str, str, str]]:
    db = apsw.Connection(str(state / "var/db/db.sqlite"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        rows = db.execute(
            "SELECT v.path, o.id, o.path FROM DerivationOutputs o JOIN ValidPaths v ON v.id = o.drv"
        )
        return {r for r in rows if r[0] in paths}
    finally:
        db.close()


def test_a_built_closure_moves_to_another_store_with_its_references_and_derivers(
    twins: tuple[DaemonProc, DaemonProc], tmp_path: Path
) -> None:
    first, second = twins
    g = Graph(first)
    lib = g.sh("lib", "mkdir $out; echo lib > $out/data")
    app = g.sh("app", f"mkdir $out; echo {lib.out} > $out/uses", inputs=[lib])
    assert [r["status"] for r in g.build(app)] == ["built"]
    g.close()
    roots = [app.out, app.path]
    with BlockingClient(first.socket) as a:
        closure = a.call("closure", paths=roots)
        infos = {p: info_without_time(a, p) for p in closure}
    assert lib.out in infos[app.out]["references"] and infos[app.out]["deriver"] == app.path

    exported = tmp_path / "closure.export"
    with exported.open("wb") as f:
        out = weft("store-export", first.socket, *roots, stdout=f)
    assert out.returncode == 0, out.stderr
    assert f"exported {len(closure)} paths" in out.stderr.decode()
    with exported.open("rb") as f:
        imported = weft("store-import", second.socket, stdin=f)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.splitlines() == closure
    assert f"imported {len(closure)} paths, {len(closure)} of them new" in imported.stderr

    with BlockingClient(second.socket) as b:
        assert b.call("closure", paths=roots) == closure
        assert {p: info_without_time(b, p) for p in closure} == infos
        report = b.call("verify", paths=closure, check_contents=True)
    assert (report["checked"], report["missing"], report["mismatched"]) == (len(closure), [], [])
    kept = derivation_outputs(first.state, set(closure))
    assert (app.path, "out", app.out) in kept
    assert derivation_outputs(second.state, set(closure)) == kept

    with exported.open("rb") as f:
        again = weft("store-import", second.socket, stdin=f)
    assert again.returncode == 0 and "0 of them new" in again.stderr


def test_a_stream_of_another_store_dir_is_refused(
    twins: tuple[DaemonProc, DaemonProc], daemon: DaemonProc, tmp_path: Path
) -> None:
    first, _ = twins
    with BlockingClient(first.socket) as a:
        path = a.call("add-text", name="note", text="hello")["path"]
    exported = tmp_path / "note.export"
    with exported.open("wb") as f:
        assert weft("store-export", first.socket, path, stdout=f).returncode == 0
    with exported.open("rb") as f:
        out = weft("store-import", daemon.socket, stdin=f)
    assert out.returncode == 1
    assert "paths cannot move to another one" in out.stderr
    assert store_entries(daemon.state / "store") == []


def test_an_export_of_a_corrupt_path_fails_and_what_it_wrote_is_refused(
    twins: tuple[DaemonProc, DaemonProc], tmp_path: Path
) -> None:
    first, second = twins
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_text("intact\n")
    # Larger than a batch of the stream: it goes out before the corrupt path is read.
    (tmp_path / "dep").write_bytes(os.urandom(1 << 20))
    with BlockingClient(first.socket) as a:
        dep = a.call("add-from-path", path=str(tmp_path / "dep"))["path"]
        path = a.call("add-from-path", path=str(tree), references=[dep])["path"]
    (Path(path) / "file").write_text("broken\n")  # root writes through the 0444 mode
    partial = tmp_path / "partial.export"
    with partial.open("wb") as f:
        out = weft("store-export", first.socket, path, stdout=f)
    assert out.returncode == 1
    assert f"{path} is corrupt in this store" in out.stderr.decode()
    assert partial.stat().st_size > 1 << 20
    with partial.open("rb") as f:
        refused = weft("store-import", second.socket, stdin=f)
    assert refused.returncode == 1 and "truncated" in refused.stderr
    assert store_entries(second.state / "store") == []


def store_entries(store_dir: Path) -> list[str]:
    """What is in a store dir besides its own two directories."""
    return sorted(set(os.listdir(store_dir)) - {".links", ".tmp"})


@pytest.fixture(scope="module")
def target() -> Iterator[DaemonProc]:
    """A daemon on a tmpfs, reachable by any local user (the untrusted import)."""
    root = Path(tempfile.mkdtemp(prefix="weft-import-", dir="/dev/shm"))
    root.chmod(0o755)
    d = start_daemon(root / "state")
    yield d
    stop_daemon(d)
    shutil.rmtree(root, ignore_errors=True)


def import_bytes(d: DaemonProc, data: bytes) -> dict:
    with BlockingClient(d.socket) as c:
        return c.upload("import", chunk_reader([data]))


def hostile(store_dir: str, case: str) -> tuple[bytes, list[str]]:
    """A stream whose first path is sound and whose second is not in the way `case` says,
    and the paths it names."""
    good = source(store_dir, "good", f"good {case}".encode())
    dep = source(store_dir, "dep", f"dep {case}".encode(), [good.path])
    names = [good.path, dep.path]
    if case == "truncated in the header":
        return stream(store_dir, [good, dep])[:30], names
    if case == "truncated in an archive":
        whole = stream(store_dir, [good, dep])
        return whole[: whole.index(dep.archive) + len(dep.archive) // 2], names
    if case == "truncated before the trailer":
        whole = stream(store_dir, [good, dep])
        return whole[: whole.index(dep.archive) + len(dep.archive)], names
    if case == "an archive whose hash is not the declared one":
        bad = Entry(dep.meta, archive_of_file(f"DEP {case}".encode()))  # as long, not equal
        return stream(store_dir, [good, bad]), names
    if case == "an archive that is not its path's":
        other = source(store_dir, "dep", b"other contents", [good.path])
        return stream(
            store_dir, [good, Entry({**other.meta, "path": dep.path}, other.archive)]
        ), names
    if case == "a reference outside the stream and the store":
        missing = source(store_dir, "missing", f"missing {case}".encode())
        far = source(store_dir, "dep", b"far", [good.path, missing.path])
        return stream(store_dir, [good, far]), [*names, far.path, missing.path]
    if case == "a huge declared size":
        return stream(
            store_dir, [good, Entry({**dep.meta, "nar_size": 1 << 62}, dep.archive)]
        ), names
    if case == "a size beyond the format":
        return stream(
            store_dir, [good, Entry({**dep.meta, "nar_size": 1 << 64}, dep.archive)]
        ), names
    if case == "an archive shorter than declared":
        longer = Entry({**dep.meta, "nar_size": dep.meta["nar_size"] + 8}, dep.archive)
        return stream(store_dir, [good, longer]), names
    if case == "a huge field":
        head = stream(store_dir, [good])
        return head[: head.index(b"path\0")] + b"path\0\0\0\0" + (1 << 40).to_bytes(
            8, "little"
        ), names
    if case == "an invalid path name":
        bad = Entry({**dep.meta, "path": dep.path.replace("-dep", "-de;p")}, dep.archive)
        return stream(store_dir, [good, bad]), names
    if case == "data after the trailer":
        return stream(store_dir, [good, dep]) + b"\0" * 8, names
    if case == "a wrong count":
        return stream(store_dir, [good, dep], count=3), names
    if case == "a path twice":
        return stream(store_dir, [good, good, dep]), names
    if case == "a path in the closure of no root":
        return stream(store_dir, [good, dep], roots=[good.path]), names
    if case == "metadata nested past any parser's depth":
        head = stream(store_dir, [good])
        bomb = nar.encode_str(b"[" * 100_000)
        return head[: head.index(b"path\0")] + b"path\0\0\0\0" + bomb, names
    assert case == "not an export stream"
    return archive_of_file(b"an archive, as store-dump writes, is not a stream"), names


HOSTILE = {
    "truncated in the header": ("invalid-archive", "truncated"),
    "truncated in an archive": ("invalid-archive", "truncated"),
    "truncated before the trailer": ("invalid-archive", "truncated"),
    "an archive whose hash is not the declared one": ("hash-mismatch", "the stream declared"),
    "an archive that is not its path's": ("hash-mismatch", "does not match its contents"),
    "a reference outside the stream and the store": ("invalid-reference", "neither earlier"),
    "a huge declared size": ("bad-request", "bytes free"),
    "a size beyond the format": ("invalid-archive", "'nar_size' must be"),
    "an archive shorter than declared": ("invalid-archive", "trailing garbage"),
    "a huge field": ("invalid-archive", "over the 1048576 allowed"),
    "an invalid path name": ("invalid-path", "forbidden character ';'"),
    "data after the trailer": ("invalid-archive", "data after the trailer"),
    "a wrong count": ("invalid-archive", "the trailer counts 3 paths"),
    "a path twice": ("invalid-archive", "is in the stream twice"),
    "a path in the closure of no root": ("invalid-archive", "in the closure of no root"),
    "metadata nested past any parser's depth": ("invalid-archive", "is not JSON"),
    "not an export stream": ("invalid-archive", "bad magic"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_stream_is_refused_with_a_clear_error_and_nothing_registered(
    target: DaemonProc, case: str
) -> None:
    store_dir = target.store_dir
    data, names = hostile(store_dir, case)
    before = store_entries(Path(store_dir))
    with pytest.raises(DaemonError) as refused:
        import_bytes(target, data)
    code, fragment = HOSTILE[case]
    assert (refused.value.code, fragment in refused.value.message) == (code, True), (
        refused.value.message
    )
    with BlockingClient(target.socket) as c:
        parsable = [n for n in names if "-de;p" not in n]
        assert c.call("is-valid", paths=parsable) == []
    assert store_entries(Path(store_dir)) == before
    assert os.listdir(Path(store_dir) / ".tmp") == []


UNTRUSTED_IMPORT = """
import json, sys
from daemon.cli.blocking import BlockingClient, DaemonError, chunk_reader
with BlockingClient(sys.argv[1]) as c:
    try:
        print(json.dumps(c.upload("import", chunk_reader([open(sys.argv[2], "rb").read()]))))
    except DaemonError as e:
        print(json.dumps({"code": e.code, "message": e.message}))
"""


def test_an_untrusted_user_imports_checked_paths_but_not_paths_addressed_by_derivations(
    target: DaemonProc,
) -> None:
    store_dir = target.store_dir
    checked = source(store_dir, "checked", b"anyone may add me")
    checked.meta["deriver"] = f"{store_dir}/{'1' * 32}-claimed.drv"
    built = output(store_dir, "built", b"trust me")
    spool = Path(tempfile.mkdtemp(prefix="weft-untrusted-", dir="/var/tmp"))
    try:
        spool.chmod(0o755)
        streams = {}
        for name, entry in (("checked", checked), ("built", built)):
            streams[name] = spool / name
            streams[name].write_bytes(stream(store_dir, [entry]))
            streams[name].chmod(0o644)

        def as_nobody(name: str) -> dict:
            code = UNTRUSTED_IMPORT.replace("sys.argv[1]", repr(target.socket))
            code = code.replace("sys.argv[2]", repr(str(streams[name])))
            out = run_as_nobody(code, {"PYTHONPATH": str(Path(__file__).parent.parent)})
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)

        assert as_nobody("checked") == {"roots": [checked.path], "paths": 1, "added": 1}
        refused = as_nobody("built")
        assert refused["code"] == "permission-denied"
        assert "only trusted users" in refused["message"]
        with BlockingClient(target.socket) as c:
            assert c.call("path-info", path=checked.path)["deriver"] is None
            assert c.call("is-valid", paths=[built.path]) == []
        assert import_bytes(target, streams["built"].read_bytes())["added"] == 1
    finally:
        shutil.rmtree(spool)


def test_a_daemon_killed_mid_import_leaves_nothing_registered_once_restarted(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    d = start_daemon(state)
    store_dir = d.store_dir
    good = source(store_dir, "good", b"small")
    big = source(store_dir, "big", os.urandom(8 << 20), [good.path])
    data = stream(store_dir, [good, big])
    cut = data.index(big.archive) + len(big.archive) // 2
    sent = 0
    release = threading.Event()

    def read(n: int) -> bytes:
        nonlocal sent
        if sent >= cut:
            release.wait(30)
            return b""
        piece = data[sent : min(cut, sent + n)]
        sent += len(piece)
        return piece

    errors: list[BaseException] = []

    def upload() -> None:
        try:
            with BlockingClient(d.socket) as c:
                c.upload("import", read)
        except (ConnectionError, OSError) as e:
            errors.append(e)

    uploader = threading.Thread(target=upload)
    uploader.start()
    tmp = state / "store" / ".tmp"
    deadline = time.monotonic() + 30
    while (sent < cut or len(os.listdir(tmp)) < 2) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(os.listdir(tmp)) == 2, "both archives should be on their way in"
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    release.set()
    uploader.join(30)
    assert errors, "the upload should have lost its daemon"

    again = start_daemon(state)
    try:
        with BlockingClient(again.socket) as c:
            assert c.call("is-valid", paths=[good.path, big.path]) == []
        assert store_entries(state / "store") == []
        assert os.listdir(tmp) == []
    finally:
        stop_daemon(again)

"""What the store believes of what it is handed: a fixed output's references against its
contents (`store/importer.py`), and a `.drv`'s size before it is read (`store/drvcheck.py`)."""

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.daemons import DaemonProc, start_daemon, stop_daemon
from daemon.cli.blocking import BlockingClient
from store import Store, nar
from store.derivation import DerivationError
from store.drvcheck import MAX_DRV_SIZE
from tests.daemon_fixtures import run_as_nobody
from tests.transfer_streams import Entry, fixed, source, stream

UNTRUSTED_IMPORT = """
import json, sys
from daemon.cli.blocking import BlockingClient, DaemonError, chunk_reader
with BlockingClient(sys.argv[1]) as c:
    try:
        print(json.dumps(c.upload("import", chunk_reader([open(sys.argv[2], "rb").read()]))))
    except DaemonError as e:
        print(json.dumps({"code": e.code, "message": e.message}))
"""


@pytest.fixture
def shared() -> Iterator[tuple[DaemonProc, Path]]:
    """A daemon any local user may reach, and a directory any local user may read."""
    root = Path(tempfile.mkdtemp(prefix="weft-fixed-", dir="/dev/shm"))
    root.chmod(0o755)
    spool = root / "spool"
    spool.mkdir(mode=0o755)
    d = start_daemon(root / "state")
    yield d, spool
    stop_daemon(d)
    shutil.rmtree(root, ignore_errors=True)


def import_as_nobody(d: DaemonProc, spool: Path, name: str, data: bytes) -> dict:
    file = spool / name
    file.write_bytes(data)
    file.chmod(0o644)
    code = UNTRUSTED_IMPORT.replace("sys.argv[1]", repr(d.socket))
    code = code.replace("sys.argv[2]", repr(str(file)))
    out = run_as_nobody(code, {"PYTHONPATH": str(Path(__file__).parent.parent)})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def store_entries(store_dir: str) -> list[str]:
    return sorted(set(os.listdir(store_dir)) - {".links", ".tmp"})


def test_an_untrusted_import_of_a_fixed_output_must_declare_exactly_the_references_it_holds(
    shared: tuple[DaemonProc, Path],
) -> None:
    d, spool = shared
    sd = d.store_dir
    dep = source(sd, "dep", b"what a fetch refers to")
    other = source(sd, "other", b"what it does not")
    holds_dep = f"a script: exec {dep.path}/bin/x\n"
    # The name of a fixed output covers its contents and name only, so these three keep the
    # honest one's contents (two with a byte more, to be paths of their own).
    forged = fixed(sd, "fetched", (holds_dep + "1").encode(), [dep.path, other.path])
    absent = fixed(sd, "fetched", b"a script that names no store path\n", [dep.path])
    dropped = fixed(sd, "fetched", (holds_dep + "2").encode(), [])
    hostile: dict[str, tuple[list[Entry], list[str] | None, str]] = {
        "forged": ([dep, other, forged], None, f"declares {other.path}, which its contents"),
        "absent": ([dep, absent], None, f"declares {dep.path}, which its contents"),
        "dropped": ([dep, dropped], [dep.path, dropped.path], f"holds {dep.path}, which it"),
    }
    before = store_entries(sd)
    for case, (entries, roots, words) in hostile.items():
        refused = import_as_nobody(d, spool, case, stream(sd, entries, roots))
        assert refused.get("code") == "invalid-reference", (case, refused)
        assert "is a fixed output" in refused["message"] and words in refused["message"], refused
        with BlockingClient(d.socket) as c:
            assert c.call("is-valid", paths=[e.path for e in entries]) == [], case
        assert store_entries(sd) == before, case
        assert os.listdir(Path(sd) / ".tmp") == [], case

    honest = fixed(sd, "fetched", holds_dep.encode(), [dep.path])
    got = import_as_nobody(d, spool, "honest", stream(sd, [dep, honest]))
    assert got == {"roots": [honest.path], "paths": 2, "added": 2}, got
    with BlockingClient(d.socket) as c:
        info = c.call("path-info", path=honest.path)
    assert (info["references"], info["ca"]) == ([dep.path], honest.meta["ca"])


def test_a_drv_larger_than_any_derivation_is_refused_before_it_is_read(store: Store) -> None:
    size = MAX_DRV_SIZE + 1
    archive = nar.HEADER + nar.file_header(False, size) + b" " * size + nar.file_trailer(size)
    view = memoryview(archive)
    at = 0

    def read(n: int) -> bytes:
        nonlocal at
        at += len(chunk := bytes(view[at : at + n]))
        return chunk

    with pytest.raises(DerivationError) as refused:
        store.add_nar(read, "x.drv")
    assert f"over the {MAX_DRV_SIZE:,} a .drv may be (MAX_DRV_SIZE)" in str(refused.value)
    assert store_entries(store.store_dir) == []
    assert os.listdir(Path(store.store_dir) / ".tmp") == []

"""Adding large files: the kernel copies them and the copy is hashed behind it
(`store.filecopy`); what is registered is what was hashed, whatever the source does."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.daemons import start_daemon, stop_daemon
from daemon.cli.blocking import BlockingClient
from store import Store
from store.filecopy import SLICE, SourceChanged, copy_and_hash
from store.hashing import hash_path
from tests.daemon_fixtures import run_as_nobody
from tests.test_crash import ROOT, assert_clean

# More than two slices and not a whole number of them: the helper thread copies, the last
# slice is short.
LARGE = 2 * SLICE + 12_345
STORE_ADD = str(Path(sys.executable).parent / "store-add")


def _random_file(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, 4 << 20)
            f.write(os.urandom(n))
            left -= n
    return path


@pytest.fixture
def var_tmp() -> Iterator[Path]:
    """A scratch dir on the disk (not under /tmp), other users may search."""
    d = Path(tempfile.mkdtemp(prefix="weft-large-", dir="/var/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_store_add_of_a_large_file_registers_the_hash_of_the_bytes_in_the_store(
    var_tmp: Path,
) -> None:
    src = _random_file(var_tmp / "big.bin", LARGE)
    src.chmod(0o755)
    d = start_daemon(var_tmp / "state")
    try:
        command = [STORE_ADD, "--socket", d.socket, str(src)]
        out = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        path = out.stdout.strip()
        with BlockingClient(d.socket) as c:
            info = c.call("path-info", path=path)
    finally:
        stop_daemon(d)
    assert Path(path).read_bytes() == src.read_bytes()
    assert os.stat(path).st_mode & 0o777 == 0o555
    assert (info["nar_hash"], info["nar_size"]) == hash_path(path) == hash_path(src)


def test_a_large_file_is_added_for_another_user_only_if_they_may_read_it(
    var_tmp: Path,
) -> None:
    public = _random_file(var_tmp / "public.bin", LARGE)
    public.chmod(0o644)
    secret = _random_file(var_tmp / "secret.bin", SLICE + 1)
    secret.chmod(0o600)
    d = start_daemon(var_tmp / "state")
    try:
        code = textwrap.dedent(f"""
            from daemon.cli.blocking import BlockingClient, DaemonError
            with BlockingClient({d.socket!r}) as c:
                print(c.call("add-from-path", path={str(public)!r})["path"])
                try:
                    c.call("add-from-path", path={str(secret)!r})
                    print("allowed")
                except DaemonError as e:
                    print(e.code)
        """)
        out = run_as_nobody(code)
    finally:
        stop_daemon(d)
    assert out.returncode == 0, out.stderr
    added, refused = out.stdout.split()
    assert Path(added).read_bytes() == public.read_bytes()
    assert os.stat(added).st_uid == 0
    assert hash_path(added) == hash_path(public)
    assert refused == "permission-denied"


def test_a_file_rewritten_while_it_is_added_is_registered_as_it_was_copied(tmp_path: Path) -> None:
    src = _random_file(tmp_path / "moving.bin", LARGE)
    stop = threading.Event()

    def rewrite() -> None:
        fd = os.open(src, os.O_WRONLY)
        try:
            at = 0
            while not stop.is_set():
                os.pwrite(fd, os.urandom(1 << 16), at)
                at = (at + (7 << 20)) % (LARGE - (1 << 16))
        finally:
            os.close(fd)

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        with Store.open(tmp_path / "state") as store:
            infos = [store.add_path(src, name=f"moving{i}") for i in range(3)]
    finally:
        stop.set()
        writer.join()
    for info in infos:
        assert hash_path(info.path) == (info.nar_hash, info.nar_size)


def test_a_source_that_shrinks_or_grows_under_the_copy_fails_it(tmp_path: Path) -> None:
    src = _random_file(tmp_path / "src.bin", SLICE + 4096)
    size = src.stat().st_size
    for claimed, word in ((size + SLICE, "shrank"), (size - 1, "grew")):
        sfd = os.open(src, os.O_RDONLY)
        dfd = os.open(tmp_path / f"copy-{word}", os.O_RDWR | os.O_CREAT | os.O_EXCL)
        try:
            with pytest.raises(SourceChanged, match=word):
                copy_and_hash(sfd, dfd, claimed, lambda _: None, b"src.bin")
        finally:
            os.close(sfd)
            os.close(dfd)


def test_a_large_file_from_another_file_system_is_copied_through_a_buffer(
    var_tmp: Path,
) -> None:
    """/dev/shm is a tmpfs: the kernel refuses to copy from it to the disk (EXDEV)."""
    shm = Path(tempfile.mkdtemp(prefix="weft-large-", dir="/dev/shm"))
    try:
        src = _random_file(shm / "big.bin", LARGE)
        with Store.open(var_tmp / "state") as store:
            info = store.add_path(src)
        assert Path(info.path).read_bytes() == src.read_bytes()
        assert hash_path(info.path) == (info.nar_hash, info.nar_size) == hash_path(src)
    finally:
        shutil.rmtree(shm)


KILLER = textwrap.dedent("""
    import os, signal, sys
    import store.filecopy as filecopy
    from store import Store
    real = os.copy_file_range
    def copy_then_die(*args):
        n = real(*args)
        os.kill(os.getpid(), signal.SIGKILL)
        return n
    filecopy.os.copy_file_range = copy_then_die
    Store.open(sys.argv[1]).add_path(sys.argv[2])
""")


def test_a_kill_while_a_large_file_is_copied_leaves_no_path_and_no_debris(
    var_tmp: Path,
) -> None:
    src = _random_file(var_tmp / "big.bin", LARGE)
    state = var_tmp / "state"
    Store.open(state).close()
    child = subprocess.run(
        [sys.executable, "-c", KILLER, str(state), str(src)], cwd=ROOT, timeout=60
    )
    assert child.returncode == -signal.SIGKILL
    assert len(os.listdir(state / "store" / ".tmp")) == 1
    store = assert_clean(state)
    store.close()

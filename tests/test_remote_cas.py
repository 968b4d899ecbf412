"""The CAS client (`remote/cas.py`, `remote/streams.py`) against a real BuildGrid: only what
is missing is sent, in batches within the server's limit or streamed when larger; what is
read back is checked, and a blob tampered with in the engine's own disk store is caught."""

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from remote import cas as cas_module
from remote.cas import MAX_BATCH_BLOBS, Cas
from remote.channel import open_channel
from remote.digests import Blobs, Digest, node_of, sha256_digest
from remote.errors import BlobMissing, DigestMismatch, RemoteError, RemoteUnavailable
from tests.remotecas import REPO, CasServer, bgd_path, cas_server, start_cas_server, tamper

pytestmark = pytest.mark.skipif(bgd_path() is None, reason="no bgd (install.sh sets it up)")

BIG = 9 * 1024 * 1024 + 17  # over a 4 MiB batch: goes through ByteStream, in chunks


@pytest.fixture(scope="module")
def server() -> Iterator[CasServer]:
    with cas_server("/tmp") as s:
        yield s


@pytest.fixture
def cas(server: CasServer) -> Iterator[Cas]:
    with server.channel() as channel:
        yield Cas(channel, server.instance)


def _tree(root: Path, files: int, big: bytes | None = None) -> Path:
    (root / "d").mkdir(parents=True)
    (root / "empty").mkdir()
    for i in range(files):
        (root / "d" / f"f{i}").write_bytes(os.urandom(64) + str(i).encode())
    (root / "run").write_bytes(b"#!/bin/sh\n" + os.urandom(16))
    (root / "run").chmod(0o755)
    (root / "link").symlink_to("/etc/hostname")
    if big is not None:
        (root / "big").write_bytes(big)
    return root


def test_an_upload_sends_only_what_is_missing(cas: Cas, tmp_path: Path) -> None:
    root = _tree(tmp_path / "t", files=MAX_BATCH_BLOBS + 100, big=os.urandom(BIG))
    blobs = Blobs()
    node_of(str(root), blobs)
    assert cas.missing(blobs) == set(blobs) - {sha256_digest(b"")}

    first = cas.upload(blobs)
    assert first.blobs == len(blobs) - 1  # the empty Directory is always there
    assert first.bytes == blobs.total_bytes()
    assert cas.missing(blobs) == set()
    assert cas.upload(blobs).blobs == 0

    (root / "d" / "new").write_bytes(b"one more")
    more = Blobs()
    node_of(str(root), more)
    # The new file, its directory, and the root directory.
    assert cas.upload(more).blobs == 3


def test_what_is_read_back_is_what_was_sent(cas: Cas, tmp_path: Path) -> None:
    big = os.urandom(BIG)
    small = b"small blob " + os.urandom(32)
    blobs = Blobs()
    for data in (big, small):
        blobs.add_bytes(data)
    cas.upload(blobs)
    assert cas.read(sha256_digest(small)) == small
    assert cas.read(sha256_digest(big)) == big
    assert dict(cas.read_many([sha256_digest(small), sha256_digest(b"")])) == {
        sha256_digest(small): small,
        sha256_digest(b""): b"",
    }
    cas.read_to(sha256_digest(big), str(tmp_path / "big"), executable=True)
    assert (tmp_path / "big").read_bytes() == big
    assert os.stat(tmp_path / "big").st_mode & 0o777 == 0o755
    with pytest.raises(BlobMissing):
        cas.read(sha256_digest(b"never sent"))


@pytest.mark.parametrize("size", [100, BIG])
def test_a_blob_tampered_with_in_the_engine_is_caught(
    cas: Cas, server: CasServer, tmp_path: Path, size: int
) -> None:
    data = os.urandom(size)
    blobs = Blobs()
    digest = blobs.add_bytes(data)
    cas.upload(blobs)
    tamper(server.blob_file(digest.hash))
    with pytest.raises(DigestMismatch):
        cas.read(digest)
    with pytest.raises(DigestMismatch):
        cas.read_to(digest, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_file_changed_since_it_was_hashed_is_not_sent(cas: Cas, tmp_path: Path) -> None:
    for size in (50, BIG):
        f = tmp_path / f"f{size}"
        f.write_bytes(os.urandom(size))
        blobs = Blobs()
        node = node_of(str(f), blobs)
        f.write_bytes(os.urandom(size))
        with pytest.raises(DigestMismatch):
            cas.upload(blobs)
        assert cas.missing([node.digest]) == {node.digest}


def test_a_server_that_is_not_there_is_unavailable(tmp_path: Path) -> None:
    channel = open_channel(f"unix://{tmp_path}/nothing.sock")
    with channel, pytest.raises(RemoteUnavailable):
        Cas(channel).missing([sha256_digest(b"x")])


def test_a_digest_the_server_cannot_take_is_its_error(cas: Cas) -> None:
    with pytest.raises(RemoteError):
        cas.read(Digest("0" * 63 + "g", 1))


def test_a_large_upload_streams_from_disk(server: CasServer, tmp_path: Path) -> None:
    """A 96 MiB file goes up without the process growing by anything like its size."""
    big = tmp_path / "big"
    with big.open("wb") as f:
        for _ in range(96):
            f.write(os.urandom(1 << 20))
    # VmHWM, the process's own peak: ru_maxrss would count the test process's, inherited
    # through vfork and exec.
    script = textwrap.dedent(
        f"""
        import sys
        from remote.cas import Cas
        from remote.channel import open_channel
        from remote.digests import Blobs, node_of
        blobs = Blobs()
        cas = Cas(open_channel({server.endpoint!r}))
        cas.batch_bytes()
        before = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
        node_of({str(big)!r}, blobs)
        stats = cas.upload(blobs)
        after = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
        print(stats.bytes, (after - before) // 1024)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.split()
    sent, grown_mib = int(out[0]), int(out[1])
    assert sent == 96 << 20
    assert grown_mib < 32, f"grew by {grown_mib} MiB"


def test_a_named_instance_is_spoken_to_by_its_name(tmp_path: Path) -> None:
    named = start_cas_server("/var/tmp", instance="main")
    try:
        with named.channel() as channel:
            big, small = os.urandom(BIG), os.urandom(10)
            blobs = Blobs()
            digests = [blobs.add_bytes(big), blobs.add_bytes(small)]
            cas = Cas(channel, "main")
            assert cas.upload(blobs).blobs == 2
            # Sent again by ByteStream although present: the engine takes it as done.
            assert cas.upload(blobs, only=digests).blobs == 2
            assert cas.read(digests[0]) == big and cas.read(digests[1]) == small
            with pytest.raises(RemoteError):
                Cas(channel, "other").missing(digests)
    finally:
        named.stop()
        subprocess.run(["rm", "-rf", str(named.dir)], check=True)


def test_batches_stay_within_the_servers_limit_and_blob_count() -> None:
    limit = 4 << 20
    sizes = [1, 100, 3 << 20, 1 << 20, 2 << 20, 5000] + [10] * (MAX_BATCH_BLOBS + 10)
    digests = [Digest(f"{i:064x}", size) for i, size in enumerate(sizes)]
    batches = cas_module._pack(digests, limit)
    assert [d for b in batches for d in b] == digests
    for batch in batches:
        assert sum(d.size_bytes + cas_module.BLOB_OVERHEAD_BYTES for d in batch) <= limit
        assert len(batch) <= MAX_BATCH_BLOBS

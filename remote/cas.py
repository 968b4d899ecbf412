"""The client of an engine's content-addressable storage: what is missing, uploads, reads.

Uploads send only what `FindMissingBlobs` says is missing: small blobs packed into
`BatchUpdateBlobs` requests within the server's `max_batch_total_size_bytes`, larger ones
streamed through ByteStream from their files (`remote.streams`), a few requests at a time.
Every blob read is hashed again before it is returned or left on disk: the CAS is a cache
any client of the engine can write to, and nothing it says is trusted.
"""

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from remote import streams
from remote.channel import MAX_MESSAGE_BYTES
from remote.digests import Blobs, Digest, DigestLike, checked, sha256_digest, to_proto
from remote.errors import BlobMissing, DigestMismatch, RemoteError, translate
from remote.wire import bytestream_pb2_grpc, reapi_pb2, reapi_pb2_grpc

# What REAPI says a server advertising 0 accepts in one batch.
DEFAULT_BATCH_BYTES = 4 * 1024 * 1024
# Room kept in a batch for each blob's digest and framing, and for the request's own
# fields: BuildGrid counts only the blobs' bytes, others the whole message.
BLOB_OVERHEAD_BYTES = 128
REQUEST_OVERHEAD_BYTES = 1024
# Blobs per batch: BuildGrid's own batching stops at 500 (MAX_REQUEST_COUNT).
MAX_BATCH_BLOBS = 500
# Digests per FindMissingBlobs: ~80 bytes each, so requests of well under 1 MiB.
FIND_MISSING_CHUNK = 10_000
# Requests in flight during one upload or download: enough to cover a round trip's latency
# and keep a few cores hashing, few enough that batches held in memory stay a few MiB each
# (1000 files of 100 KiB: 44 MB/s with one, 86 MB/s with four, no better with eight).
TRANSFER_THREADS = 4
# A unary call that takes longer than this is a server that is not answering.
CALL_TIMEOUT = 300.0
# `read` holds a blob in memory: Directories, Trees, Commands, logs; not build outputs
# (`read_to` streams those to disk).
MAX_READ_BYTES = 256 * 1024 * 1024
EMPTY = sha256_digest(b"")

R = TypeVar("R", bound=Message)


@dataclass
class UploadStats:
    blobs: int = 0
    bytes: int = 0


class Cas:
    def __init__(self, channel: grpc.Channel, instance: str = "") -> None:
        self.channel = channel
        self.instance = instance
        self._cas = reapi_pb2_grpc.ContentAddressableStorageStub(channel)
        self._capabilities = reapi_pb2_grpc.CapabilitiesStub(channel)
        self._bytestream = bytestream_pb2_grpc.ByteStreamStub(channel)
        self._lock = threading.Lock()
        self._batch_bytes: int | None = None

    def _call(self, method: Callable[..., R], request: Message, what: str) -> R:
        try:
            return method(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as e:
            raise translate(e, what) from None

    def capabilities(self) -> reapi_pb2.ServerCapabilities:
        request = reapi_pb2.GetCapabilitiesRequest(instance_name=self.instance)
        return self._call(self._capabilities.GetCapabilities, request, "GetCapabilities")

    def batch_bytes(self) -> int:
        """The most blob bytes one batch may carry (asked once, then remembered)."""
        with self._lock:
            known = self._batch_bytes
        if known is not None:
            return known
        cache = self.capabilities().cache_capabilities
        functions = set(cache.digest_functions)
        if functions and reapi_pb2.DigestFunction.SHA256 not in functions:
            raise RemoteError("the engine's CAS does not take SHA-256 digests")
        limit = min(cache.max_batch_total_size_bytes or DEFAULT_BATCH_BYTES, MAX_MESSAGE_BYTES)
        limit -= REQUEST_OVERHEAD_BYTES + len(self.instance)
        with self._lock:
            self._batch_bytes = limit
        return limit

    def fits_batch(self, digest: Digest) -> bool:
        """Whether the blob travels in batches (else through ByteStream)."""
        return digest.size_bytes + BLOB_OVERHEAD_BYTES <= self.batch_bytes()

    # -- what is there -------------------------------------------------------------------

    def missing(self, digests: Iterable[DigestLike]) -> set[Digest]:
        """The subset of `digests` the CAS does not have."""
        wanted = list(dict.fromkeys(checked(d) for d in digests))
        absent: set[Digest] = set()
        for start in range(0, len(wanted), FIND_MISSING_CHUNK):
            chunk = wanted[start : start + FIND_MISSING_CHUNK]
            request = reapi_pb2.FindMissingBlobsRequest(
                instance_name=self.instance,
                blob_digests=[to_proto(d) for d in chunk],
                digest_function=reapi_pb2.DigestFunction.SHA256,
            )
            response = self._call(self._cas.FindMissingBlobs, request, "FindMissingBlobs")
            absent.update(checked(d) for d in response.missing_blob_digests)
        return absent & set(wanted)

    # -- uploads -------------------------------------------------------------------------

    def upload(self, blobs: Blobs, only: Iterable[DigestLike] | None = None) -> UploadStats:
        """Send the blobs of `blobs` the CAS lacks (`only`: these, already known missing)."""
        todo = self.missing(blobs) if only is None else {checked(d) for d in only}
        todo = {d for d in todo if d in blobs and d != EMPTY}
        streamed = [d for d in todo if not self.fits_batch(d)]
        batches = _pack(
            sorted(todo - set(streamed), key=lambda d: d.size_bytes), self.batch_bytes()
        )
        jobs: list[Callable[[], None]] = [lambda d=d: self._write(d, blobs) for d in streamed]
        jobs += [lambda b=b: self._update(b, blobs) for b in batches]
        _run_all(jobs)
        return UploadStats(len(todo), sum(d.size_bytes for d in todo))

    def _write(self, digest: Digest, blobs: Blobs) -> None:
        streams.write(self._bytestream, self.instance, digest, blobs.source(digest))

    def _update(self, batch: list[Digest], blobs: Blobs) -> None:
        request = reapi_pb2.BatchUpdateBlobsRequest(
            instance_name=self.instance, digest_function=reapi_pb2.DigestFunction.SHA256
        )
        for digest in batch:
            data = _load(blobs.source(digest), digest)
            request.requests.add(digest=to_proto(digest), data=data)
        response = self._call(self._cas.BatchUpdateBlobs, request, "BatchUpdateBlobs")
        for r in response.responses:
            if r.status.code != 0:
                raise RemoteError(f"BatchUpdateBlobs {r.digest.hash}: {r.status.message}")

    # -- reads ---------------------------------------------------------------------------

    def read(self, digest: DigestLike) -> bytes:
        """A blob's bytes, checked against its digest (at most MAX_READ_BYTES)."""
        wanted = checked(digest)
        if wanted.size_bytes > MAX_READ_BYTES:
            raise RemoteError(f"blob {wanted.hash} of {wanted.size_bytes} bytes is too big to read")
        return dict(self.read_many([wanted]))[wanted]

    def read_many(self, digests: Iterable[DigestLike]) -> Iterator[tuple[Digest, bytes]]:
        """Each distinct blob with its bytes, checked: small ones in batches, others streamed."""
        wanted = list(dict.fromkeys(checked(d) for d in digests))
        for digest in wanted:
            if digest == EMPTY:
                yield digest, b""
            elif not self.fits_batch(digest):
                yield digest, self._stream_bytes(digest)
        small = [d for d in wanted if d != EMPTY and self.fits_batch(d)]
        for batch in _pack(small, self.batch_bytes()):
            yield from self._read_batch(batch)

    def _stream_bytes(self, digest: Digest) -> bytes:
        if digest.size_bytes > MAX_READ_BYTES:
            raise RemoteError(f"blob {digest.hash} of {digest.size_bytes} bytes is too big to read")
        out = _Buffer()
        streams.read(self._bytestream, self.instance, digest, out)
        return bytes(out.data)

    def _read_batch(self, batch: list[Digest]) -> Iterator[tuple[Digest, bytes]]:
        request = reapi_pb2.BatchReadBlobsRequest(
            instance_name=self.instance,
            digests=[to_proto(d) for d in batch],
            digest_function=reapi_pb2.DigestFunction.SHA256,
        )
        response = self._call(self._cas.BatchReadBlobs, request, "BatchReadBlobs")
        got: dict[Digest, bytes] = {}
        for r in response.responses:
            digest = checked(r.digest)
            if r.status.code == grpc.StatusCode.NOT_FOUND.value[0]:
                raise BlobMissing(f"the CAS lacks blob {digest.hash}/{digest.size_bytes}")
            if r.status.code != 0:
                raise RemoteError(f"BatchReadBlobs {digest.hash}: {r.status.message}")
            if sha256_digest(r.data) != digest:
                raise DigestMismatch(f"blob {digest.hash}: its bytes hash otherwise")
            got[digest] = r.data
        for digest in batch:
            if digest not in got:
                raise BlobMissing(f"the CAS did not return blob {digest.hash}")
            yield digest, got[digest]

    def read_to(self, digest: DigestLike, path: str, executable: bool = False) -> None:
        """Write a blob to a new file at `path` (never through a symlink), checked as it
        arrives; on any failure the file is removed."""
        wanted = checked(digest)
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            with os.fdopen(fd, "wb") as out:
                if self.fits_batch(wanted):
                    out.write(self.read(wanted))
                else:
                    streams.read(self._bytestream, self.instance, wanted, out)
                os.fchmod(out.fileno(), 0o755 if executable else 0o644)
        except BaseException:
            os.unlink(path)
            raise

    def read_files(self, files: Mapping[Digest, Sequence[tuple[str, bool]]]) -> None:
        """Write each blob to every new file (path, executable) listed for it, checked:
        small blobs read in batches, large ones streamed, several requests at once."""
        for path, executable in files.get(EMPTY, ()):
            write_new(path, b"", executable)
        small = [d for d in files if d != EMPTY and self.fits_batch(d)]
        jobs: list[Callable[[], None]] = [
            lambda b=b: self._write_batch(b, files) for b in _pack(small, self.batch_bytes())
        ]
        jobs += [
            lambda d=d, p=p, x=x: self.read_to(d, p, x)
            for d in files.keys() - set(small) - {EMPTY}
            for p, x in files[d]
        ]
        _run_all(jobs)

    def _write_batch(
        self, batch: list[Digest], files: Mapping[Digest, Sequence[tuple[str, bool]]]
    ) -> None:
        for digest, data in self._read_batch(batch):
            for path, executable in files[digest]:
                write_new(path, data, executable)

    def directories(self, root: DigestLike, limit: int) -> dict[Digest, reapi_pb2.Directory]:
        """Every Directory under `root` (itself included), level by level, each checked
        against its digest; at most `limit` distinct ones (RemoteError beyond)."""
        found: dict[Digest, reapi_pb2.Directory] = {}
        level = {checked(root)}
        while level:
            if len(found) + len(level) > limit:
                raise RemoteError(f"a tree of more than {limit} directories")
            following: set[Digest] = set()
            for digest, data in self.read_many(level):
                found[digest] = directory = _directory(data, digest)
                following.update(checked(d.digest) for d in directory.directories)
            level = following - found.keys()
        return found

    def get_tree(self, root: DigestLike) -> list[reapi_pb2.Directory]:
        """GetTree: the engine's own walk of a tree (unchecked: for inspection and tests;
        `directories` checks each one)."""
        request = reapi_pb2.GetTreeRequest(instance_name=self.instance, root_digest=to_proto(root))
        try:
            return [d for page in self._cas.GetTree(request) for d in page.directories]
        except grpc.RpcError as e:
            raise translate(e, "GetTree") from None


class _Buffer:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> int:
        self.data += data
        return len(data)


def _directory(data: bytes, digest: Digest) -> reapi_pb2.Directory:
    try:
        return reapi_pb2.Directory.FromString(data)
    except DecodeError:
        raise DigestMismatch(f"blob {digest.hash} is not a Directory") from None


def _pack(digests: list[Digest], limit: int) -> list[list[Digest]]:
    """Consecutive digests grouped into batches of at most `limit` bytes (with overhead)."""
    batches: list[list[Digest]] = []
    size = limit + 1
    for digest in digests:
        cost = digest.size_bytes + BLOB_OVERHEAD_BYTES
        if size + cost > limit or len(batches[-1]) >= MAX_BATCH_BLOBS:
            batches.append([])
            size = 0
        batches[-1].append(digest)
        size += cost
    return batches


def write_new(path: str, data: bytes, executable: bool) -> None:
    """A new file (never through a symlink, never over another) holding `data`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        os.fchmod(f.fileno(), 0o755 if executable else 0o644)


def _load(source: bytes | str, digest: Digest) -> bytes:
    """A small blob's bytes, a file's re-hashed (it may have changed since it was hashed)."""
    if isinstance(source, bytes):
        return source
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        data = f.read(digest.size_bytes + 1)
    if sha256_digest(data) != digest:
        raise DigestMismatch(f"{source} changed since it was hashed")
    return data


def _run_all(jobs: list[Callable[[], None]]) -> None:
    """Run the jobs on TRANSFER_THREADS threads; the first failure is raised (the rest are
    dropped if not started)."""
    if len(jobs) <= 1:
        for job in jobs:
            job()
        return
    with ThreadPoolExecutor(TRANSFER_THREADS, thread_name_prefix="cas-transfer") as pool:
        futures = [pool.submit(job) for job in jobs]
        try:
            for future in futures:
                future.result()
        finally:
            for future in futures:
                future.cancel()

"""ByteStream transfers of single blobs: uploads streamed from a file, downloads streamed
into one, each checked against its digest as the bytes pass.

Blobs larger than a batch go this way (`remote.cas` decides), so nothing here holds more
than one chunk of a blob in memory, whatever its size.
"""

import hashlib
import os
import uuid
from collections.abc import Iterator
from typing import BinaryIO

import grpc

from remote.digests import Digest
from remote.errors import DigestMismatch, translate
from remote.wire import bytestream_pb2, bytestream_pb2_grpc

# The bytes of one WriteRequest: far below gRPC's 4 MiB message cap, big enough that the
# per-message cost is noise (BuildGrid's own client and buildbox use 1 MiB too).
WRITE_CHUNK_BYTES = 1024 * 1024


class _Verifier:
    """The running hash of a blob in transit, and its size, checked against the digest."""

    def __init__(self, digest: Digest, what: str) -> None:
        self.digest = digest
        self.what = what
        self.hasher = hashlib.sha256()
        self.size = 0
        self.error: DigestMismatch | None = None

    def take(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.digest.size_bytes:
            self.error = DigestMismatch(f"{self.what}: more than {self.digest.size_bytes} bytes")
            raise self.error
        self.hasher.update(data)

    def finish(self) -> None:
        if self.size != self.digest.size_bytes or self.hasher.hexdigest() != self.digest.hash:
            self.error = DigestMismatch(
                f"{self.what}: {self.size} bytes hashing to {self.hasher.hexdigest()}, "
                f"not {self.digest.hash}/{self.digest.size_bytes}"
            )
            raise self.error


def _prefix(instance: str) -> str:
    return f"{instance}/" if instance else ""


def write(
    stub: bytestream_pb2_grpc.ByteStreamStub, instance: str, digest: Digest, source: bytes | str
) -> None:
    """Upload one blob from bytes or from the file at `source`, re-hashed as it is read
    (a file changed since it was hashed is refused, never sent under a wrong digest)."""
    name = f"{_prefix(instance)}uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size_bytes}"
    verifier = _Verifier(digest, f"upload of {source if isinstance(source, str) else 'a blob'}")
    try:
        response = stub.Write(_chunks(name, source, verifier))
    except grpc.RpcError as e:
        if verifier.error is not None:
            raise verifier.error from None
        raise translate(e, f"ByteStream.Write {digest.hash}") from None
    if response.committed_size not in (digest.size_bytes, -1):
        raise DigestMismatch(
            f"upload of {digest.hash}: the server committed {response.committed_size} of "
            f"{digest.size_bytes} bytes"
        )


def _chunks(
    name: str, source: bytes | str, verifier: _Verifier
) -> Iterator[bytestream_pb2.WriteRequest]:
    offset = 0
    for data in _pieces(source, verifier.digest.size_bytes):
        verifier.take(data)
        last = verifier.size == verifier.digest.size_bytes
        if last:
            verifier.finish()
        yield bytestream_pb2.WriteRequest(
            resource_name=name if offset == 0 else "",
            write_offset=offset,
            finish_write=last,
            data=data,
        )
        offset += len(data)
    if verifier.size != verifier.digest.size_bytes:
        verifier.finish()


def _pieces(source: bytes | str, size: int) -> Iterator[bytes]:
    """The blob in chunks, then one byte more if a file has grown (so it is refused)."""
    if isinstance(source, bytes):
        for start in range(0, len(source), WRITE_CHUNK_BYTES):
            yield source[start : start + WRITE_CHUNK_BYTES]
        return
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb", buffering=0) as f:
        left = size
        while left > 0:
            data = f.read(min(WRITE_CHUNK_BYTES, left))
            if not data:
                return
            left -= len(data)
            yield data
        extra = f.read(1)
        if extra:
            yield extra


def read(
    stub: bytestream_pb2_grpc.ByteStreamStub, instance: str, digest: Digest, out: BinaryIO
) -> None:
    """Download one blob into `out`, hashed as it arrives; DigestMismatch if it is not
    what `digest` names (the caller discards what was written)."""
    name = f"{_prefix(instance)}blobs/{digest.hash}/{digest.size_bytes}"
    verifier = _Verifier(digest, f"blob {digest.hash}")
    call = stub.Read(bytestream_pb2.ReadRequest(resource_name=name))
    try:
        for response in call:
            verifier.take(response.data)
            out.write(response.data)
    except grpc.RpcError as e:
        raise translate(e, f"ByteStream.Read {digest.hash}") from None
    except BaseException:
        # Too many bytes, or the destination failing (disk full): the server stops sending.
        call.cancel()
        raise
    verifier.finish()

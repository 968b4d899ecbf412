"""The gRPC channel to a remote-execution engine, made from the endpoint a user writes in
weft.toml (`remote-endpoint`) or gives a worker (`--endpoint`).

One place decides what an endpoint may be and how the channel is tuned, so that the daemon,
the worker and the tests reach the engine the same way: `unix:///abs/path` (an engine on this
machine, the one-machine farm) or `grpc://host:port` / `host:port` (plain TCP). Channels are
insecure: TLS and authentication are out of scope (put the engine on a trusted network, or
behind a Unix socket or an SSH tunnel); `grpcs://` and `https://` are refused rather than
silently downgraded.
"""

from __future__ import annotations

import grpc

from remote.errors import RemoteUnavailable

__all__ = ["RemoteUnavailable", "open_channel", "target_of", "wait_ready"]

# The largest message either side may send or receive. gRPC's default receive limit is 4 MiB,
# which is also the REAPI batch size most engines advertise: a batch response of exactly that
# much payload plus its framing would be refused. The CAS client keeps batches within the
# server's `max_batch_total_size_bytes` and streams larger blobs through ByteStream, so this
# only has to exceed any sane batch (engines advertise a few MiB) while bounding what one call
# may make us hold in memory.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# The longest path a Unix socket address holds (sun_path is 108 bytes, with its NUL): gRPC
# fails on a longer one with an unhelpful "connection refused".
MAX_UNIX_SOCKET_PATH = 107

# Schemes meaning plain TCP. `grpc://` is what Bazel and BuildGrid's own tools write.
_TCP_SCHEMES = ("grpc://", "http://")
_TLS_SCHEMES = ("grpcs://", "https://")

_CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # An engine sits on the builders' own network: an http_proxy meant for downloads from the
    # internet must not capture the build traffic.
    ("grpc.enable_http_proxy", 0),
)


def target_of(endpoint: str) -> str:
    """The gRPC target for `endpoint`, or ValueError saying what is wrong with it."""
    endpoint = endpoint.strip()
    if endpoint.startswith("unix:"):
        path = endpoint.removeprefix("unix:")
        if path.startswith("//"):
            path = path.removeprefix("//")
        if not path.startswith("/"):
            raise ValueError(f"remote endpoint {endpoint!r}: a Unix socket path must be absolute")
        if len(path.encode()) > MAX_UNIX_SOCKET_PATH:
            raise ValueError(
                f"remote endpoint {endpoint!r}: a Unix socket path holds at most "
                f"{MAX_UNIX_SOCKET_PATH} bytes"
            )
        return f"unix://{path}"
    if endpoint.startswith(_TLS_SCHEMES):
        raise ValueError(f"remote endpoint {endpoint!r}: TLS is not supported (use grpc://)")
    for scheme in _TCP_SCHEMES:
        endpoint = endpoint.removeprefix(scheme)
    host, sep, port = endpoint.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit() or "/" in endpoint.rstrip("/"):
        raise ValueError(
            f"remote endpoint {endpoint!r}: expected unix:///path, grpc://host:port or host:port"
        )
    return f"{host}:{port}"


def open_channel(endpoint: str) -> grpc.Channel:
    """An insecure channel to `endpoint` (see the module's docstring for the forms). gRPC
    connects lazily: an engine that is not there shows as UNAVAILABLE on the first call (the
    library's RemoteUnavailable), or at once through `wait_ready`."""
    return grpc.insecure_channel(target_of(endpoint), options=_CHANNEL_OPTIONS)


def wait_ready(channel: grpc.Channel, timeout: float) -> None:
    """Return once the channel is connected; RemoteUnavailable if it is not within `timeout`
    seconds."""
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        raise RemoteUnavailable(
            f"remote engine not reachable within {timeout:g} s", grpc.StatusCode.UNAVAILABLE
        ) from None

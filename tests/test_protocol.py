"""The protocol core, driven with bytes only: no sockets, no trio."""

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.wire.protocol import (
    MAX_FRAME,
    BadRequest,
    Connection,
    Credit,
    Data,
    End,
    Error,
    Hello,
    Log,
    LogKind,
    ProtocolError,
    Reply,
    Request,
    Role,
    Welcome,
    encode_frame,
)


def pair() -> tuple[Connection, Connection]:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    server.receive_data(client.send(Hello()))
    hello = server.next_event()
    assert isinstance(hello, Hello)
    version = server.choose_version(hello)
    assert version == 1
    client.receive_data(server.send(Welcome(version)))
    assert client.next_event() == Welcome(1)
    assert client.version == server.version == 1
    return client, server


def deliver(src: Connection, dst: Connection, *events: object) -> list[object]:
    for e in events:
        dst.receive_data(src.send(e))  # type: ignore[arg-type]
    out = []
    while (e := dst.next_event()) is not None:
        out.append(e)
    return out


def test_pipelined_requests_and_out_of_order_replies() -> None:
    client, server = pair()
    reqs = [Request(i, "path-info", {"path": f"/p{i}"}) for i in range(5)]
    assert deliver(client, server, *reqs) == reqs
    replies = [Reply(3, {"x": 3}), Log(1, "working", 1, 2), Error(0, "not-valid", "nope"), Reply(1)]
    assert deliver(server, client, *replies) == replies


def test_bytes_split_anywhere() -> None:
    client, server = pair()
    wire = b"".join(client.send(Request(i, "op", {"i": i})) for i in range(20))
    got = []
    for i in range(len(wire)):
        server.receive_data(wire[i : i + 1])
        while (e := server.next_event()) is not None:
            got.append(e)
    assert got == [Request(i, "op", {"i": i}) for i in range(20)]


def test_flow_control() -> None:
    client, server = pair()
    deliver(client, server, Request(7, "add", {"name": "x"}))
    with pytest.raises(RuntimeError, match="credit"):
        client.send(Data(7, b"x"))
    assert deliver(server, client, Credit(7, 10)) == [Credit(7, 10)]
    assert client.send_credit(7) == 10
    assert deliver(client, server, Data(7, b"0123456789")) == [Data(7, b"0123456789")]
    assert client.send_credit(7) == 0
    # A peer that ignores its credit breaks the protocol.
    server.receive_data(encode_frame({"t": "data", "id": 7, "data": b"!"}))
    with pytest.raises(ProtocolError, match="beyond the granted credit"):
        server.next_event()


def test_late_data_for_a_finished_request_is_dropped() -> None:
    client, server = pair()
    deliver(client, server, Request(1, "add", {}))
    deliver(server, client, Credit(1, 100))
    client.receive_data(b"")
    server_bytes = server.send(Error(1, "invalid-archive", "bad"))
    out = deliver(client, server, Data(1, b"abc"), End(1), Request(2, "x", {}))
    assert out == [Request(2, "x", {})]
    client.receive_data(server_bytes)
    assert isinstance(client.next_event(), Error)


def test_bad_requests_keep_their_id() -> None:
    _client, server = pair()
    server.receive_data(encode_frame({"t": "req", "id": 5, "args": {}}))
    assert server.next_event() == BadRequest(5, "request has no op")
    server.receive_data(encode_frame({"t": "req", "id": 6, "op": "x", "args": [1]}))
    assert isinstance(server.next_event(), BadRequest)


@pytest.mark.parametrize(
    "frame,match",
    [
        (struct.pack(">I", MAX_FRAME + 1), "exceeds the maximum"),
        (struct.pack(">I", 3) + b"\xc1\xc1\xc1", "malformed msgpack"),
        (encode_frame([1, 2]), "not a map"),  # type: ignore[arg-type]
        (encode_frame({"t": "nope"}), "unknown frame type"),
        (encode_frame({"t": "req", "op": "x"}), "'id' must be an integer"),
        (encode_frame({"t": "req", "id": -1, "op": "x"}), "'id' must be an integer"),
        (encode_frame({"t": "hello", "versions": [1]}), "handshake repeated"),
        (encode_frame({"t": "data", "id": 1, "data": "text"}), "without bytes"),
    ],
)
def test_malformed_frames(frame: bytes, match: str) -> None:
    _client, server = pair()
    server.receive_data(frame)
    with pytest.raises(ProtocolError, match=match):
        server.next_event()


def test_oversized_frame_is_refused_before_its_body_arrives() -> None:
    server = Connection(Role.SERVER, max_frame=1000)
    server.receive_data(struct.pack(">I", 1001))
    with pytest.raises(ProtocolError, match="exceeds"):
        server.next_event()


def test_handshake_required_first() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(encode_frame({"t": "req", "id": 1, "op": "x", "args": {}}))
    with pytest.raises(ProtocolError, match="expected the handshake"):
        server.next_event()


def test_no_common_version() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(encode_frame({"t": "hello", "versions": [99]}))
    hello = server.next_event()
    assert isinstance(hello, Hello)
    assert server.choose_version(hello) is None


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_core(data: bytes) -> None:
    _, server = pair()
    server.receive_data(data)
    try:
        while server.next_event() is not None:
            pass
    except ProtocolError:
        pass


@settings(max_examples=200)
@given(
    st.recursive(
        st.none() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
        max_leaves=10,
    )
)
def test_random_msgpack_values_never_crash_the_core(value: object) -> None:
    _, server = pair()
    server.receive_data(encode_frame(value if isinstance(value, dict) else {"t": value}))
    try:
        while server.next_event() is not None:
            pass
    except ProtocolError:
        pass


def test_a_log_frame_carries_its_kind_and_derivation_and_older_frames_still_read() -> None:
    client, server = pair()
    typed = Log(7, "hello> hi", None, None, LogKind.LINE, "/store/abc-hello.drv")
    assert deliver(server, client, typed) == [typed]
    wire = server.send(Log(7, "3 derivations to build, 0 present", 0, 3, LogKind.NOTE))
    assert msgpack.unpackb(wire[4:]) == {
        "t": "log",
        "id": 7,
        "msg": "3 derivations to build, 0 present",
        "done": 0,
        "total": 3,
        "kind": "note",
    }
    # A frame from a daemon that knows no kinds, or with one ill-typed: a plain note.
    client.receive_data(encode_frame({"t": "log", "id": 7, "msg": "working"}))
    client.receive_data(encode_frame({"t": "log", "id": 7, "msg": "working", "kind": 3}))
    assert [client.next_event(), client.next_event()] == [Log(7, "working")] * 2


@pytest.mark.parametrize("frame", [Credit(9, 100), Data(9, b"x"), End(9)])
def test_a_frame_for_a_stream_with_no_request_is_a_protocol_error(frame: object) -> None:
    client, server = pair()
    body = {"t": type(frame).__name__.lower(), "id": 9, "n": 100, "data": b"x"}
    for receiver in (server, client):
        receiver.receive_data(encode_frame(body))
        with pytest.raises(ProtocolError, match="stream 9, which has no request in flight"):
            receiver.next_event()


def test_a_request_id_in_flight_cannot_be_reused_but_a_finished_one_can() -> None:
    client, server = pair()
    deliver(client, server, Request(1, "op", {}))
    with pytest.raises(RuntimeError, match="already in flight"):
        client.send(Request(1, "op", {}))
    server.receive_data(encode_frame({"t": "req", "id": 1, "op": "op"}))
    with pytest.raises(ProtocolError, match="already in flight"):
        server.next_event()
    client, server = pair()
    deliver(client, server, Request(1, "op", {}))
    deliver(server, client, Reply(1))
    assert deliver(client, server, Request(1, "again", {})) == [Request(1, "again", {})]
    assert deliver(server, client, Credit(1, 5)) == [Credit(1, 5)]

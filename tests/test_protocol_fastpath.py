"""The protocol core's quick paths (requests and replies made without `Record`'s general
constructor, frames mapped by the event's type) say exactly what the general ones did."""

import msgpack
import pytest

from daemon.wire import protocol as p
from tests.test_protocol import deliver, pair

EVERY_EVENT_SENT_BY_A_SERVER = [
    p.Reply(1, {"path": "/s/x", "references": []}),
    p.Reply(2),
    p.Error(3, p.Code.NOT_VALID, "nope", {"path": "/s/x"}),
    p.Error(None, p.Code.PROTOCOL, "bad"),
    p.Log(4, "building x", 1, 2, p.LogKind.STARTED, "/s/x.drv"),
    p.Log(4, "a note"),
    p.Credit(5, 4096),
]


def test_requests_and_replies_made_by_position_or_keyword_are_the_same() -> None:
    assert p.Request(1, "op") == p.Request(id=1, op="op", args={}) == p.Request(1, "op", None)
    assert p.Request(1, "op").args == {} and p.Request(1, "op").args is not p.Request(1, "x").args
    assert p.Reply(7) == p.Reply(id=7, result=None) and p.Reply(7, [1]) != p.Reply(7, [2])
    assert repr(p.Request(2, "path-info", {"path": "/p"})).startswith("Request(id=2, op=")


def test_every_frame_a_server_sends_reads_back_the_same() -> None:
    client, server = pair()
    client.send(p.Request(5, "add", {}))  # the stream the credit is for
    assert deliver(server, client, *EVERY_EVENT_SENT_BY_A_SERVER) == EVERY_EVENT_SENT_BY_A_SERVER


def test_a_reply_frame_is_the_documented_map() -> None:
    _, server = pair()
    frame = server.send(p.Reply(9, {"a": b"\x00"}))
    assert msgpack.unpackb(frame[4:]) == {"t": "ok", "id": 9, "result": {"a": b"\x00"}}


@pytest.mark.parametrize("rid", [-1, True, 1 << 63, 1.0, "1"])
def test_a_request_whose_id_is_not_a_small_integer_is_a_protocol_error(rid: object) -> None:
    _, server = pair()
    server.receive_data(p.encode_frame({"t": "req", "id": rid, "op": "x", "args": {}}))
    with pytest.raises(p.ProtocolError, match="field 'id' must be an integer"):
        server.next_event()


def test_an_event_of_no_known_type_cannot_be_sent() -> None:
    _, server = pair()
    with pytest.raises(TypeError, match="cannot send"):
        server.send(p.BadRequest(1, "not a frame of its own"))

"""The parts of a connection, each on real sockets in a trio run: the read hub, the
output (replies written at once or by the writer task), and the query batcher's
grouping of many requests into one call."""

import logging
import socket
from typing import Any

import pytest
import trio

from daemon.rpc.batcher import Calls, QueryBatcher
from daemon.rpc.context import Operation
from daemon.rpc.hub import ReadHub
from daemon.rpc.output import Output
from daemon.wire import protocol as p


def _server_stream() -> tuple[trio.SocketStream, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return trio.SocketStream(trio.socket.from_stdlib_socket(ours)), theirs


def _events(theirs: socket.socket, count: int) -> list[p.Event]:
    """`count` events read (blocking) from the client's end."""
    client = p.Connection(p.Role.CLIENT)
    client.version = 1
    events: list[p.Event] = []
    theirs.settimeout(10)
    while len(events) < count:
        client.receive_data(theirs.recv(1 << 20))
        while (event := client.next_event()) is not None:
            events.append(event)
    return events


def test_the_hub_calls_each_readable_socket_until_it_is_unwatched() -> None:
    pairs = [socket.socketpair() for _ in range(3)]
    calls: list[int] = []

    async def main() -> None:
        hub = ReadHub()
        for i, (ours, _) in enumerate(pairs):

            def readable(i: int = i, ours: socket.socket = ours) -> None:
                calls.append(i)
                ours.recv(100)

            hub.watch(ours.fileno(), readable, lambda e: pytest.fail(str(e)))
        pairs[1][1].send(b"x")
        pairs[2][1].send(b"x")
        while sorted(calls) != [1, 2]:
            await trio.sleep(0.01)
        hub.unwatch(pairs[2][0].fileno())
        assert not hub.watching(pairs[2][0].fileno())
        pairs[2][1].send(b"y")
        pairs[0][1].send(b"y")
        while len(calls) < 3:
            await trio.sleep(0.01)
        await trio.sleep(0.05)
        assert sorted(calls) == [0, 1, 2]

    trio.run(main)
    for a, b in pairs:
        a.close()
        b.close()


def test_a_watch_whose_callback_raises_ends_with_its_fault_and_the_others_go_on() -> None:
    (bad, bad_peer), (good, good_peer) = socket.socketpair(), socket.socketpair()
    faults: list[Exception] = []
    served: list[bytes] = []

    def explode() -> None:
        raise RuntimeError("boom")

    async def main() -> None:
        hub = ReadHub()
        hub.watch(bad.fileno(), explode, faults.append)
        hub.watch(good.fileno(), lambda: served.append(good.recv(10)), pytest.fail)
        bad_peer.send(b"x")
        while not faults:
            await trio.sleep(0.01)
        assert not hub.watching(bad.fileno())
        good_peer.send(b"ok")
        while not served:
            await trio.sleep(0.01)

    trio.run(main)  # a raise in the hub's system task would end the run
    assert [str(e) for e in faults] == ["boom"] and served == [b"ok"]
    for s in (bad, bad_peer, good, good_peer):
        s.close()


def test_a_reply_written_at_once_never_overtakes_log_lines_queued_before_it() -> None:
    stream, theirs = _server_stream()
    released: list[int] = []
    proto = p.Connection(p.Role.SERVER)
    proto.version = 1

    async def main() -> None:
        out = Output(stream, proto, released.append, lambda: None, "test")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(out.writer)
            assert out.send_nowait(p.Reply(1, "first"), slots=1)
            assert released == [1]  # written at once: its place given back at once
            out.send_nowait(p.Log(2, "working"))
            out.send_nowait(p.Reply(2, "second"), slots=1)
            assert released == [1]  # queued behind the log line, for the writer
            await trio.to_thread.run_sync(lambda: seen.extend(_events(theirs, 3)))
            nursery.cancel_scope.cancel()

    seen: list[p.Event] = []
    trio.run(main)
    assert seen == [p.Reply(1, "first"), p.Log(2, "working"), p.Reply(2, "second")]
    assert released == [1, 1]
    theirs.close()


def test_a_reply_larger_than_the_socket_takes_is_finished_by_the_writer_in_order() -> None:
    stream, theirs = _server_stream()
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    released: list[int] = []
    proto = p.Connection(p.Role.SERVER)
    proto.version = 1
    big = "x" * (2 << 20)
    seen: list[p.Event] = []

    async def main() -> None:
        out = Output(stream, proto, released.append, lambda: None, "test")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(out.writer)
            out.send_nowait(p.Reply(1, big), slots=1)
            assert released == [] and out.size > 0  # the rest waits for the writer
            out.send_nowait(p.Reply(2, "small"), slots=1)
            await trio.to_thread.run_sync(lambda: seen.extend(_events(theirs, 2)))
            while released != [2]:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert seen == [p.Reply(1, big), p.Reply(2, "small")]
    theirs.close()


def _doubled(services: str, args: dict[str, Any]) -> str:
    if not isinstance(args.get("n"), int):
        raise ValueError(f"bad n in {args}")
    return f"{services}:{args['n'] * 2}"


def test_queries_of_one_operation_from_many_connections_share_one_call() -> None:
    many_calls: list[int] = []

    def doubled_many(services: str, many: list[dict[str, Any]]) -> list[Any]:
        many_calls.append(len(many))
        return [_doubled(services, args) for args in many]

    op = Operation(query=_doubled, many=doubled_many)
    alone = Operation(query=lambda services, args: "alone")
    answers: dict[int, list[Any]] = {}

    async def main() -> None:
        batcher = QueryBatcher()
        for conn in range(5):
            calls = Calls("s", [(op, {"n": conn}), (alone, {}), (op, {"n": 10 + conn})])
            batcher.submit(calls, lambda got, conn=conn: answers.__setitem__(conn, got))
        while len(answers) < 5:
            await trio.sleep(0.01)

    trio.run(main)
    assert answers == {c: [f"s:{2 * c}", "alone", f"s:{2 * (10 + c)}"] for c in range(5)}
    assert many_calls == [10]  # one batch: all ten requests of `op` in one call


def test_a_query_alone_in_its_batch_is_asked_in_its_own_form() -> None:
    op = Operation(query=_doubled, many=lambda services, many: pytest.fail("many of one"))
    answers: list[Any] = []

    async def main() -> None:
        QueryBatcher().submit(Calls("s", [(op, {"n": 4})]), answers.extend)
        while not answers:
            await trio.sleep(0.01)

    trio.run(main)
    assert answers == ["s:8"]


def test_a_many_form_that_raises_leaves_each_request_its_own_answer() -> None:
    def strict_many(services: str, many: list[dict[str, Any]]) -> list[Any]:
        return [_doubled(services, args) for args in many]  # raises for the bad one

    op = Operation(query=_doubled, many=strict_many)
    answers: list[Any] = []

    async def main() -> None:
        batcher = QueryBatcher()
        batcher.submit(Calls("s", [(op, {"n": 1}), (op, {"n": "bad"})]), answers.extend)
        batcher.submit(Calls("s", [(op, {"n": 3})]), answers.extend)
        while len(answers) < 3:
            await trio.sleep(0.01)

    trio.run(main)
    assert answers[0] == "s:2" and answers[2] == "s:6"
    assert isinstance(answers[1], ValueError) and "bad n" in str(answers[1])


def test_a_many_form_that_answers_short_is_logged_and_each_request_asked_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    op = Operation(query=_doubled, many=lambda services, many: ["only one"])
    answers: list[Any] = []

    async def main() -> None:
        QueryBatcher().submit(Calls("s", [(op, {"n": 1}), (op, {"n": 2})]), answers.extend)
        while len(answers) < 2:
            await trio.sleep(0.01)

    with caplog.at_level(logging.ERROR, logger="weft.daemon"):
        trio.run(main)
    assert answers == ["s:2", "s:4"]
    assert "answered 1 of 2 requests" in caplog.text

"""Many clients at once on a real daemon, with the idle ones waiting in the read hub and
replies written from where they are made: every client still gets its own answers, in
the order its requests need, whatever it mixes in one write or however it leaves."""

import os
import select
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.daemons import DaemonProc, start_daemon, stop_daemon
from daemon.cli.blocking import BlockingClient
from daemon.wire import protocol as p
from tests.test_hostile_clients import RawClient

CLIENTS = 1000


@pytest.fixture
def daemon_in_var_tmp() -> Iterator[DaemonProc]:
    """A daemon whose state dir is under /var/tmp rather than the test's tmp_path."""
    d = Path(tempfile.mkdtemp(prefix="weft-many-", dir="/var/tmp"))
    daemon = start_daemon(d / "state", "--grace", "5")
    yield daemon
    stop_daemon(daemon)
    shutil.rmtree(d, ignore_errors=True)
    assert daemon.proc.returncode == 0, daemon.log.read_text()[-4000:]


def _paths(daemon: DaemonProc, n: int) -> list[str]:
    with BlockingClient(daemon.socket) as c:
        added = c.call_many([("add-text", {"name": f"p{i:04d}", "text": str(i)}) for i in range(n)])
    return [info["path"] for info in added]


def _read_all(clients: list[RawClient], wanted: list[int], timeout: float = 60) -> list[dict]:
    """Each client's final answers (replies, errors) by request id, until it has as many
    as `wanted` says."""
    got: list[dict[int, p.Event]] = [{} for _ in clients]
    by_fd = {c.sock.fileno(): i for i, c in enumerate(clients)}
    poll = select.epoll()
    for c in clients:
        c.sock.setblocking(False)
        poll.register(c.sock.fileno(), select.EPOLLIN)
    deadline = time.monotonic() + timeout
    try:
        while any(len(g) < w for g, w in zip(got, wanted, strict=True)):
            assert time.monotonic() < deadline, "some clients got no answer"
            for fd, _ in poll.poll(1):
                i = by_fd[fd]
                data = clients[i].sock.recv(1 << 16)
                assert data, f"client {i} was closed"
                clients[i].proto.receive_data(data)
                while (event := clients[i].proto.next_event()) is not None:
                    assert isinstance(event, p.Reply | p.Error), event
                    got[i][event.id] = event  # type: ignore[index]
    finally:
        poll.close()
        for c in clients:
            c.sock.setblocking(True)
    return got


def test_a_thousand_clients_asking_at_once_each_get_their_own_answers(
    daemon_in_var_tmp: DaemonProc,
) -> None:
    daemon = daemon_in_var_tmp
    paths = _paths(daemon, CLIENTS)
    clients = [RawClient(daemon.socket) for _ in range(CLIENTS)]
    try:
        for c in clients:
            c.until(p.Welcome)
        for round_ in range(3):
            mine, other = 2 * round_ + 1, 2 * round_ + 2
            for i, (c, path) in enumerate(zip(clients, paths, strict=True)):
                asks = [p.Request(mine, "path-info", {"path": path})]
                if i % 3 == 0:
                    # Pipelined behind it: a path of no store, refused on its own.
                    asks.append(p.Request(other, "path-info", {"path": "/x/y-z"}))
                c.send(*asks)
            wanted = [2 if i % 3 == 0 else 1 for i in range(CLIENTS)]
            for i, answers in enumerate(_read_all(clients, wanted)):
                assert answers[mine].result["path"] == paths[i]
                if i % 3 == 0:
                    assert answers[other].code == p.Code.INVALID_PATH
    finally:
        for c in clients:
            c.close()
    assert daemon.alive()


def test_queries_and_other_requests_in_one_write_are_all_answered(daemon: DaemonProc) -> None:
    [path] = _paths(daemon, 1)
    c = RawClient(daemon.socket)
    try:
        c.until(p.Welcome)
        c.send(
            p.Request(1, "path-info", {"path": path}),
            p.Request(2, "add-text", {"name": "mixed", "text": "m"}),  # not a query
            p.Request(3, "is-valid", {"paths": [path]}),
            p.Request(4, "no-such-op"),
            p.Request(5, "references", {"path": path}),
            p.Request(6, "path-info", {"path": path}),
        )
        answers = {}
        while len(answers) < 6:
            event = c.next_event()
            answers[event.id] = event  # type: ignore[attr-defined]
        assert answers[1].result["path"] == path == answers[6].result["path"]  # type: ignore[attr-defined]
        assert answers[2].result["path"].endswith("-mixed")  # type: ignore[attr-defined]
        assert answers[3] == p.Reply(3, [path])
        assert isinstance(answers[4], p.Error) and answers[4].code == p.Code.UNKNOWN_OP
        assert answers[5] == p.Reply(5, [])
        # The same connection goes on, idle in the hub again.
        c.send(p.Request(7, "is-valid", {"paths": []}))
        assert c.until(p.Reply) == p.Reply(7, [])
    finally:
        c.close()


def test_a_protocol_error_after_queries_in_one_write_closes_only_that_connection(
    daemon: DaemonProc,
) -> None:
    [path] = _paths(daemon, 1)
    bad = RawClient(daemon.socket)
    bad.until(p.Welcome)
    frames = b"".join(bad.proto.send(p.Request(i, "path-info", {"path": path})) for i in range(3))
    bad.sock.sendall(frames + p.encode_frame({"t": "no-such-frame"}))
    events = []
    with pytest.raises(ConnectionError):
        while True:
            events.append(bad.next_event())
    errors = [e for e in events if isinstance(e, p.Error)]
    assert errors and errors[-1].code == p.Code.PROTOCOL and errors[-1].id is None
    assert "unknown frame type" in errors[-1].message
    bad.close()
    with BlockingClient(daemon.socket) as good:
        assert good.call("path-info", path=path)["path"] == path
    assert "connection failed" not in daemon.log.read_text()


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_clients_leaving_with_queries_in_flight_leave_nothing_behind(daemon: DaemonProc) -> None:
    paths = _paths(daemon, 10)
    with BlockingClient(daemon.socket) as c:
        c.call("is-valid", paths=[])
        # The path-info cache's own database connection opens at the first path-info.
        c.call("path-info", path=paths[0])
        before = _open_fds(daemon.proc.pid)
    for _ in range(200):
        s = socket.socket(socket.AF_UNIX)
        s.connect(daemon.socket)
        proto = p.Connection(p.Role.CLIENT)
        asks = [proto.send(p.Request(i, "path-info", {"path": paths[i]})) for i in range(10)]
        s.sendall(proto.send(p.Hello()) + b"".join(asks))
        s.close()
    deadline = time.monotonic() + 10
    while _open_fds(daemon.proc.pid) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _open_fds(daemon.proc.pid) <= before
    with BlockingClient(daemon.socket) as c:
        assert [
            info["path"] for info in c.call_many([("path-info", {"path": x}) for x in paths])
        ] == paths
    assert "connection failed" not in daemon.log.read_text()

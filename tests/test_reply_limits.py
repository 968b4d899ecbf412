"""Replies and log lines larger than a frame, and connections cancelled with a full output
queue, against a real daemon: neither may end the daemon or hold it."""

import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

import pytest
import trio

from bench.daemons import DaemonProc, start_daemon, stop_daemon
from daemon.cli.blocking import BlockingClient, DaemonError
from daemon.rpc.batcher import QueryBatcher
from daemon.wire import protocol as p
from store.layout import StateDir
from store.paths import MAX_NAME_LEN
from store.store import Store
from tests.daemon_fixtures import run_as_nobody
from tests.test_hostile_clients import RawClient

# Referrers of one path whose list, at over 200 bytes a path, is past `MAX_FRAME`.
REFERRERS = 20_000


def _store_with_many_referrers(state: Path) -> str:
    """A store in which one path has `REFERRERS` referrers, made offline (one
    transaction); the daemon then starts on it."""
    store = Store(StateDir.at(state))
    try:
        target = store.add_text("target", "t").path
        name = "r" * (MAX_NAME_LEN - 8)
        items = [(f"{name}{i:08d}", f"{target} {i}", [target]) for i in range(REFERRERS)]
        store.add_texts(items)
        return target
    finally:
        store.close()


@pytest.fixture
def crowded(tmp_path: Path) -> tuple[DaemonProc, str]:
    state = tmp_path / "state"
    state.mkdir()
    target = _store_with_many_referrers(state)
    d = start_daemon(state, "--grace", "5")
    yield d, target
    stop_daemon(d)


def test_a_referrers_reply_over_the_frame_limit_is_a_too_large_error_and_the_daemon_lives(
    crowded: tuple[DaemonProc, str],
) -> None:
    daemon, target = crowded
    with BlockingClient(daemon.socket) as c:
        with pytest.raises(DaemonError) as caught:
            c.call("referrers", path=target)
        assert caught.value.code == p.Code.TOO_LARGE, caught.value
        assert "maximum frame" in str(caught.value)
        # The same connection, and the daemon, go on.
        assert c.call("references", path=target) == []
    with BlockingClient(daemon.socket) as c:
        assert c.call("is-valid", paths=[target]) == [target]
    assert daemon.alive()
    stop_daemon(daemon)
    assert daemon.proc.returncode == 0, daemon.log.read_text()[-4000:]


def test_a_batched_query_whose_completion_raises_leaves_the_others_answered() -> None:
    got: list[object] = []

    def fail() -> None:
        raise RuntimeError("boom")

    def done_raises(_: object) -> None:
        raise ValueError("too large")

    async def main() -> None:
        batcher = QueryBatcher()
        batcher.submit(fail, got.append)
        batcher.submit(lambda: 1, done_raises)
        batcher.submit(lambda: 2, got.append)
        while len(got) < 1:
            await trio.sleep(0.01)
        batcher.submit(lambda: 3, got.append)
        while len(got) < 2:
            await trio.sleep(0.01)

    trio.run(main)  # a raise in the system task would end it with TrioInternalError
    assert got == [2, 3]


def test_a_log_line_over_the_frame_limit_is_sent_cut_to_fit() -> None:
    huge = p.Log(3, "x" * (p.MAX_FRAME + 10), kind=p.LogKind.LINE)
    server = p.Connection(p.Role.SERVER)
    with pytest.raises(p.FrameTooLarge) as caught:
        server.send(huge)
    smaller = p.within_frame(huge, caught.value.size)
    assert smaller is not None
    frame = server.send(smaller)
    assert len(frame) < p.MAX_FRAME
    reader = p.Connection(p.Role.CLIENT)
    reader.version = 1
    reader.receive_data(frame)
    event = reader.next_event()
    assert isinstance(event, p.Log) and event.message.startswith("x" * 1000)
    assert "cut" in event.message and event.kind == p.LogKind.LINE


def _big_path(daemon: DaemonProc, tmp_path: Path) -> str:
    src = tmp_path / "big"
    src.write_bytes(os.urandom(24 << 20))
    with BlockingClient(daemon.socket) as c:
        return c.call("add-from-path", path=str(src))["path"]


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _settled_fds(pid: int) -> int:
    """The daemon's open fds once the connections before have closed theirs."""
    count = _open_fds(pid)
    while True:
        time.sleep(0.3)
        if (now := _open_fds(pid)) == count:
            return count
        count = now


def test_a_client_that_half_closes_during_a_large_reply_is_let_go_and_the_daemon_stops(
    tmp_path: Path,
) -> None:
    daemon = start_daemon(tmp_path / "state", "--grace", "2")
    try:
        path = _big_path(daemon, tmp_path)
        before = _settled_fds(daemon.proc.pid)
        c = RawClient(daemon.socket)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # Credit for the whole archive: the daemon queues output past HIGH_WATER at once,
        # and the client never reads any of it.
        c.send(p.Request(1, "dump", {"path": path}), p.Credit(1, 64 << 20))
        time.sleep(1)
        c.sock.shutdown(socket.SHUT_WR)
        # The connection's task ends: its socket is closed within the flush grace.
        deadline = time.monotonic() + 5
        while _open_fds(daemon.proc.pid) > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _open_fds(daemon.proc.pid) <= before, "the connection was never closed"
        with BlockingClient(daemon.socket) as other:
            assert other.call("is-valid", paths=[path]) == [path]
        started = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.proc.wait(2 + 5)
        assert time.monotonic() - started < 7
        assert daemon.proc.returncode == 0, daemon.log.read_text()[-4000:]
        c.close()
    finally:
        stop_daemon(daemon)


def test_shutdown_with_a_client_that_never_reads_a_large_reply_ends_within_the_grace(
    tmp_path: Path,
) -> None:
    daemon = start_daemon(tmp_path / "state", "--grace", "1")
    try:
        path = _big_path(daemon, tmp_path)
        c = RawClient(daemon.socket)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.send(p.Request(1, "dump", {"path": path}), p.Credit(1, 64 << 20))
        time.sleep(1)
        started = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.proc.wait(1 + 5)
        assert time.monotonic() - started < 6
        assert daemon.proc.returncode == 0, daemon.log.read_text()[-4000:]
        c.close()
    finally:
        stop_daemon(daemon)


def test_a_refusal_naming_an_allowed_users_list_over_the_frame_limit_is_cut_and_sent(
    tmp_path: Path,
) -> None:
    root = Path(tempfile.mkdtemp(prefix="weft-limits-", dir="/var/tmp"))
    root.chmod(0o755)
    state = root / "state"
    state.mkdir()
    names = ", ".join(f'"u{i:07d}"' for i in range(400_000))  # a message over 4 MiB
    (state / "weft.toml").write_text(f'allowed-users = ["root", {names}]\n')
    daemon = start_daemon(state)
    try:
        code = f"""
from daemon.cli.blocking import BlockingClient
try:
    BlockingClient({daemon.socket!r}).call("is-valid", paths=[])
    print("connected")
except Exception as e:
    print("refused", getattr(e, "code", type(e).__name__), len(str(e)))
"""
        out = run_as_nobody(code)
        refused, code_, size = out.stdout.split()
        assert (refused, code_) == ("refused", p.Code.PERMISSION), out
        assert int(size) < p.MAX_FRAME
        assert daemon.alive()
        with BlockingClient(daemon.socket) as c:
            assert c.call("is-valid", paths=[]) == []
    finally:
        stop_daemon(daemon)
        shutil.rmtree(root, ignore_errors=True)

"""Hostile clients on the daemon's real socket: uploaders that stall, clients that never
read their replies, frames for streams that do not exist.  Each must cost the daemon a
bounded amount, and every other client must still be served."""

import contextlib
import os
import shutil
import socket
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from daemon.cli.blocking import BlockingClient
from daemon.proc.workers import Workers
from daemon.rpc.infocache import InfoCache
from daemon.rpc.ops import OPERATIONS
from daemon.rpc.server import Daemon
from daemon.rpc.services import Services
from daemon.settings import Settings
from daemon.upkeep.collector import Collector
from daemon.wire import protocol as p
from store import nar
from store.layout import StateDir
from store.store import Store
from tests.daemon_fixtures import (
    DaemonProc,
    Graph,
    archive_of,
    run_as_nobody,
    start_daemon,
    stop_daemon,
)


class RawClient:
    """A client that speaks the protocol over a plain socket and does only what it is told."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.proto = p.Connection(p.Role.CLIENT)
        self.sock.sendall(self.proto.send(p.Hello()))

    def send(self, *events: p.Event) -> None:
        self.sock.sendall(b"".join(self.proto.send(e) for e in events))

    def next_event(self, timeout: float = 10) -> p.Event:
        self.sock.settimeout(timeout)
        while (event := self.proto.next_event()) is None:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("closed")
            self.proto.receive_data(data)
        return event

    def until(self, kind: type, timeout: float = 10) -> p.Event:
        while not isinstance(event := self.next_event(timeout), kind):
            pass
        return event

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def open_daemon() -> Iterator[DaemonProc]:
    """A daemon other users can reach, its state dir under /var/tmp."""
    d = Path(tempfile.mkdtemp(prefix="weft-hostile-", dir="/var/tmp"))
    d.chmod(0o755)
    daemon = start_daemon(d / "state")
    yield daemon
    stop_daemon(daemon)
    shutil.rmtree(d, ignore_errors=True)


def test_forty_stalled_uploaders_leave_queries_and_other_users_uploads_served(
    open_daemon: DaemonProc, tmp_path: Path
) -> None:
    stalled: list[RawClient] = []
    try:
        for i in range(40):
            c = RawClient(open_daemon.socket)
            c.send(p.Request(1, "add", {"name": f"stalled{i}"}))
            c.until(p.Welcome)
            if i % 2:
                # Half send the start of an archive, and then nothing: each holds a thread.
                c.until(p.Credit)
                c.send(p.Data(1, nar.HEADER))
            stalled.append(c)
        src = tmp_path / "src"
        src.write_text("mine")
        started = time.monotonic()
        with BlockingClient(open_daemon.socket) as c:
            assert c.call("is-valid", paths=[]) == []
            assert c.call("closure", paths=[]) == []
        assert time.monotonic() - started < 3
        # Another user's upload, and a dump of it, go through too.
        code = textwrap.dedent(f"""
            import io
            from daemon.cli.blocking import BlockingClient
            with BlockingClient({open_daemon.socket!r}) as c:
                info = c.upload("add", io.BytesIO({archive_of(src)!r}).read, name="theirs")
                out = io.BytesIO()
                c.download("dump", out.write, path=info["path"])
                print(info["path"], len(out.getvalue()))
        """)
        started = time.monotonic()
        out = run_as_nobody(code)
        assert out.returncode == 0, out.stderr
        assert time.monotonic() - started < 10
        path, size = out.stdout.split()
        assert path.startswith(open_daemon.store_dir) and int(size) == len(archive_of(src))
        assert open_daemon.alive()
    finally:
        for c in stalled:
            c.close()


def _references_target(daemon: DaemonProc) -> str:
    """A path with 20 references: 100 bytes of request each get a reply of over 1 KiB."""
    with BlockingClient(daemon.socket) as c:
        refs = [c.call("add-text", name=f"ref{i}", text=str(i))["path"] for i in range(20)]
        return c.call("add-text", name="many", text=" ".join(refs), references=refs)["path"]


def test_pipelined_queries_never_read_keep_the_daemon_small(daemon: DaemonProc) -> None:
    target = _references_target(daemon)
    flood = RawClient(daemon.socket)
    flood.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    before = daemon.rss_kib()
    frames = b"".join(
        flood.proto.send(p.Request(i, "references", {"path": target})) for i in range(1, 100_001)
    )
    flood.sock.settimeout(3)
    sent = 0
    try:
        while sent < len(frames):
            sent += flood.sock.send(frames[sent : sent + (1 << 16)])
    except TimeoutError:
        pass  # the daemon stopped reading: what the fix is for
    time.sleep(1)
    grown = daemon.rss_kib() - before
    with BlockingClient(daemon.socket) as c:
        started = time.monotonic()
        assert c.call("references", path=target)
        assert time.monotonic() - started < 3
    flood.close()
    assert grown < 64 * 1024, f"the daemon grew by {grown} KiB"
    assert daemon.alive()


@pytest.mark.parametrize("frame", [p.Credit(7, 1 << 20), p.End(7)])
def test_frames_for_a_stream_with_no_request_close_only_that_connection(
    daemon: DaemonProc, frame: p.Event
) -> None:
    c = RawClient(daemon.socket)
    c.until(p.Welcome)
    # Sent by hand: the client's own core refuses to name a stream it has not opened.
    c.sock.sendall(p.encode_frame({"t": type(frame).__name__.lower(), "id": 7, "n": 1 << 20}))
    error = c.until(p.Error)
    assert error.code == p.Code.PROTOCOL and "stream 7, which has no request" in error.message
    c.close()
    with BlockingClient(daemon.socket) as good:
        assert good.call("is-valid", paths=[]) == []


def test_a_million_credit_frames_for_unknown_streams_cost_the_daemon_nothing(
    daemon: DaemonProc,
) -> None:
    c = RawClient(daemon.socket)
    c.until(p.Welcome)
    before = daemon.rss_kib()
    n = 1 << 14
    try:
        for k in range(64):
            ids = range(k * n, (k + 1) * n)
            c.sock.sendall(b"".join(p.encode_frame({"t": "credit", "id": i, "n": 1}) for i in ids))
    except OSError:
        pass  # closed on the first: what the fix is for
    assert daemon.rss_kib() - before < 16 * 1024
    c.close()
    assert daemon.alive()


def test_a_client_that_shuts_its_reading_side_and_sends_bad_requests_is_harmless(
    daemon: DaemonProc,
) -> None:
    # The daemon's writes to it fail at once, while its reader still has requests to
    # answer: that once raised out of the connection and stopped the daemon.
    bad = b"".join(p.encode_frame({"t": "req", "id": i, "args": {}}) for i in range(20_000))
    for _ in range(10):
        s = socket.socket(socket.AF_UNIX)
        s.connect(daemon.socket)
        s.shutdown(socket.SHUT_RD)
        with contextlib.suppress(OSError):
            s.sendall(p.Connection(p.Role.CLIENT).send(p.Hello()) + bad)
        s.close()
    with BlockingClient(daemon.socket) as c:
        assert c.call("is-valid", paths=[]) == []
    assert daemon.alive()
    assert "connection failed" not in daemon.log.read_text()


def test_a_request_id_reused_while_in_flight_is_a_protocol_error(daemon: DaemonProc) -> None:
    c = RawClient(daemon.socket)
    c.send(p.Request(1, "add", {"name": "first"}))
    c.until(p.Credit)
    c.sock.sendall(p.encode_frame({"t": "req", "id": 1, "op": "is-valid", "args": {"paths": []}}))
    error = c.until(p.Error)
    assert error.code == p.Code.PROTOCOL and "already in flight" in error.message
    c.close()


async def _serve_in_process(state: Path, idle: float, body) -> None:  # type: ignore[no-untyped-def]
    """`body(socket path, store)` against an in-process daemon whose streams may be idle
    `idle` seconds."""
    store = Store(StateDir.at(state))
    workers = Workers()
    settings = Settings()
    collector = Collector(store, settings, workers)
    infos = InfoCache(str(store.db.path))
    services = Services(store.state, store, settings, collector, workers, infos)
    daemon = Daemon(services, OPERATIONS, stream_idle=idle)
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    path = str(state.parent / "s.sock")
    await sock.bind(path)
    sock.listen()
    try:
        async with trio.open_nursery() as n:
            await n.start(daemon.serve, trio.SocketListener(sock))
            await trio.to_thread.run_sync(body, path, store)
            daemon.shutdown_requested.set()
    finally:
        infos.forget()
        store.close()


async def test_an_upload_that_stalls_fails_after_the_idle_time_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    def body(path: str, store: Store) -> None:
        c = RawClient(path)
        c.send(p.Request(1, "add", {"name": "stalls"}))
        c.until(p.Credit)
        c.send(p.Data(1, nar.HEADER + nar.file_header(False, 1 << 20)))
        started = time.monotonic()
        error = c.until(p.Error, timeout=10)
        waited = time.monotonic() - started
        assert error.code == "timed-out" and "sent nothing for 0.5 s" in error.message
        assert 0.4 < waited < 5
        assert os.listdir(store.state.tmp_dir) == []
        # The connection goes on.
        c.send(p.Request(2, "is-valid", {"paths": []}))
        assert c.until(p.Reply) == p.Reply(2, [])
        c.close()

    await _serve_in_process(tmp_path / "state", 0.5, body)


async def test_an_upload_that_never_starts_fails_after_the_idle_time(tmp_path: Path) -> None:
    def body(path: str, store: Store) -> None:
        c = RawClient(path)
        c.send(p.Request(1, "add", {"name": "never"}))
        error = c.until(p.Error, timeout=10)
        assert error.code == "timed-out" and "sent nothing" in error.message
        c.close()

    # Under /var/tmp rather than /tmp, where the other in-process daemons are.
    with tempfile.TemporaryDirectory(prefix="weft-idle-", dir="/var/tmp") as where:
        await _serve_in_process(Path(where) / "state", 0.5, body)


async def test_a_download_never_credited_fails_after_the_idle_time(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(8 << 20))

    def body(path: str, store: Store) -> None:
        info = store.add_path(str(src))
        c = RawClient(path)
        c.send(p.Request(1, "dump", {"path": info.path}), p.Credit(1, 1 << 20))
        assert isinstance(c.until(p.Data), p.Data)
        error = c.until(p.Error, timeout=10)
        assert error.code == "timed-out" and "granted no credit for 0.5 s" in error.message
        c.close()

    await _serve_in_process(tmp_path / "state", 0.5, body)


def status(graph: Graph) -> dict:
    with BlockingClient(graph.daemon.socket) as c:
        return c.call("status")  # type: ignore[return-value]


def test_a_client_that_joins_a_build_and_never_reads_does_not_stall_it(graph: Graph) -> None:
    chatty = graph.sh(
        "chatty",
        # 6 MB in lines of 4 KB: more than a connection queues before it waits.
        "sleep 1; yes $(printf %04000d 0) | head -c 6000000; echo > $out",
    )
    results: list[object] = []
    first = threading.Thread(target=lambda: results.extend(graph.build(chatty)))
    first.start()
    deadline = time.monotonic() + 10
    while not status(graph)["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    stalled = RawClient(graph.daemon.socket)
    stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.send(p.Request(1, "build", {"drvs": [chatty.path]}))
    first.join(60)
    stalled.close()
    assert not first.is_alive(), "the build waited for a client that does not read"
    assert [r["status"] for r in results] == ["built"]  # type: ignore[index]

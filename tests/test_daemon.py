"""Integration tests: a real daemon process, its real socket, real clients."""

import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.cli.blocking import BlockingClient, DaemonError
from daemon.rpc.client import connect
from daemon.wire.protocol import MAX_FRAME
from store import nar
from store.hashing import hash_path
from tests.daemon_fixtures import (
    DaemonProc,
    archive_of,
    run_as_nobody,
    start_daemon,
    stop_daemon,
)

ROOT = Path(__file__).parent.parent


def test_add_query_dump_round_trip(daemon: DaemonProc, varied_tree: Path) -> None:
    with BlockingClient(daemon.socket) as c:
        info = c.upload("add", io.BytesIO(archive_of(varied_tree)).read, name="tree")
        assert info["path"].startswith(daemon.store_dir)
        assert info["nar_hash"] == hash_path(varied_tree)[0]
        same = c.call("add-from-path", path=str(varied_tree))
        assert same["path"] == info["path"]
        assert c.call("path-info", path=info["path"]) == info
        assert c.call(
            "is-valid", paths=[info["path"], daemon.store_dir + "/" + "0" * 32 + "-x"]
        ) == [info["path"]]
        out = io.BytesIO()
        result = c.download("dump", out.write, path=info["path"])
        assert out.getvalue() == archive_of(varied_tree)
        assert result == {"nar_size": len(out.getvalue())}
        assert c.call("closure", paths=[info["path"]]) == [info["path"]]
        assert c.call("references", path=info["path"]) == []
        assert c.call("referrers", path=info["path"]) == []
        report = c.call("verify")
        assert report == {"checked": 1, "missing": [], "mismatched": []}


def test_errors_have_stable_codes(daemon: DaemonProc, tmp_path: Path) -> None:
    with BlockingClient(daemon.socket) as c:
        cases = [
            (("path-info", {"path": daemon.store_dir + "/" + "0" * 32 + "-gone"}), "not-valid"),
            (("path-info", {"path": "/elsewhere"}), "invalid-path"),
            (("path-info", {}), "bad-request"),
            (("no-such-op", {}), "unknown-op"),
            (("add-from-path", {"path": "relative"}), "bad-request"),
            (("add-from-path", {"path": str(tmp_path / "missing")}), "io-error"),
        ]
        for (op, args), code in cases:
            with pytest.raises(DaemonError) as e:
                c.call(op, **args)
            assert e.value.code == code, (op, e.value)
        bad = nar.HEADER + b"\x05" + b"\0" * 7 + b"(junk" + b"\0" * 3
        with pytest.raises(DaemonError) as e:
            c.upload("add", io.BytesIO(bad).read, name="bad")
        assert e.value.code == "invalid-archive"
        # The connection is still usable after every error.
        assert c.call("is-valid", paths=[]) == []
    assert os.listdir(daemon.state / "store" / ".tmp") == []


def test_pipelining_on_one_connection(daemon: DaemonProc, tmp_path: Path) -> None:
    paths = []
    with BlockingClient(daemon.socket) as c:
        for i in range(20):
            f = tmp_path / f"f{i}"
            f.write_text(str(i))
            paths.append(c.call("add-from-path", path=str(f))["path"])
        calls = [("path-info", {"path": paths[i % 20]}) for i in range(1000)]
        calls[500] = ("path-info", {"path": daemon.store_dir + "/" + "1" * 32 + "-nope"})
        results = c.call_many(calls)
    assert len(results) == 1000
    assert isinstance(results[500], DaemonError) and results[500].code == "not-valid"
    for i, r in enumerate(results):
        if i != 500:
            assert r["path"] == paths[i % 20]


async def test_async_client_many_requests_in_flight(daemon: DaemonProc, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_text("async")
    async with connect(daemon.socket) as c:
        info = await c.call("add-from-path", path=str(src))
        results: list[dict] = []

        async def one() -> None:
            results.append(await c.call("path-info", path=info["path"]))

        async with trio.open_nursery() as n:
            for _ in range(300):
                n.start_soon(one)
        assert results == [info] * 300

        async def chunks():
            data = archive_of(src)
            for i in range(0, len(data), 7):
                yield data[i : i + 7]

        assert (await c.upload("add", chunks(), name="src"))["path"] == info["path"]
        got = bytearray()

        async def write(b: bytes) -> None:
            got.extend(b)

        await c.download("dump", write, path=info["path"])
        assert bytes(got) == archive_of(src)


def test_concurrent_clients(daemon: DaemonProc, tmp_path: Path) -> None:
    errors: list[BaseException] = []
    found: list[str] = []

    def worker(i: int) -> None:
        try:
            d = tmp_path / f"w{i}"
            d.mkdir()
            (d / "shared").write_text("same for everyone")
            (d / "own").write_text(f"worker {i}")
            with BlockingClient(daemon.socket) as c:
                for _ in range(5):
                    p = c.upload("add", io.BytesIO(archive_of(d / "shared")).read, name="shared")
                    found.append(p["path"])
                    own = c.call("add-from-path", path=str(d / "own"))
                    assert c.call("path-info", path=own["path"])["path"] == own["path"]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(found)) == 1
    with BlockingClient(daemon.socket) as c:
        assert c.call("verify")["checked"] == 17


def test_large_add_uses_bounded_memory_on_both_sides(daemon: DaemonProc) -> None:
    size = 1 << 30
    client = textwrap.dedent(f"""
        from daemon.cli.blocking import BlockingClient, chunk_reader
        from store import nar
        size = {size}
        def archive():
            yield nar.HEADER + nar.file_header(False, size)
            block = bytes(1 << 20)
            for _ in range(size >> 20):
                yield block
            yield nar.file_trailer(size)
        with BlockingClient({daemon.socket!r}) as c:
            info = c.upload("add", chunk_reader(archive()), name="big")
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        print(info["nar_size"], peak)
    """)
    before = daemon.rss_kib()
    # The client's own peak (VmHWM), not ru_maxrss: after a vfork and exec, ru_maxrss
    # counts the parent's peak too (the test process's, large after other tests).
    out = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True, check=True)
    nar_size, client_peak_kib = map(int, out.stdout.split())
    assert nar_size > size
    assert client_peak_kib < 100 * 1024
    assert daemon.rss_kib("VmHWM") - before < 100 * 1024


def test_client_killed_mid_add_leaves_nothing(daemon: DaemonProc) -> None:
    client = textwrap.dedent(f"""
        import os, signal
        from daemon.cli.blocking import BlockingClient
        from store import nar
        size = 64 << 20
        sent = 0
        def read(n):
            global sent
            if sent == 0:
                sent += 1
                return nar.HEADER + nar.file_header(False, size)
            sent += n
            if sent > 16 << 20:
                os.kill(os.getpid(), signal.SIGKILL)
            return bytes(min(n, 1 << 20))
        with BlockingClient({daemon.socket!r}) as c:
            c.upload("add", read, name="doomed")
    """)
    proc = subprocess.run([sys.executable, "-c", client])
    assert proc.returncode == -signal.SIGKILL
    tmp = daemon.state / "store" / ".tmp"
    deadline = time.monotonic() + 10
    while os.listdir(tmp) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.listdir(tmp) == []
    assert [n for n in os.listdir(daemon.store_dir) if not n.startswith(".")] == []
    with BlockingClient(daemon.socket) as c:
        assert c.call("verify")["checked"] == 0


def _raw_session(sock_path: str, payload: bytes) -> bytes:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(sock_path)
    try:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out
    except OSError:
        return b""
    finally:
        s.close()


def test_malformed_and_oversized_frames_close_only_their_connection(daemon: DaemonProc) -> None:
    with BlockingClient(daemon.socket) as good:
        hello = b"\x00\x00\x00\x19\x83\xa1t\xa5hello\xa8versions\x91\x01\xa5agent\xa1x"
        for payload in [
            struct.pack(">I", MAX_FRAME + 1) + b"x" * 100,
            struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1",
            hello + struct.pack(">I", 2) + b"\x92\x01",
            b"GET / HTTP/1.1\r\n\r\n",
        ]:
            reply = _raw_session(daemon.socket, payload)
            assert b"protocol-error" in reply
            assert good.call("is-valid", paths=[]) == []
    assert daemon.alive()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=300))
def test_random_bytes_never_take_the_daemon_down(shared_daemon: DaemonProc, data: bytes) -> None:
    _raw_session(shared_daemon.socket, data)
    with BlockingClient(shared_daemon.socket) as c:
        assert c.call("is-valid", paths=[]) == []


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory):
    d = start_daemon(tmp_path_factory.mktemp("shared") / "state")
    yield d
    stop_daemon(d)


@pytest.fixture
def open_state() -> "Path":
    """A state dir other users can reach (pytest's tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="weft-open-", dir="/tmp"))
    d.chmod(0o755)
    yield d / "state"
    shutil.rmtree(d, ignore_errors=True)


def test_other_users_are_refused_trusted_operations(open_state: Path) -> None:
    d = start_daemon(open_state)
    try:
        secret = open_state.parent / "secret"
        secret.write_text("root only")
        secret.chmod(0o600)
        readable = open_state.parent / "public"
        readable.write_text("anyone")
        readable.chmod(0o644)
        code = textwrap.dedent(f"""
            from daemon.cli.blocking import BlockingClient, DaemonError
            with BlockingClient({d.socket!r}) as c:
                print("valid", c.call("is-valid", paths=[]))
                print("public", c.call("add-from-path", path={str(readable)!r})["path"])
                refused = [("shutdown", {{}}), ("add-from-path", {{"path": {str(secret)!r}}})]
                for op, args in refused:
                    try:
                        c.call(op, **args)
                        print(op, "allowed")
                    except DaemonError as e:
                        print(op, e.code)
        """)
        out = run_as_nobody(code)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == "valid []"
        assert lines[1].startswith("public " + str(open_state / "store"))
        assert lines[2] == "shutdown permission-denied"
        assert lines[3] == "add-from-path permission-denied"
        owner = os.stat(lines[1].split()[1]).st_uid
        assert owner == 0
        assert d.alive()
    finally:
        stop_daemon(d)


def test_allowed_users_is_enforced(open_state: Path) -> None:
    open_state.mkdir()
    (open_state / "weft.toml").write_text('allowed-users = ["root"]\n')
    d = start_daemon(open_state)
    try:
        assert (open_state / "var").stat().st_mode & 0o777 == 0o700
        code = f"""
from daemon.cli.blocking import BlockingClient
try:
    BlockingClient({d.socket!r})
    print("connected")
except Exception as e:
    print("refused", type(e).__name__)
"""
        out = run_as_nobody(code)
        assert out.stdout.startswith("refused"), out
    finally:
        stop_daemon(d)


def test_an_allowed_users_refusal_names_the_user_the_socket_and_the_setting(
    open_state: Path,
) -> None:
    # Only the check after accept refuses here: two entries, so the directory stays open.
    open_state.mkdir()
    (open_state / "weft.toml").write_text('allowed-users = ["root", "daemon"]\n')
    d = start_daemon(open_state)
    try:
        code = f"""
from daemon.cli.blocking import BlockingClient, DaemonError
try:
    BlockingClient({d.socket!r}).call("is-valid", paths=[])
    print("connected")
except DaemonError as e:
    print(e.code, e.message)
"""
        out = run_as_nobody(code)
        assert out.stdout.strip() == (
            f"permission-denied user nobody (uid 65534) may not use the daemon at {d.socket}: "
            f"it is not in allowed-users = ['root', 'daemon'] ({open_state / 'weft.toml'})"
        ), out
    finally:
        stop_daemon(d)


def test_second_daemon_refused_and_stale_socket_taken_over(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = start_daemon(state)
    try:
        second = subprocess.run(
            [sys.executable, "-m", "daemon.cli.daemon", "--foreground", "--state-dir", str(state)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 1
        assert "already serves" in second.stderr
        assert first.alive()
    finally:
        first.proc.kill()
        first.proc.wait()
    # SIGKILL left the socket file behind; nothing listens on it.
    assert os.path.exists(first.socket)
    with pytest.raises(ConnectionRefusedError):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(first.socket)
        finally:
            s.close()
    again = start_daemon(state)
    try:
        with BlockingClient(again.socket) as c:
            assert c.call("is-valid", paths=[]) == []
    finally:
        stop_daemon(again)


def test_sigterm_lets_requests_in_flight_finish(daemon: DaemonProc, varied_tree: Path) -> None:
    data = archive_of(varied_tree)
    pieces = [data[: len(data) // 2], data[len(data) // 2 :]]
    step = threading.Event()
    result: list[object] = []

    def read_slowly(n: int) -> bytes:
        """The first half at once; then, with the daemon told to stop, the rest."""
        if not pieces:
            return b""
        if len(pieces) == 1 and not step.is_set():
            step.set()
            time.sleep(1.0)
        piece, pieces[0] = pieces[0][:n], pieces[0][n:]
        if not pieces[0]:
            pieces.pop(0)
        return piece

    def client() -> None:
        try:
            with BlockingClient(daemon.socket) as c:
                result.append(c.upload("add", read_slowly, name="tree"))
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=client)
    t.start()
    assert step.wait(10)
    daemon.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while os.path.exists(daemon.socket) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not os.path.exists(daemon.socket), "socket not removed at shutdown"
    t.join(10)
    assert isinstance(result[0], dict), result
    assert result[0]["nar_hash"] == hash_path(varied_tree)[0]
    assert daemon.proc.wait(10) == 0


def test_stop_command_and_embedded_default_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {**os.environ, "WEFT_STATE_DIR": str(state)}
    f = tmp_path / "file"
    f.write_text("embedded")
    bin_dir = Path(sys.executable).parent
    added = subprocess.run(
        [bin_dir / "store-add", str(f)], capture_output=True, text=True, env=env, timeout=60
    )
    assert added.returncode == 0, added.stderr
    assert "starting one" in added.stderr
    path = added.stdout.strip()
    assert path.startswith(str(state / "store"))
    valid = subprocess.run(
        [bin_dir / "store-query", "--valid", path], capture_output=True, text=True, env=env
    )
    assert valid.returncode == 0 and valid.stdout.strip() == path
    assert "starting" not in valid.stderr
    stopped = subprocess.run(
        [bin_dir / "store-daemon", "--stop"], capture_output=True, text=True, env=env, timeout=60
    )
    assert stopped.returncode == 0, stopped.stderr
    assert not os.path.exists(state / "var" / "daemon.sock")


async def test_temp_roots_live_until_the_connection_closes(tmp_path: Path) -> None:
    from daemon.proc.workers import Workers
    from daemon.rpc.infocache import InfoCache
    from daemon.rpc.ops import OPERATIONS
    from daemon.rpc.server import Daemon
    from daemon.rpc.services import Services
    from daemon.settings import Settings
    from daemon.upkeep.collector import Collector
    from store.layout import StateDir
    from store.store import Store

    state = StateDir.at(tmp_path / "state")
    store = Store(state)
    workers = Workers()
    collector = Collector(store, Settings(), workers)
    infos = InfoCache(str(store.db.path))
    services = Services(state, store, Settings(), collector, workers, infos)
    daemon = Daemon(services, OPERATIONS)
    sock_path = str(tmp_path / "s.sock")
    listener = trio.SocketListener(await _bound(sock_path))
    src = tmp_path / "src"
    src.write_text("rooted")
    async with trio.open_nursery() as n:
        await n.start(daemon.serve, listener)
        async with connect(sock_path) as c:
            info = await c.call("add-from-path", path=str(src))
            other = store.store_dir + "/" + "2" * 32 + "-later"
            await c.call("add-temp-root", path=other)
            assert store.pins.pinned() == {info["path"], other}
            link = tmp_path / "result"
            link.symlink_to(info["path"])
            entry = await c.call("add-root", link=str(link))
            assert os.readlink(entry) == str(link)
        with trio.fail_after(5):
            while store.pins.pinned():
                await trio.sleep(0.01)
        daemon.shutdown_requested.set()
    infos.forget()
    store.close()


async def _bound(path: str) -> trio.socket.SocketType:
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(path)
    sock.listen(16)
    return sock

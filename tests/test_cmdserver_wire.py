"""The command server's defences, spoken to over its socket: malformed, stalled and
foreign requests, another user, idleness, and two servers racing for one socket."""

import array
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from cmdserver import wire
from cmdserver.serve import MAX_INCOMING
from tests.cmdserver_fixtures import (
    ROOT,
    Runtime,
    answers,
    probe,
    raw_request,
    servers,
    wait_for,
)
from tests.daemon_fixtures import run_as_nobody


def test_malformed_and_stalled_requests_leave_the_server_serving_others(
    runtime: Runtime, tmp_path: Path
) -> None:
    probe(runtime, tmp_path)
    server = runtime.serving()
    path = str(runtime.socket())
    with contextlib.ExitStack() as stack:
        stalled = stack.enter_context(socket.socket(socket.AF_UNIX))
        stalled.connect(path)
        stalled.send(wire.HEAD.pack(wire.MAGIC, 1000)[:6])
        for junk in (
            b"GET / HTTP/1.1\r\n\r\n",
            wire.HEAD.pack(wire.MAGIC, wire.MAX_REQUEST + 1),
            raw_request([], []),  # no descriptors
        ):
            bad = stack.enter_context(socket.socket(socket.AF_UNIX))
            bad.connect(path)
            bad.sendall(junk)
            bad.settimeout(10)
            assert bad.recv(8) == b""  # closed on it, with nothing said
        started = time.monotonic()
        assert probe(runtime, tmp_path)["ppid"] == server
        assert time.monotonic() - started < 5
    assert servers(runtime.path) == [server]


def test_a_flood_of_silent_connections_is_capped_and_commands_still_run(
    runtime: Runtime, tmp_path: Path
) -> None:
    probe(runtime, tmp_path)
    server = runtime.serving()
    with contextlib.ExitStack() as stack:
        silent = []
        for _ in range(MAX_INCOMING + 8):
            s = stack.enter_context(socket.socket(socket.AF_UNIX))
            s.connect(str(runtime.socket()))
            silent.append(s)
        # Past the cap, the newest are closed on at once.
        over = silent[-1]
        over.settimeout(10)
        assert over.recv(8) == b""
        # A command meanwhile runs (by its client, the server being full), and the server
        # lives on.
        assert probe(runtime, tmp_path)["ppid"] != server
        assert servers(runtime.path) == [server]
    wait_for(lambda: probe(runtime, tmp_path)["ppid"] == server, 20)


def test_a_client_installed_under_another_name_is_told_to_run_it_itself(
    runtime: Runtime, tmp_path: Path
) -> None:
    probe(runtime, tmp_path)
    runtime.serving()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(runtime.socket()))
        request = raw_request([], []).replace(b"store-build", b"store-nothing", 1)
        request = wire.HEAD.pack(wire.MAGIC, len(request) - wire.HEAD.size) + request[8:]
        null = os.open(os.devnull, os.O_RDWR)
        try:
            s.sendmsg(
                [request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [null] * 3))]
            )
        finally:
            os.close(null)
        assert wire.REPLY.unpack(s.recv(8)) == (wire.Reply.DECLINED, wire.Declined.COMMAND)


def test_a_peer_of_another_user_is_declined(tmp_path: Path) -> None:
    # The socket's directory is the user's alone; this one is open, so that the other
    # user reaches the socket and the server's own check is what refuses.
    where = Path(tempfile.mkdtemp(prefix="weft-cmd-", dir="/var/tmp"))
    where.chmod(0o711)
    path = where / "open.sock"
    server = subprocess.Popen([sys.executable, "-m", "cmdserver", str(path)], cwd=ROOT)
    try:
        wait_for(lambda: answers(path))
        path.chmod(0o777)
        done = run_as_nobody(_declinedprobe(path))
    finally:
        server.kill()
        shutil.rmtree(where)
    assert done.stdout.strip() == f"({int(wire.Reply.DECLINED)}, {int(wire.Declined.CREDENTIALS)})"


def _declinedprobe(path: Path) -> str:
    return textwrap.dedent(
        f"""
        import array, socket, struct
        s = socket.socket(socket.AF_UNIX)
        s.connect({str(path)!r})
        fds = array.array("i", [0, 1, 2])
        s.sendmsg([{raw_request([], [])!r}], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        print(struct.unpack("=ii", s.recv(8)))
        """
    )


def test_an_idle_server_leaves_and_takes_its_socket_with_it(tmp_path: Path) -> None:
    path = tmp_path / "idle.sock"
    server = subprocess.Popen(
        [sys.executable, "-m", "cmdserver", str(path), "--idle", "0.5"], cwd=ROOT
    )
    try:
        wait_for(lambda: answers(path))
        assert server.wait(20) == 0
        assert not path.exists()
    finally:
        server.kill()


def test_of_two_servers_started_at_once_one_serves_and_the_other_leaves(tmp_path: Path) -> None:
    path = tmp_path / "two.sock"
    both = [
        subprocess.Popen([sys.executable, "-m", "cmdserver", str(path)], cwd=ROOT) for _ in range(2)
    ]
    try:
        wait_for(lambda: any(s.poll() is not None for s in both))
        (left,) = [s for s in both if s.poll() is not None]
        (stays,) = [s for s in both if s.poll() is None]
        assert left.returncode == 0
        assert answers(path)
        stays.send_signal(signal.SIGTERM)
        assert stays.wait(10) == 0
        assert not path.exists()
    finally:
        for s in both:
            s.kill()

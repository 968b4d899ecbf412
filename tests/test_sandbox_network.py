"""Fixed-output builds' network: a namespace of their own connected by pasta, which reaches
the internet (here a server in a network namespace of the test's, through a veth pair)
and nothing of the host's loopback or abstract Unix sockets."""

import hashlib
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.daemon_fixtures import Graph
from tests.test_sandbox import drive, parse

# What a builder runs to try an abstract Unix socket (busybox has no client for one).
ABSTRACT_CONNECT = r"""
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
int main(int argc, char **argv) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    size_t n = strlen(argv[1]);
    memcpy(addr.sun_path + 1, argv[1], n);
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    if (connect(s, (struct sockaddr *)&addr, offsetof(struct sockaddr_un, sun_path) + 1 + n)) {
        printf("%s\n", strerror(errno));
        return 1;
    }
    return 0;
}
"""
PAYLOAD = b"the sources, as downloaded\n"


@dataclass
class Internet:
    address: str  # the server's, in its namespace
    port: int


@pytest.fixture
def internet(tmp_path: Path) -> Iterator[Internet]:
    """An HTTP server in a network namespace of its own, standing in for the internet: the
    host reaches it through a veth pair, by its address, as it would a server afar."""
    tag = os.getpid() % 100_000
    netns, outside, inside = f"weft-inet-{tag}", f"wfo{tag}", f"wfi{tag}"
    # A /30 of 198.18.0.0/15 (set aside for benchmarks) per test process.
    base = ipaddress.ip_address("198.18.0.0") + 4 * (os.getpid() % 30_000)
    here, there = str(base + 1), str(base + 2)
    www = tmp_path / "www"
    www.mkdir()
    (www / "payload").write_bytes(PAYLOAD)
    server = None
    try:
        for cmd in (
            f"ip netns add {netns}",
            f"ip link add {outside} type veth peer name {inside} netns {netns}",
            f"ip addr add {here}/30 dev {outside}",
            f"ip link set {outside} up",
            f"ip -n {netns} addr add {there}/30 dev {inside}",
            f"ip -n {netns} link set {inside} up",
            f"ip -n {netns} link set lo up",
        ):
            subprocess.run(cmd.split(), check=True, capture_output=True)
        serve = [sys.executable, "-m", "http.server", "8080", "--bind", there]
        server = subprocess.Popen(
            ["ip", "netns", "exec", netns, *serve, "--directory", str(www)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_port(there, 8080)
        yield Internet(there, 8080)
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", outside], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


def _wait_for_port(address: str, port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection((address, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def state() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="weft-net-", dir="/var/tmp"))
    d.chmod(0o755)
    yield d / "state"
    shutil.rmtree(d, ignore_errors=True)


def _gateway() -> str:
    route = subprocess.run(["ip", "-4", "route", "show", "default"], capture_output=True, text=True)
    return route.stdout.split()[2]


def _abstract_client(where: Path) -> Path:
    """A directory with bin/abstract-connect, static."""
    source = where / "abstract-connect.c"
    source.write_text(ABSTRACT_CONNECT)
    (where / "client" / "bin").mkdir(parents=True)
    compiler = "musl-gcc" if shutil.which("musl-gcc") else "cc"
    out = where / "client" / "bin" / "abstract-connect"
    subprocess.run([compiler, "-static", "-O2", "-o", str(out), str(source)], check=True)
    return where / "client"


def test_a_fixed_output_build_reaches_a_server_outside_by_its_address(
    state: Path, internet: Internet
) -> None:
    url = f"http://{internet.address}:{internet.port}/payload"
    result = drive(state, f"wget -q -O - {url}", "--network")
    assert result["code"] == 0, result
    assert result["log"] == PAYLOAD.decode()
    # Its pasta was stopped as soon as the builder exited.
    assert result["pastas"] == []


def test_a_fixed_output_build_reaches_nothing_of_the_hosts_loopback(
    state: Path, tmp_path: Path
) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    name = f"weft-test-{os.getpid()}"
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind(b"\0" + name.encode())
    abstract.listen()
    abstract.setblocking(False)
    script = (
        f"nc -w 2 127.0.0.1 {port} </dev/null; echo loopback=$?; "
        f"nc -w 2 {_gateway()} {port} </dev/null; echo gateway=$?; "
        f'$INPUT/bin/abstract-connect {name}; echo "abstract=$?"'
    )
    try:
        result = drive(state, script, "--network", "--input", str(_abstract_client(tmp_path)))
        seen = parse(result["log"])
        assert (seen["loopback"], seen["gateway"], seen["abstract"]) == ("1", "1", "1"), result
        for server in (listener, abstract):
            with pytest.raises(BlockingIOError):
                server.accept()
    finally:
        listener.close()
        abstract.close()


def test_a_fixed_output_build_has_the_hosts_files_for_names_and_services(state: Path) -> None:
    result = drive(state, "md5sum /etc/hosts /etc/services; cat /etc/resolv.conf", "--network")
    assert result["code"] == 0, result
    for name in ("hosts", "services"):
        digest = hashlib.md5(Path(f"/etc/{name}").read_bytes()).hexdigest()
        assert f"{digest}  /etc/{name}" in result["log"]
    # Its resolver is pasta's, which forwards to the host's, wherever that listens.
    assert "nameserver 169.254.1.53\n" in result["log"]
    # A build without the network has none of them, and its own hosts file.
    plain = drive(state, "ls /etc; cat /etc/hosts")
    assert plain["log"].split("\n", 3)[:3] == ["group", "hosts", "passwd"]
    assert plain["log"].split("\n", 3)[3] == "127.0.0.1 localhost\n::1 localhost\n"


def test_a_fixed_output_derivation_downloads_through_the_daemon(
    graph: Graph, internet: Internet, tmp_path: Path
) -> None:
    from store.hashing import hash_path

    expected = tmp_path / "expected"
    expected.write_bytes(PAYLOAD)
    url = f"http://{internet.address}:{internet.port}/payload"
    fetch = graph.sh("fetch", f"wget -q -O $out {url}", output_hash=hash_path(expected)[0])
    (result,) = graph.build(fetch)
    assert result["status"] == "built", result
    assert Path(fetch.out).read_bytes() == PAYLOAD

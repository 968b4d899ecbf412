"""A real BuildGrid serving only its CAS, action cache and ByteStream, for the remote
library's tests: no PostgreSQL, no workers (tests/remotefarm.py starts the whole farm).

The CAS is on disk (`<dir>/cas/cas/objects/<2 hex>/<rest>`), so a test can tamper with a
blob the way a broken or hostile engine would serve it.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from remote.channel import open_channel
from remote.wire import reapi_pb2, reapi_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
# The engine install.sh puts in a venv of its own.
BGD = REPO / ".venv-bgd" / "bin" / "bgd"
# bgd imports a lot before it serves: seconds on this machine, more under load.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0

_CONFIG = """\
server:
  - !channel
    address: unix://{dir}/cas.sock
    insecure-mode: true
authorization:
  method: none
storages:
  - !disk-storage &cas
    path: {dir}/cas
caches:
  - !lru-action-cache &ac
    storage: *cas
    max-cached-refs: 10000
    allow-updates: true
    cache-failed-actions: false
instances:
  - name: "{instance}"
    services:
      - !action-cache
        cache: *ac
      - !cas
        storage: *cas
      - !bytestream
        storage: *cas
thread-pool-size: 16
"""


def bgd_path() -> Path | None:
    return BGD if BGD.exists() else None


@dataclass
class CasServer:
    dir: Path
    endpoint: str
    instance: str
    process: subprocess.Popen[bytes]

    def channel(self) -> grpc.Channel:
        return open_channel(self.endpoint)

    def blob_file(self, digest_hash: str) -> Path:
        return self.dir / "cas" / "cas" / "objects" / digest_hash[:2] / digest_hash[2:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_cas_server(parent: str, instance: str = "") -> CasServer:
    """A bgd in a new directory under `parent` (short: the socket path has a length
    limit), serving once this returns."""
    bgd = bgd_path()
    if bgd is None:
        raise RuntimeError("no bgd: run install.sh")
    where = Path(tempfile.mkdtemp(prefix="wcas", dir=parent))
    (where / "bgd.yml").write_text(_CONFIG.format(dir=where, instance=instance))
    log = open(where / "bgd.log", "wb")  # noqa: SIM115 - handed to the child
    process = subprocess.Popen(
        [str(bgd), "server", "start", str(where / "bgd.yml")],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=where,
        start_new_session=True,
    )
    log.close()
    server = CasServer(where, f"unix://{where}/cas.sock", instance, process)
    try:
        _wait_serving(server)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_serving(server: CasServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    request = reapi_pb2.GetCapabilitiesRequest(instance_name=server.instance)
    with server.channel() as channel:
        stub = reapi_pb2_grpc.CapabilitiesStub(channel)
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                log = (server.dir / "bgd.log").read_text(errors="replace")
                raise RuntimeError(f"bgd exited: {log[-2000:]}")
            try:
                stub.GetCapabilities(request, timeout=1)
                return
            except grpc.RpcError:
                time.sleep(0.1)
    raise RuntimeError(f"bgd did not serve within {START_TIMEOUT} s")


def tamper(path: Path) -> None:
    """Overwrite a blob file in place with bytes of the same length."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))


@contextmanager
def cas_server(parent: str, instance: str = "") -> Iterator[CasServer]:
    """A CAS-only bgd under `parent` for the block, stopped and removed after it."""
    server = start_cas_server(parent, instance)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)

"""The worker's private store-daemon, and one build through it.

The worker builds nothing itself: its own `store-daemon` (a child it starts, watches and
reaps) builds the lease's `.drv` in weft's sandbox, exactly as a local build would run,
and the worker is that daemon's client through the blocking client the store-* commands
use.  A build the engine cancels ends by closing the build's connection: the daemon
cancels a request whose client is gone, killing its builder.
"""

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from daemon.cli.blocking import BlockingClient, NoDaemon
from daemon.wire import protocol as p
from store.defaults import socket_path

# How long a fresh private daemon may take to answer on its socket: its first start
# creates the store (a few hundred ms) and starts its helpers.
DAEMON_START_SECONDS = 30
# SIGTERM to SIGKILL when the worker stops its daemon: the daemon's own grace for its
# builds is shorter, so a daemon still there after this is stuck.
DAEMON_STOP_SECONDS = 20
# A builder's log kept for the ActionResult's stdout: the daemon's own default log limit
# (`max-log-size`) is larger, but a log of this size is already unreadable and every byte
# of it is uploaded; the tail is what explains a failure, so the head is dropped.
MAX_LOG_BYTES = 32 << 20
# The private daemon's own log (its stderr) is appended to across the worker's restarts;
# past this size it is moved aside once (one old copy kept) when the next daemon starts.
MAX_DAEMON_LOG_BYTES = 64 << 20
PR_SET_PDEATHSIG = 1
_EXIT_CODE = re.compile(r"exit code (-?\d+)")
_TIMED_OUT = "timed out after"


class WorkerCancelled(Exception):
    """The engine took the lease back: the build is abandoned."""


def _die_with_parent() -> None:
    # In the child between fork and exec: if the worker is killed, its daemon (and with
    # it, by their own death signals, its helpers and builders) goes too.
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class PrivateDaemon:
    """The worker's own store-daemon on `state_dir` (the path it sees, in the worker's
    mount namespace), in the foreground: the worker is its one reaper."""

    def __init__(self, state_dir: str, log_path: str) -> None:
        self.state_dir = state_dir
        self.socket = socket_path(state_dir)
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-P", "-m", "daemon.cli.daemon", "--foreground", "--init"]
        cmd += ["--state-dir", self.state_dir]
        if os.path.exists(self.log_path) and os.path.getsize(self.log_path) > MAX_DAEMON_LOG_BYTES:
            os.replace(self.log_path, self.log_path + ".old")
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=_die_with_parent
            )
        self._wait_for_socket()

    def _wait_for_socket(self) -> None:
        deadline = time.monotonic() + DAEMON_START_SECONDS
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"the private daemon exited; see {self.log_path}")
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(self.socket)
                return
            except OSError:
                time.sleep(0.05)
            finally:
                s.close()
        raise TimeoutError(f"the private daemon did not answer on {self.socket}")

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self) -> BlockingClient:
        try:
            return BlockingClient(self.socket)
        except NoDaemon as e:
            raise RuntimeError(f"the private daemon is gone: {e}") from None

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(DAEMON_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()


@dataclass
class BuildReport:
    """How one build ended: what the ActionResult and the lease's status say."""

    exit_code: int
    log: bytes
    timed_out: bool = False
    message: str = ""
    outputs: dict[str, str] = field(default_factory=dict)  # output name -> store path


class _Log:
    """The builder's lines, the newest MAX_LOG_BYTES of them."""

    def __init__(self) -> None:
        self.parts: deque[bytes] = deque()
        self.size = 0

    def add(self, line: str) -> None:
        data = line.encode("utf-8", "surrogateescape") + b"\n"
        self.parts.append(data)
        self.size += len(data)
        while self.size > MAX_LOG_BYTES and len(self.parts) > 1:
            self.size -= len(self.parts.popleft())

    def text(self) -> bytes:
        return b"".join(self.parts)[-MAX_LOG_BYTES:]


def run_build(
    client: BlockingClient, drv: str, timeout: float | None, cancelled: threading.Event
) -> BuildReport:
    """Build `drv` through the private daemon's connection `client`; WorkerCancelled once
    `cancelled` is set (the caller then closes the connection, which makes the daemon
    kill the builder)."""
    log = _Log()

    def check() -> None:
        if cancelled.is_set():
            raise WorkerCancelled(drv)

    def on_log(event: p.Log) -> None:
        if event.kind == p.LogKind.LINE:
            log.add(event.message)
        check()

    args: dict[str, object] = {"drvs": [drv], "retries": 0, "remote": "none"}
    if timeout:
        args["timeout"] = timeout
    client.on_log, client.on_tick = on_log, check
    try:
        check()
        results = client.call("build", **args)
    finally:
        client.on_tick = None
    assert isinstance(results, list) and results, results
    return _report(results[0], log.text())


def _report(result: dict, log: bytes) -> BuildReport:
    if result["status"] in ("built", "valid"):
        return BuildReport(0, log, outputs=dict(result["outputs"]))
    message = str(result.get("message") or result["status"])
    # The daemon's first line says why ("... failed with exit code 3; last 25 log lines:");
    # the builder's own lines follow it and prove nothing.
    found = _EXIT_CODE.search(message.split("\n", 1)[0])
    code = int(found.group(1)) if found else 1
    # A death by signal N comes as -N; a process's status as a shell would say it.
    if code < 0:
        code = 128 - code
    return BuildReport(code or 1, log, timed_out=_TIMED_OUT in message, message=message)

"""A real store-daemon process in the foreground on a state dir, for benchmarks and tests:
started, waited for until its socket answers, stopped with SIGTERM."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# The installed command, the command server's client (cmdserver/).
_STORE_BUILD = str(Path(sys.executable).parent / "store-build")


def store_command(name: str, tree: Path | None = None) -> list[str]:
    """How to run the store command `name` of `tree`: this checkout's as install.sh
    installs it (the command server's client, a program of its own, not a script for
    Python), another tree's through its `bin/` script."""
    if tree is None:
        return [str(Path(sys.executable).parent / name)]
    return [sys.executable, str(tree / "bin" / name)]


def tree_env(tree: Path | None) -> dict[str, str] | None:
    """The environment that runs weft's modules from `tree` (None: this checkout's)."""
    if tree is None:
        return None
    return {**os.environ, "PYTHONPATH": str(tree)}


@dataclass
class DaemonProc:
    state: Path
    socket: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def store_dir(self) -> str:
        return str(self.state / "store")

    def rss_kib(self, field: str = "VmRSS") -> int:
        return rss_kib(self.proc.pid, field)

    def alive(self) -> bool:
        return self.proc.poll() is None


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def wait_for_socket(
    path: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}")
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            return
        except OSError:
            time.sleep(0.02)
        finally:
            s.close()
    raise TimeoutError(f"no daemon on {path}")


def _command(tree: Path | None) -> list[str]:
    """How the weft in `tree` (None: this checkout) starts its daemon: `store-daemon`'s
    module, and `--init` where it has it (since it, a named state dir holding no store is
    refused without it; before it, the flag is unknown).  Older trees started it as
    `daemon.main`."""
    cli = (tree or Path(__file__).resolve().parent.parent) / "daemon" / "cli" / "daemon.py"
    if not cli.exists():
        return ["daemon.main"]
    return ["daemon.cli.daemon", *(["--init"] if '"--init"' in cli.read_text() else [])]


def start_daemon(state: Path, *extra: str, tree: Path | None = None) -> DaemonProc:
    """A daemon on `state` (its store created if it has none), run from this checkout or
    from the source tree `tree` (another version of weft, for side-by-side benchmarks)."""
    state.mkdir(parents=True, exist_ok=True)
    log = state.parent / f"{state.name}-daemon.log"
    sock = str(state / "var" / "daemon.sock")
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                # -P: not the working directory first on sys.path, which would load this
                # checkout's daemon in place of the tree's when run from the checkout.
                "-P",
                "-m",
                *_command(tree),
                "--foreground",
                "--state-dir",
                str(state),
                *extra,
            ],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            env=tree_env(tree),
        )
    wait_for_socket(sock, proc)
    return DaemonProc(state, sock, proc, log)


def stop_daemon(d: DaemonProc) -> None:
    if d.alive():
        d.proc.send_signal(signal.SIGTERM)
        try:
            d.proc.wait(15)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait()


def processes_naming(text: str) -> list[int]:
    """The pids of the processes whose command line holds `text` (a state or runtime
    dir: what a test or a benchmark started there, to stop at its end)."""
    found = []
    for name in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if name.isdigit() and text.encode() in Path(f"/proc/{name}/cmdline").read_bytes():
                found.append(int(name))
    return found


@contextlib.contextmanager
def command_server(runtime: Path) -> Iterator[dict[str, str]]:
    """The environment of a bench's store-* commands, with a command server of their own
    in `runtime` (cmdserver/), started before the first timed command and stopped after
    the last: the commands as a user runs them, who has run one in the last 15 minutes."""
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    env.pop("WEFT_COMMAND_SERVER", None)
    subprocess.run([_STORE_BUILD, "--version"], env=env, check=True, capture_output=True)
    sockets = runtime / "weft"
    deadline = time.monotonic() + 30
    while not any(sockets.glob("cmd-*.sock")) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield env
    finally:
        for pid in processes_naming(str(runtime)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

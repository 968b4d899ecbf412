"""Many clients at once against weft's daemon or Nix's, measured the same way.

Python opens the connections and does each protocol's handshake (`connect_weft`,
`connect_nix`), then sends each connection's request once and reads the reply whole to
learn its exact bytes.  The timing is then `loadgen.c`'s: it inherits the connections and
keeps one request in flight on each active one (no pipelining, as Nix's clients do), timing
each from its send to its reply's last byte.  The generator in Python it replaces spent
about 15 us a request: at the 25,000 requests/s the goal needs, a third of one of the two
cores it shares with the daemon it measures, and its own queueing in the latencies.
"""

import array
import contextlib
import os
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import nixproto
from daemon.wire import protocol as p

SOURCE = Path(__file__).with_name("loadgen.c")
# Untimed asking first: the synchronized first burst, and whatever either daemon does
# once per connection (Nix's worker fills its path-info cache), are behind us by then.
WARMUP = 1.0
# The first fd the generator inherits: its connections, in order.
FIRST_FD = 3
_LEN = struct.Struct("=I")  # the script's lengths, as loadgen.c reads them


class LoadFailed(Exception):
    """The generator stopped: a reply unlike the one learnt, a connection closed, a daemon
    that answered nothing for a minute."""


@dataclass
class Target:
    """Connections past their handshake, and what each sends and gets back, exactly."""

    socks: list[socket.socket]
    exchanges: list[tuple[bytes, bytes]]
    daemon_pids: Callable[[], list[int]]


@dataclass
class Load:
    latencies: list[float]  # of the requests sent within the timed window
    seconds: float  # the whole run: every client asked all along
    requests: int  # answered in all, warm-up and the window's end included
    daemon_cpu: float  # the daemon's processes' CPU seconds over them all
    # Seconds the daemon's threads were ready to run but waited for a CPU: other
    # processes' work, or the generator's own, which preempts a daemon sharing its CPU.
    daemon_wait: float

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_per_request(self) -> float:
        return self.daemon_cpu / self.requests

    @property
    def wait_per_request(self) -> float:
        return self.daemon_wait / self.requests

    @property
    def concurrency(self) -> float:
        """Requests in flight on average (Little's law): the active clients, if the
        generator sent each next request as its reply came."""
        return self.throughput * sum(self.latencies) / len(self.latencies)


def compile_generator(work: Path) -> Path:
    exe = work / "loadgen"
    if not exe.exists():
        subprocess.run(["cc", "-O2", "-Wall", "-o", str(exe), str(SOURCE)], check=True)
    return exe


def _weft_handshake(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    conn = p.Connection(p.Role.CLIENT)
    s.sendall(conn.send(p.Hello()))
    while True:
        data = s.recv(65536)
        if not data:
            raise ConnectionError("the daemon closed the connection in the handshake")
        conn.receive_data(data)
        event = conn.next_event()
        if isinstance(event, p.Welcome):
            return s
        if event is not None:
            raise ConnectionError(f"the daemon refused: {event!r}")


def _weft_reply(s: socket.socket, request: bytes) -> bytes:
    s.sendall(request)
    got = b""
    while len(got) < 4 or len(got) < 4 + int.from_bytes(got[:4], "big"):
        more = s.recv(65536)
        if not more:
            raise ConnectionError("the daemon closed the connection")
        got += more
    conn = p.Connection(p.Role.CLIENT)
    conn.version = p.VERSIONS[-1]
    conn.receive_data(got)
    if not isinstance(conn.next_event(), p.Reply):
        raise ConnectionError(f"the daemon did not answer the request: {got[:200]!r}")
    return got


def connect_weft(path: str, calls: list[tuple[str, dict]], daemon_pid: int) -> Target:
    """A connection to weft's daemon for each call (an operation and its arguments)."""
    socks, exchanges = [], []
    for op, args in calls:
        socks.append(_weft_handshake(path))
        request = p.Connection(p.Role.CLIENT).send(p.Request(1, op, args))
        exchanges.append((request, _weft_reply(socks[-1], request)))
    return Target(socks, exchanges, lambda: [daemon_pid])


def connect_nix(store_paths: list[str], socket_path: str) -> Target:
    """A connection to a nix-daemon, with its forked worker, asking each path's info; and
    one more first, which keeps the paths alive while the target is open."""
    keeper = nixproto.handshake(socket_path)
    nixproto.add_temp_roots(keeper, store_paths)
    socks, exchanges = [], []
    for path in store_paths:
        socks.append(nixproto.handshake(socket_path))
        request = nixproto.query_path_info(path)
        socks[-1].sendall(request)
        exchanges.append((request, nixproto.read_path_info_reply(socks[-1])))
    return Target([*socks, keeper], exchanges, lambda: _workers_of(socks))


def _workers_of(socks: list[socket.socket]) -> list[int]:
    """Nix's forked workers: the children of the process that listens (SO_PEERCRED names
    the listener, not the worker that accepted)."""
    cred = socks[0].getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    listener = int.from_bytes(cred[:4], "little")
    pids = [listener]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
            if ppid == listener:
                pids.append(int(entry))
    return pids


def _cpu(pids: list[int]) -> dict[str, tuple[int, int]]:
    """Nanoseconds every thread of `pids` ran, and waited to run, so far, by thread, from
    the scheduler's counts: a forked Nix worker runs a fraction of a clock tick a round,
    which the tick counts of /proc/PID/stat round to nothing or to a whole tick."""
    counts: dict[str, tuple[int, int]] = {}
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    ran, waited = f.read().split()[:2]
                counts[tid] = (int(ran), int(waited))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return counts


def _cpu_since(before: dict[str, tuple[int, int]], pids: list[int]) -> tuple[float, float]:
    """Seconds `pids`' threads ran, and waited to run, since `before`, thread by thread: a
    thread that ended meanwhile (a worker thread idle for long, as trio's leave) takes its
    counts with it, which a difference of totals would take for negative time."""
    ran = waited = 0
    for tid, (r, w) in _cpu(pids).items():
        r0, w0 = before.get(tid, (0, 0))
        ran, waited = ran + r - r0, waited + w - w0
    return ran / 1e9, waited / 1e9


def run(exe: Path, target: Target, active: int, seconds: float) -> Load:
    """Requests one at a time on each of the first `active` connections, those sent
    within `seconds` after the warm-up timed; the other connections stay open and idle."""
    fds = [s.fileno() for s in target.socks[:active]]
    pids = target.daemon_pids()
    with tempfile.TemporaryDirectory(prefix="weft-loadgen-") as tmp:
        files = [Path(tmp, "script"), Path(tmp, "latencies")]
        files[0].write_bytes(
            b"".join(
                _LEN.pack(len(request)) + request + _LEN.pack(len(reply)) + reply
                for request, reply in target.exchanges[:active]
            )
        )
        cpu0, start = _cpu(pids), time.monotonic()
        done = subprocess.run(
            [exe, str(FIRST_FD), str(active), str(WARMUP), str(seconds), *map(str, files)],
            preexec_fn=lambda: _prepare_child(fds),
            close_fds=False,
            capture_output=True,
            text=True,
        )
        (cpu, wait), elapsed = _cpu_since(cpu0, pids), time.monotonic() - start
        if done.returncode:
            raise LoadFailed(done.stderr.strip())
        lat = array.array("d", files[1].read_bytes())
    return Load(lat.tolist(), elapsed, int(done.stdout), cpu, wait)


def _prepare_child(fds: list[int]) -> None:
    _place_fds(fds)
    # Ahead of the daemons in the run queue: a client sends its next request when its
    # reply comes, but a generator that waits for the CPU behind 1,000 forked Nix workers
    # sends it late, and the time between is in no latency: the daemon then has fewer
    # clients active than the row says (half, for Nix, at normal priority).  It sleeps
    # in epoll_wait between replies, so it takes only what its own work needs.
    with contextlib.suppress(PermissionError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))


def _place_fds(fds: list[int]) -> None:
    """In the child: the connections as fds FIRST_FD... in order; every other fd closed.
    They go up out of the way first, as their numbers overlap the ones they take."""
    high = max(fds) + len(fds) + FIRST_FD
    moved = [os.dup2(fd, high + i, inheritable=False) for i, fd in enumerate(fds)]
    for i, fd in enumerate(moved):
        os.dup2(fd, FIRST_FD + i, inheritable=True)
    os.closerange(FIRST_FD + len(fds), os.sysconf("SC_OPEN_MAX"))


def close(target: Target) -> None:
    for s in target.socks:
        s.close()

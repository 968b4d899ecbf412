"""`store-daemon`: serve a state dir's store on its Unix socket.

Start-up order matters: fork into the background (if asked) while the process has one
thread; start the locker and have it take the one-daemon lock; start the spawner (both
by posix_spawn, before any thread); open and migrate the database and recover what a
killed predecessor left half-done (`store/recovery.py`: its deletions undone, its debris
removed; it is dead once it has exited, even while a zombie nobody reaped), all before
the socket is bound, so that no request is answered from a store still being set right;
bind the socket (a stale one is replaced: the lock, not the socket file, says whether a
daemon is alive); then `trio.run`.  SIGTERM and SIGINT stop accepting, remove the socket,
let requests in flight finish within the grace period, and cancel the rest.
"""

import contextlib
import gc
import logging
import os
import resource
import signal
import socket
import sys

import trio

from daemon.compose import compose
from daemon.proc.cpus import Cpus
from daemon.proc.locks import DAEMON_OWNER, LockService, lock_file_blocking, start_locker_process
from daemon.proc.processes import ProcessMonitor
from daemon.proc.spawner import SpawnerService, start_spawner_process
from daemon.rpc import auth
from daemon.rpc.ops import OPERATIONS
from daemon.rpc.server import Daemon
from daemon.settings import Settings
from store.layout import StateDir
from store.store import Store

log = logging.getLogger("weft.daemon")
# Connections the kernel queues before the accept loop takes them: a build farm's burst of
# clients (bench/daemon_bench.py starts 1,000 at once) must not see ECONNREFUSED; the
# kernel caps it at net.core.somaxconn (4,096 on Debian 12).
LISTEN_BACKLOG = 1024
# The byte-lock file in `var/`: builds lock their outputs as bytes of it, one byte for
# each output path (`daemon/wire/locker.byte_of`, docs/locking.md).
OUTPUT_LOCKS = "output-locks"


class AlreadyRunning(RuntimeError):
    pass


def take_daemon_lock(
    state: StateDir, monitor: ProcessMonitor, cpus: Cpus
) -> tuple[LockService, trio.Event]:
    """Start the locker and have it hold `var/daemon.lock`: one daemon per state dir.

    The daemon's pid goes to `var/daemon.pid`, not into the lock file: a lock file with
    contents counts as deleted under Nix's stale rule.
    """
    lock_path = str(state.root / "var" / "daemon.lock")
    pid_path = state.root / "var" / "daemon.pid"
    locker_cpus = cpus.for_helper(shares=True)
    bytes_file = str(state.root / "var" / OUTPUT_LOCKS)
    proc, sock = start_locker_process(monitor, locker_cpus, bytes_file)
    try:
        granted = lock_file_blocking(sock, lock_path, DAEMON_OWNER)
    except BaseException:
        sock.close()
        raise
    if not granted:
        sock.close()
        try:
            holder = pid_path.read_text().strip()
        except OSError:
            holder = "unknown"
        raise AlreadyRunning(f"a daemon already serves {state.root} (pid {holder})")
    pid_path.write_text(f"{os.getpid()}\n")
    lost = trio.Event()
    locks = LockService(monitor, proc, sock, lock_path, lost.set, locker_cpus, bytes_file)
    return locks, lost


def bind_socket(path: str) -> socket.socket:
    # Only reached while holding the daemon lock: a socket file here is a dead daemon's.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o666)
    sock.listen(LISTEN_BACKLOG)
    return sock


async def run(
    daemon: Daemon,
    monitor: ProcessMonitor,
    locks: LockService,
    spawner: SpawnerService,
    lock_lost: trio.Event,
    sock: socket.socket,
    path: str,
    grace: float,
) -> None:
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    def stop_accepting() -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    async def on_signals() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                daemon.shutdown_requested.set()

    async def on_lock_lost() -> None:
        await lock_lost.wait()
        daemon.shutdown_requested.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        if daemon.services.runtimes is not None:
            # Before serving: the last daemon's runtimes are set right and watched again.
            await nursery.start(daemon.services.runtimes.run)
        nursery.start_soon(on_signals)
        nursery.start_soon(locks.run)
        nursery.start_soon(spawner.run)
        nursery.start_soon(on_lock_lost)
        await daemon.serve(listener, grace, stop_accepting)
        stop_accepting()
        await spawner.aclose()
        await locks.aclose()
        if daemon.services.builder is not None:
            daemon.services.builder.close()
        nursery.cancel_scope.cancel()


def _daemonize(log_path: str) -> int:
    """Fork; the parent waits for the child's word on a pipe and exits with it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r, "rb") as f:
            word = f.read().decode(errors="replace")
        if word.startswith("ready"):
            print(f"weft: daemon started (pid {pid}; log {log_path})", file=sys.stderr)
            os._exit(0)
        print(word.strip() or "error: the daemon died while starting", file=sys.stderr)
        os._exit(1)
    os.close(r)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    logfd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    os.dup2(null, 0)
    os.dup2(logfd, 1)
    os.dup2(logfd, 2)
    os.close(null)
    os.close(logfd)
    return w


def serve(state: StateDir, settings: Settings, path: str, foreground: bool, grace: float) -> int:
    """Serve `state` on `path` until stopped (in the background unless `foreground`)."""
    # One fd per client connection: take all the kernel allows.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ready_fd = None if foreground else _daemonize(str(state.log_dir / "daemon.log"))
    try:
        monitor = ProcessMonitor()
        monitor.become_subreaper()
        cpus = Cpus.plan(settings.share_cpu)
        locks, lock_lost = take_daemon_lock(state, monitor, cpus)
        # Forked and exec'd now, while the daemon has one thread and no event loop.
        builders = cpus.for_helper(shares=False)
        spawner = SpawnerService(monitor, *start_spawner_process(monitor, builders), builders)
        store = Store(state, auto_optimise=settings.auto_optimise)
        sock = bind_socket(path)
        if os.path.dirname(path) == str(state.root / "var"):
            auth.socket_access(state.root / "var", settings)
    except Exception as e:
        # Whatever stops the start-up, the waiting parent gets one line saying so.
        message = f"error: {e}"
        if ready_fd is not None:
            os.write(ready_fd, message.encode())
        print(message, file=sys.stderr)
        return 1
    log.info("serving %s on %s", state.root, path)
    if ready_fd is not None:
        os.write(ready_fd, b"ready")
        os.close(ready_fd)
    services = None
    try:
        services = compose(state, store, settings, locks, spawner, cpus)
        daemon = Daemon(services, OPERATIONS)
        # Before trio starts its threads: they follow the thread that starts them.
        cpus.settle()
        # Each build makes thousands of short-lived objects (tasks, frames, messages, the
        # exceptions of non-blocking calls), and the cyclic collector's passes over what
        # start-up made cost more than the cycles they find: that is frozen out of them,
        # and the youngest generation is collected less often (some MB of garbage at most).
        gc.freeze()
        gc.set_threshold(100_000, 50, 100)
        trio.run(run, daemon, monitor, locks, spawner, lock_lost, sock, path, grace)
    finally:
        if services is not None:
            # Its read-only connection to the database goes with the store's.
            services.infos.forget()
            if services.runtimes is not None:
                services.runtimes.close()
        store.close()
    log.info("stopped")
    return 0

"""`store-worker`: a weft worker for a REAPI engine (BuildGrid), `docs/remote.md`.

    store-worker --endpoint unix:///srv/farm/bgd.sock --state-dir /var/lib/weft-worker-1 \\
        --as-state-dir /var/lib/weft

It opens a bot session with the engine and builds the leases it is given in a weft store
of its own, through its own store-daemon, with the store dir of the daemons it serves
(`--as-state-dir`: its state dir is shown there in a mount namespace of its own, so
several workers, and a daemon, share one machine).  SIGTERM or SIGINT stops it: running
builds are stopped and their leases handed back for another worker.
"""

import argparse
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from types import FrameType

from worker.build import PrivateDaemon
from worker.session import BotSession, say

# The leases one worker takes at once unless told: its private daemon builds them side by
# side, so more than the machine's cores buys nothing; one keeps a test farm predictable.
DEFAULT_MAX_JOBS = 1
# The worker's own files inside its state dir: the private daemon's log and the scratch
# where inputs are fetched before their import.
WORKER_DIR = "worker"
# How often the worker looks whether its daemon is alive and its view of the state dir
# intact: a second's delay is nothing against a build, and costs two system calls.
WATCH_SECONDS = 1.0


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="store-worker", description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", required=True, help="the engine: unix:///path or host:port")
    ap.add_argument("--instance", default="", help="the engine's instance name (default: '')")
    ap.add_argument("--state-dir", required=True, help="the worker's own state dir")
    ap.add_argument("--as-state-dir", help="the path its state dir is shown at (the daemons')")
    ap.add_argument("--name", help="the bot's name (default: host name and state dir)")
    ap.add_argument("--max-jobs", type=int, default=DEFAULT_MAX_JOBS, help="leases at once")
    ap.add_argument(
        "--property",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra platform property it offers (the daemons' remote-platform)",
    )
    opts = ap.parse_args(argv)
    if opts.max_jobs < 1:
        ap.error("--max-jobs must be at least 1")
    for prop in opts.property:
        if "=" not in prop:
            ap.error(f"--property {prop!r}: give KEY=VALUE")
    return opts


def properties(store_dir: str, extra: list[str]) -> dict[str, str]:
    """What the worker offers: exactly what a daemon's Action asks for on this platform."""
    from remote.action import platform_properties

    return platform_properties(store_dir, dict(p.split("=", 1) for p in extra))


def main(argv: list[str] | None = None) -> int:
    opts = parse(sys.argv[1:] if argv is None else argv)
    real = os.path.abspath(opts.state_dir)
    logical = os.path.abspath(opts.as_state_dir or opts.state_dir)
    from worker.namespace import identity, show_at, still_shown

    if logical != real:
        # Before any thread: unshare(CLONE_NEWNS) needs a process that shares nothing.
        view = show_at(real, logical)
    else:
        os.makedirs(real, exist_ok=True)
        view = identity(real)
    name = opts.name or f"{socket.gethostname()}:{real}"
    own = os.path.join(logical, WORKER_DIR)
    os.makedirs(own, exist_ok=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon = PrivateDaemon(logical, os.path.join(own, "daemon.log"))
    daemon.start()
    try:
        return serve(opts, name, daemon, own, stop, lambda: still_shown(logical, view))
    finally:
        daemon.stop()


def serve(
    opts: argparse.Namespace,
    name: str,
    daemon: PrivateDaemon,
    own: str,
    stop: threading.Event,
    view_ok: Callable[[], bool],
) -> int:
    from remote.cas import Cas
    from remote.channel import open_channel
    from worker.inputs import Materialiser
    from worker.lease import LeaseRunner

    with daemon.client() as client:
        store_dir = str(client.call("store-dir"))
    channel = open_channel(opts.endpoint)
    cas = Cas(channel, opts.instance)
    runner = LeaseRunner(
        cas, Materialiser(cas, os.path.join(own, "scratch")), daemon, name, store_dir, view_ok
    )
    offered = properties(store_dir, opts.property)
    session = BotSession(channel, opts.instance, name, offered, opts.max_jobs, runner, stop)
    say(f"store-worker {name}: serving {store_dir} for {opts.endpoint}")
    watcher = threading.Thread(target=_watch, args=(daemon, view_ok, stop), daemon=True)
    watcher.start()
    try:
        session.run()
    finally:
        channel.close()
    if not daemon.alive():
        say(f"store-worker {name}: its private daemon died; see {daemon.log_path}")
        return 1
    if not view_ok():
        say(f"store-worker {name}: {own} is no longer its own state dir (renamed or removed?)")
        return 1
    return 0


def _watch(daemon: PrivateDaemon, view_ok: Callable[[], bool], stop: threading.Event) -> None:
    """A worker whose daemon died can build nothing, and one whose state dir is no longer
    shown at the daemons' path would build into the host's store: it stops (its running
    leases handed back) to be restarted."""
    while not stop.wait(WATCH_SECONDS):
        if not daemon.alive() or not view_ok():
            stop.set()


if __name__ == "__main__":
    sys.exit(main())

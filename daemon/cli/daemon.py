"""`store-daemon`: start, or stop, the daemon of a state dir.

Stopping needs no valid `weft.toml`: a daemon started before a typo was made must still
be stoppable.  Serving imports the daemon (and trio) only once the options are read.
"""

import argparse
import logging
import sys
import time

from daemon.cli.blocking import BlockingClient, DaemonError, NoDaemon
from daemon.settings import read_settings
from store.defaults import socket_path
from store.layout import ConfigError, StateDir


def stop(state: StateDir, path: str, timeout: float) -> int:
    try:
        pid = int((state.root / "var" / "daemon.pid").read_text())
    except (OSError, ValueError):
        pid = None
    try:
        with BlockingClient(path, on_log=lambda e: None) as client:
            client.call("shutdown")
    except NoDaemon:
        print(f"weft: no daemon serves {state.root}", file=sys.stderr)
        return 0
    except DaemonError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + timeout
    while pid is not None and _running(pid):
        if time.monotonic() > deadline:
            print(
                f"error: the daemon (pid {pid}) did not stop within {timeout:.0f} s",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.05)
    print("weft: daemon stopped", file=sys.stderr)
    return 0


def _running(pid: int) -> bool:
    """Whether `pid` is alive (a zombie is not: it has stopped, only its parent must reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="store-daemon", description=__doc__.split("\n")[0])
    parser.add_argument("--state-dir", help="state dir (default: $WEFT_STATE_DIR or per user)")
    parser.add_argument("--socket", help="socket path (default: <state dir>/var/daemon.sock)")
    parser.add_argument("--foreground", action="store_true", help="stay in the foreground")
    parser.add_argument("--stop", action="store_true", help="stop the state dir's daemon")
    parser.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="seconds in-flight requests get at shutdown (default 10)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s weft-daemon: %(message)s")
    try:
        state = StateDir.at(args.state_dir)
        state.create()
        settings = read_settings(state)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    path = args.socket or socket_path(str(state.root))
    if args.stop:
        return stop(state, path, args.grace + 5)

    from daemon.main import serve

    return serve(state, settings, path, args.foreground, args.grace)


if __name__ == "__main__":
    sys.exit(main())

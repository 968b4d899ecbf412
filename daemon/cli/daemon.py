"""`store-daemon`: start, or stop, the daemon of a state dir.

Stopping needs no valid `weft.toml`: a daemon started before a typo was made must still
be stoppable.  Only the default state dir is made when it holds no store: a mistyped
`--state-dir` would otherwise start a daemon on a new, empty store and leave it running;
`--init` makes one on purpose.  Serving imports the daemon (and trio) only once the
options are read, and stopping imports neither.
"""

import math
import os
import sys
import time

from daemon.cli.blocking import BlockingClient, DaemonError, NoDaemon
from daemon.cli.common import VERSION, Command, Flag, UsageError, say
from store.defaults import default_state_dir, socket_path

# Seconds requests in flight get at shutdown; a stop waits this and a little more.
DEFAULT_GRACE = 10.0
STOP_MARGIN = 5.0
# A Unix socket's path: `sun_path` holds 108 bytes, its terminating NUL included.
MAX_SOCKET_PATH = 107

DAEMON = Command(
    "store-daemon",
    "[--foreground] [--init] [--grace SECONDS]  |  store-daemon --stop",
    "Serve a state dir's store on its socket (in the background unless --foreground), or\n"
    "stop the daemon that serves it.",
    (
        Flag("--foreground", "stay in the foreground, logging to stderr"),
        Flag("--init", "create the store when --state-dir names a dir that holds none"),
        Flag("--stop", "stop the state dir's daemon (reads no weft.toml)"),
        Flag(
            "--grace",
            "seconds requests in flight get at shutdown",
            "SECONDS",
            default=f"{DEFAULT_GRACE:g}",
        ),
    ),
)


def stop(root: str, path: str, timeout: float) -> int:
    try:
        with open(os.path.join(root, "var", "daemon.pid")) as f:
            pid: int | None = int(f.read())
    except (OSError, ValueError):
        pid = None
    try:
        with BlockingClient(path, on_log=lambda e: None) as client:
            client.call("shutdown")
    except NoDaemon:
        say(f"weft: no daemon serves {root}")
        return 0
    except DaemonError as e:
        say(f"error: {e.message}")
        return 1
    deadline = time.monotonic() + timeout
    while pid is not None and _running(pid):
        if time.monotonic() > deadline:
            say(f"error: the daemon (pid {pid}) did not stop within {timeout:.0f} s")
            return 1
        time.sleep(0.05)
    say("weft: daemon stopped")
    return 0


def _running(pid: int) -> bool:
    """Whether `pid` is alive (a zombie is not: it has stopped, only its parent must reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start(root: str, path: str, explicit: bool, opts: dict[str, str | bool], grace: float) -> int:
    """Serve `root` on `path`, creating its store only if it is the default state dir or
    `--init` asks for one."""
    import logging

    from daemon.settings import read_settings
    from store.layout import ConfigError, StateDir

    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        say(
            f"error: the socket path {path} is {len(os.fsencode(path))} bytes, and a Unix "
            f"socket's may be at most {MAX_SOCKET_PATH}: name a shorter one with --socket "
            "or $WEFT_SOCKET"
        )
        return 1
    try:
        state = StateDir.at(root)
        fresh = not state.has_store()
        if fresh and explicit and not opts.get("--init"):
            say(
                f"error: no store at {state.root}; "
                f"`store-daemon --state-dir {state.root} --init` creates one"
            )
            return 1
        # Before anything is made: a settings file with a mistake leaves no store behind.
        settings = read_settings(state)
        if fresh:
            say(f"weft: creating a store at {state.root}")
        state.create()
    except (ConfigError, OSError) as e:
        say(f"error: {e}")
        return 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s weft-daemon: %(message)s")
    from daemon.main import serve

    return serve(state, settings, path, bool(opts.get("--foreground")), grace)


def _grace(opts: dict[str, str | bool]) -> float:
    value = opts.get("--grace", "")
    try:
        grace = float(value) if isinstance(value, str) and value else DEFAULT_GRACE
    except ValueError:
        raise UsageError(f"--grace {value!r} is not a number of seconds") from None
    if not math.isfinite(grace) or grace < 0:
        raise UsageError(f"--grace {value!r} must be a finite number of seconds, 0 or more")
    return grace


def main(argv: list[str] | None = None) -> int:
    try:
        opts, rest = DAEMON.parse(sys.argv[1:] if argv is None else argv)
        if rest:
            raise UsageError(f"unexpected argument {rest[0]!r}")
        grace = _grace(opts)
    except UsageError as e:
        say(f"{DAEMON.name}: {e}\nusage: {DAEMON.name} {DAEMON.usage}")
        return 2
    if opts.get("--help"):
        sys.stdout.write(DAEMON.help())
        return 0
    if opts.get("--version"):
        sys.stdout.write(f"{DAEMON.name} (weft) {VERSION}\n")
        return 0
    given = opts.get("--state-dir")
    root = os.path.abspath(str(given or default_state_dir()))
    path = str(opts.get("--socket") or socket_path(root))
    if opts.get("--stop"):
        return stop(root, path, grace + STOP_MARGIN)
    # The default state dir (which $WEFT_STATE_DIR names) is made when missing, even when
    # named: that is how a command started with none running starts its daemon.
    explicit = bool(given) and root != os.path.abspath(default_state_dir())
    return start(root, path, explicit, opts, grace)


if __name__ == "__main__":
    sys.exit(main())

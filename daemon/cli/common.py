"""What every store-* command shares: option parsing, the connection (starting a daemon
when none serves the state dir), and output helpers.  Imports are kept to the protocol
and msgpack: every invocation pays for them."""

import os
import sys

from daemon.cli.blocking import BlockingClient, NoDaemon
from store.defaults import default_state_dir, has_store, socket_path

# What `--version` prints: the package's version, kept in step with pyproject.toml.
VERSION = "0.1.0"


class UsageError(Exception):
    """Bad usage: the command prints this, its usage, and exits 2."""


class CommandError(Exception):
    """A failure explained to the user: the command prints the message as it is (it says
    `error:`, or names a recipe's `file:line:`) and exits 1, with no traceback."""


# Where --help's descriptions start: the longest flag with its value fits
# (`    --max-silent-time SECONDS`).
FLAG_COLUMN = 30


class Flag:
    """One option: `--name`, an optional `-x` short form, the placeholder of its value
    ("" for a switch), a one-line description and the default `--help` shows.  A plain
    class: importing dataclasses costs every command 12 ms."""

    def __init__(
        self, name: str, help: str, value: str = "", short: str = "", default: str = ""
    ) -> None:
        self.name = name
        self.help = help
        self.value = value
        self.short = short
        self.default = default

    def line(self) -> str:
        names = f"{self.short}, {self.name}" if self.short else f"    {self.name}"
        spelled = f"{names} {self.value}" if self.value else names
        default = f" (default: {self.default})" if self.default else ""
        return f"  {spelled:<{FLAG_COLUMN}} {self.help}{default}"


# Options every command takes.
COMMON = (
    Flag("--state-dir", "the store's state dir", "DIR", default="$WEFT_STATE_DIR or per user"),
    Flag("--socket", "the daemon's socket", "PATH", default="<state dir>/var/daemon.sock"),
    Flag("--help", "print this help and exit", short="-h"),
    Flag("--version", "print weft's version and exit"),
)


class Command:
    """A command's usage, what it does, and its options: one parsing style for every
    store-* command, and `--help` made from the same table the parser reads."""

    def __init__(self, name: str, usage: str, summary: str, flags: tuple[Flag, ...] = ()) -> None:
        self.name = name
        self.usage = usage
        self.summary = summary
        self.flags = flags

    def help(self) -> str:
        head = f"usage: {self.name} {self.usage}\n\n{self.summary}\n\noptions:\n"
        return head + "\n".join(f.line() for f in (*self.flags, *COMMON)) + "\n"

    def parse(self, argv: list[str]) -> tuple[dict[str, str | bool], list[str]]:
        """Options by long name (`--x`, `-x`, `--x VALUE`, `--x=VALUE`, `-xVALUE`) and the
        positional arguments, in any order; `--` ends the options."""
        by_name = {n: f for f in (*self.flags, *COMMON) for n in (f.name, f.short) if n}
        opts: dict[str, str | bool] = {}
        rest: list[str] = []
        it = iter(argv)
        for arg in it:
            if arg == "--":
                rest.extend(it)
                break
            if not arg.startswith("-") or arg == "-":
                rest.append(arg)
                continue
            name, eq, value = arg.partition("=")
            if name not in by_name and len(arg) > 2 and arg[:2] in by_name:
                name, eq, value = arg[:2], "=", arg[2:]
            flag = by_name.get(name)
            if flag is None:
                raise UsageError(f"unknown option {name}")
            if flag.value:
                if not eq:
                    value = next(it, "")
                    if not value:
                        raise UsageError(f"{name} needs a value ({flag.value})")
                opts[flag.name] = value
            elif eq:
                raise UsageError(f"{name} takes no value")
            else:
                opts[flag.name] = True
        return opts, rest


def say(message: str) -> None:
    os.write(2, (message + "\n").encode())


def connect(opts: dict[str, str | bool]) -> BlockingClient:
    """A connection to the state dir's daemon, started when none serves it.  Only the
    default state dir is created on the way: a `--state-dir` the user typed names a store
    that must exist, lest a typo start a new, empty store and leave a daemon serving it."""
    explicit = opts.get("--state-dir")
    state = str(explicit or default_state_dir())
    path = str(opts.get("--socket") or socket_path(state))
    try:
        return BlockingClient(path)
    except NoDaemon:
        pass
    if explicit and not has_store(state):
        raise CommandError(
            f"error: no store at {state}; `store-daemon --state-dir {state} --init` creates one"
        )
    say(f"weft: no daemon serves {state}; starting one")
    import subprocess
    import time

    # Isolated (-I): the daemon must not import a `json.py` that happens to sit in the
    # directory the command was run from, nor heed PYTHONPATH or the user's site dir.  The
    # default state dir is left for the daemon to find (and create) on its own.
    where = ["--state-dir", state] if explicit else []
    cmd = [sys.executable, "-I", "-m", "daemon.cli.daemon", *where, "--socket", path]
    subprocess.run(cmd, stdin=subprocess.DEVNULL, check=False)
    # Another command may have won the race to start it: wait for whichever daemon is up.
    deadline = time.monotonic() + 10
    while True:
        try:
            return BlockingClient(path)
        except NoDaemon:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def print_json(value: object) -> None:
    import json

    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def lines(items: list[str]) -> None:
    if items:
        sys.stdout.write("\n".join(items) + "\n")


def absolute(path: str) -> str:
    """A path argument made absolute; an empty one is refused, not taken for the current
    directory (`store-add ''` would otherwise add all of it)."""
    if not path:
        raise UsageError("an empty path names nothing (the current directory is `.`)")
    return os.path.abspath(path)


def human_size(n: int) -> str:
    """Bytes in binary units with one decimal (`12.3 MiB`), as `du -h` and `nix path-info
    -h` show them."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if round(value, 1) < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"

"""What every store-* command shares: option parsing, the connection (starting a daemon
when none serves the state dir), and output helpers.  Imports are kept to the protocol
and msgpack: every invocation pays for them."""

import os
import sys

from daemon.cli.blocking import BlockingClient, NoDaemon
from store.defaults import default_state_dir, socket_path

# Options every command takes.
COMMON = {"--state-dir": True, "--socket": True, "--help": False}


class UsageError(Exception):
    pass


def parse(argv: list[str], flags: dict[str, bool]) -> tuple[dict[str, str | bool], list[str]]:
    """Flags (`--x`, `-x`, `--x VALUE`, `--x=VALUE`) and positional arguments, in any order."""
    spec = {**COMMON, **flags}
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
        if name not in spec:
            raise UsageError(f"unknown option {name}")
        if spec[name]:
            if not eq:
                value = next(it, "")
                if not value:
                    raise UsageError(f"{name} needs a value")
            opts[name] = value
        elif eq:
            raise UsageError(f"{name} takes no value")
        else:
            opts[name] = True
    return opts, rest


def say(message: str) -> None:
    os.write(2, (message + "\n").encode())


def connect(opts: dict[str, str | bool]) -> BlockingClient:
    state = str(opts.get("--state-dir") or default_state_dir())
    path = str(opts.get("--socket") or socket_path(state))
    try:
        return BlockingClient(path)
    except NoDaemon:
        pass
    say(f"weft: no daemon serves {state}; starting one")
    import subprocess
    import time

    cmd = [sys.executable, "-m", "daemon.main", "--state-dir", state, "--socket", path]
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
    return os.path.abspath(path)

"""The store-* commands by the name run as (`bin/store-client`): help, version, dispatch,
exit codes.  Results go to stdout, progress and diagnostics to stderr.  Exit codes: 0
success, 1 the operation failed (or, for `--valid` and `store-verify`, found something
invalid), 2 bad usage; `store-run` exits with its command's status, and 125 for its own
failures, as env(1) does.

Each command is a `Command` spec (its usage, summary and flags, which both `--help` and
its parser read) and a function of argv, in a module imported only when the command
runs: store-build's pulls in more than a query should pay for.

No command imports trio (tests/test_house.py checks it): a command starts in tens of
milliseconds, and trio alone would cost more than that.
"""

import os
import sys
from typing import NoReturn

from daemon.cli.blocking import DaemonError
from daemon.cli.common import VERSION, Command, CommandError, UsageError, say

# name run as: (module, its Command spec, its function of argv).  A new command is a row
# here, a link to bin/store-client under its name, and that name in pyproject.toml.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "store-add": ("daemon.cli.commands", "ADD", "store_add"),
    "store-query": ("daemon.cli.query", "QUERY", "store_query"),
    "store-dump": ("daemon.cli.commands", "DUMP", "store_dump"),
    "store-log": ("daemon.cli.commands", "LOG", "store_log"),
    "store-verify": ("daemon.cli.commands", "VERIFY", "store_verify"),
    "store-gc": ("daemon.cli.commands", "GC", "store_gc"),
    "store-optimise": ("daemon.cli.commands", "OPTIMISE", "store_optimise"),
    "store-build": ("daemon.cli.build", "BUILD", "store_build"),
    "store-status": ("daemon.cli.sched", "STATUS", "store_status"),
    "store-history": ("daemon.cli.sched", "HISTORY", "store_history"),
    "store-snapshot": ("daemon.cli.snapshot", "SNAPSHOT", "store_snapshot"),
    "store-why-depends": ("daemon.cli.whydepends", "WHY_DEPENDS", "store_why_depends"),
    "store-export": ("daemon.cli.transfer", "EXPORT", "store_export"),
    "store-import": ("daemon.cli.transfer", "IMPORT", "store_import"),
    "store-run": ("daemon.cli.run", "RUN", "store_run"),
    "store-runtime": ("daemon.cli.runtime", "RUNTIME", "store_runtime"),
}


def _options(argv: list[str]) -> list[str]:
    """The arguments that may be options: everything before `--`."""
    return argv[: argv.index("--")] if "--" in argv else argv


def run(name: str, argv: list[str] | None = None) -> int:
    module, spec_name, function = COMMANDS[name]
    code = __import__(module, fromlist=[function])
    argv = sys.argv[1:] if argv is None else argv
    options = _options(argv)
    if "--help" in options or "-h" in options:
        sys.stdout.write(getattr(code, spec_name).help())
        return 0
    if "--version" in options:
        sys.stdout.write(f"{name} (weft) {VERSION}\n")
        return 0
    try:
        return int(getattr(code, function)(argv))
    except UsageError as e:
        spec: Command = getattr(code, spec_name)
        say(f"{name}: {e}\nusage: {name} {spec.usage}\n(`{name} --help` describes every option)")
        return 2
    except CommandError as e:
        say(str(e))
        return 1
    except DaemonError as e:
        say(f"error: {e.message}")
        return 1
    except (OSError, ConnectionError) as e:
        say(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        return 130


def finish(code: int) -> NoReturn:
    """Leave with `code` once the output is flushed, through os._exit: a finished command
    gains nothing from the interpreter's orderly shutdown, which costs a few milliseconds."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        code = code or 1
    os._exit(code)

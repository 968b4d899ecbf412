"""The store-* commands by the name run as (`bin/store-client`): usage, dispatch, exit
codes.  Results go to stdout, progress and diagnostics to stderr.  Exit codes: 0 success,
1 the operation failed (or, for `--valid` and `store-verify`, found something invalid), 2
bad usage.

No command imports trio (tests/test_house.py checks it): a command starts in tens of
milliseconds, and trio alone would cost more than that.
"""

import sys

from daemon.cli import commands
from daemon.cli.blocking import DaemonError
from daemon.cli.common import UsageError, say

USAGE = {
    "store-add": "store-add [--name NAME] PATH...  |  store-add --nar NAME < archive",
    "store-query": (
        "store-query (--info|--references|--referrers|--closure|--valid) [--json] PATH..."
    ),
    "store-dump": "store-dump PATH > archive",
    "store-log": "store-log DRV|OUTPUT",
    "store-verify": "store-verify [--check-contents] [--repair] [--json] [PATH...]",
    "store-gc": "store-gc [--print-roots|--print-live|--print-dead|--dry-run] "
    "[--max-freed SIZE] [--json] [--delete PATH...]",
    "store-optimise": "store-optimise [--json]",
    "store-build": "store-build [-j N] [-L] [--keep-going] [-K] [--check] [-o LINK]\n"
    "       [--retries N | --no-retry] TARGET...\n"
    "       (TARGET: a .drv store path, or a recipe file.py[:name])",
    "store-status": "store-status [--json]",
    "store-history": "store-history [--json] (DRV|OUTPUT | --flaky)",
}


def store_build(argv: list[str]) -> int:
    # Recipes need the store package and more: only store-build pays for importing them.
    from daemon.cli.build import main

    return main(argv)


def store_status(argv: list[str]) -> int:
    from daemon.cli.sched import store_status

    return store_status(argv)


def store_history(argv: list[str]) -> int:
    from daemon.cli.sched import store_history

    return store_history(argv)


COMMANDS = {
    "store-build": store_build,
    "store-add": commands.store_add,
    "store-query": commands.store_query,
    "store-dump": commands.store_dump,
    "store-log": commands.store_log,
    "store-verify": commands.store_verify,
    "store-gc": commands.store_gc,
    "store-optimise": commands.store_optimise,
    "store-status": store_status,
    "store-history": store_history,
}


def run(name: str) -> int:
    argv = sys.argv[1:]
    if "--help" in argv or "-h" in argv:
        sys.stdout.write(f"usage: {USAGE[name]}\n       [--state-dir DIR] [--socket PATH]\n")
        return 0
    try:
        return COMMANDS[name](argv)
    except UsageError as e:
        say(f"{name}: {e}\nusage: {USAGE[name]}")
        return 2
    except DaemonError as e:
        say(f"error: {e.message}")
        return 1
    except (OSError, ConnectionError) as e:
        say(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        return 130

"""The store-* commands run as a user runs them: a process of their own, dispatched by
`daemon.cli.main.run` (usage errors, exit codes and messages as the command gives them),
talking to a real daemon's socket.

`store-query`, `store-why-depends`, `store-export` and `store-import` are dispatched
from their own modules; the rows are added to `main.COMMANDS` only where the table does
not hold them yet.
"""

import subprocess
import sys
from typing import IO, Any

ROWS = {
    "store-query": ("daemon.cli.query", "QUERY", "store_query"),
    "store-why-depends": ("daemon.cli.whydepends", "WHY_DEPENDS", "store_why_depends"),
    "store-export": ("daemon.cli.transfer", "EXPORT", "store_export"),
    "store-import": ("daemon.cli.transfer", "IMPORT", "store_import"),
}
RUNNER = f"""
import sys
from daemon.cli import main
rows = {ROWS!r}
name = sys.argv[1]
if main.COMMANDS.get(name, (None,))[0] != rows[name][0]:
    main.COMMANDS[name] = rows[name]
code = main.run(name, sys.argv[2:])
sys.stdout.flush()
sys.exit(code)
"""


def weft(
    name: str,
    socket: str,
    *args: str,
    stdin: IO[bytes] | None = None,
    stdout: IO[bytes] | None = None,
    cwd: str | None = None,
) -> subprocess.CompletedProcess[Any]:
    """Run command `name` against the daemon on `socket`; text output unless `stdout`
    (a binary file) takes it."""
    return subprocess.run(
        [sys.executable, "-c", RUNNER, name, "--socket", socket, *args],
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        stdout=stdout if stdout is not None else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=stdout is None,
        cwd=cwd,
        timeout=60,
    )

"""`python -m cmdserver SOCKET [--idle SECONDS]`: the user's command server on SOCKET,
started by the client (`client.c`) when it finds none, in a session of its own.

It imports what the commands import before their first request (store-build's evaluator
included), claims the socket (another server may have won it: this one then leaves), and
serves until idle.
"""

import argparse
import gc
import importlib

from cmdserver.listen import Listener
from cmdserver.serve import IDLE_EXIT, Server
from cmdserver.wire import DIRECT_COMMANDS
from daemon.cli.main import COMMANDS

# What the commands it runs import before their first request: every module of these is
# loaded once here, and shared (copy-on-write) by every command's fork: store-build's
# evaluator, and each served command's own module.
PRELOAD = (
    "daemon.cli.progress",
    "daemon.cli.recipestore",
    "store.recipe",
    "store.recipebusybox",
    "runpy",
    *sorted({module for name, (module, _, _) in COMMANDS.items() if name not in DIRECT_COMMANDS}),
)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m cmdserver")
    parser.add_argument("socket")
    parser.add_argument("--idle", type=float, default=IDLE_EXIT, help="seconds unused to leave")
    args = parser.parse_args()
    for module in PRELOAD:
        importlib.import_module(module)
    # What is loaded now is shared by every command's fork; out of the collector's sight,
    # it stays shared: a collection in a command would otherwise touch (and so copy)
    # every page of it.
    gc.freeze()
    listener = Listener.claim(args.socket)
    if listener is not None:
        Server(listener, args.idle).serve()


main()

"""A one-machine remote-execution farm for weft: a private PostgreSQL cluster, BuildGrid's
`bgd` on a Unix socket, and N `store-worker`s, for tests and for trying remote builds.

    contrib/remote/farm start DIR [--workers N] [--store-dir PATH] [--instance NAME]
                                  [--property-key KEY]... [--bot-timeout S] [--foreground]
    contrib/remote/farm stop DIR
    contrib/remote/farm workers DIR (--add N | --kill I | --stop I)
    contrib/remote/farm engine DIR (--stop | --start)

`start` returns once the engine answers GetCapabilities and prints its endpoint
(`unix://DIR/bgd.sock`, or a shorter socket path when DIR is long), leaving the farm running
under its keeper (farmkeeper.py); with `--foreground` the command is the keeper itself and
runs until stopped. What runs is recorded in DIR/farm.json; `stop` stops all of it (workers,
bgd, PostgreSQL) and waits. `--store-dir` is the store dir of the weft daemons the workers
serve (`<state dir>/store`): each worker's own state dir is mounted there in its own
namespace. The engine is the venv install.sh makes (.venv-bgd). Several machines: see
docs/remote.md.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import farmkeeper
import farmprocs
import farmstate
from farmstate import DEFAULT_BOT_TIMEOUT, Farm

# How long a request to the keeper (adding workers, restarting bgd) may take.
REQUEST_TIMEOUT = 120.0
# How long the keeper may take to stop everything (each process has its own grace period).
STOP_TIMEOUT = 60.0


@contextlib.contextmanager
def locked(dir: Path) -> Iterator[None]:
    """One farm command at a time on a DIR."""
    dir.mkdir(parents=True, exist_ok=True)
    with open(dir / "farm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _running(farm: Farm) -> bool:
    procs = [p for p in (farm.keeper, farm.bgd, *farm.workers.values()) if p is not None]
    pid_file = Path(farm.pg_home) / "data" / "postmaster.pid"
    return any(farmprocs.alive(p) for p in procs) or pid_file.exists()


def _prepare(args: argparse.Namespace, dir: Path) -> Farm:
    farmstate.engine_version()
    earlier = Farm.load(dir)
    if earlier is not None:
        if _running(earlier):
            raise SystemExit(f"farm: already running in {dir} (farm stop {dir} first)")
        earlier.state_file.unlink()
    socket_dir, pg_home, pg_private = farmstate.place(dir)
    farm = Farm(
        dir=dir,
        endpoint=f"unix://{socket_dir}/bgd.sock",
        socket_dir=socket_dir,
        pg_home=pg_home,
        pg_private=pg_private,
        instance=args.instance,
        store_dir=str(Path(args.store_dir).resolve()) if args.store_dir else None,
        bot_timeout=args.bot_timeout,
        property_keys=args.property_key,
    )
    farm.keeper = farmprocs.this_process(str(dir / "farm.log"))
    farm.save()
    return farm


def keep(args: argparse.Namespace) -> None:
    """`start --foreground`: start the farm, print its endpoint, keep it until SIGTERM."""
    dir = Path(args.dir).resolve()
    farmkeeper.become_subreaper()
    with locked(dir):
        farm = _prepare(args, dir)
        farmkeeper.start_farm(farm, args.workers)
    print(farm.endpoint, flush=True)
    # Whoever started the keeper may stop reading its output once it has the endpoint.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    farmkeeper.serve(farm)


def start(args: argparse.Namespace) -> None:
    """Start a keeper in the background and relay its endpoint (or why it failed)."""
    if args.foreground:
        keep(args)
        return
    dir = Path(args.dir).resolve()
    dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--foreground"]
    log = dir / "farm.log"
    with open(log, "ab") as errors:
        keeper = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errors,
            start_new_session=True,
        )
    assert keeper.stdout is not None
    endpoint = keeper.stdout.readline().decode().strip()
    if not endpoint:
        keeper.wait()
        raise SystemExit(farmprocs.log_tail(str(log)) or "farm: the keeper failed to start")
    print(endpoint, flush=True)


def stop(args: argparse.Namespace) -> None:
    dir = Path(args.dir).resolve()
    with locked(dir):
        farm = Farm.load(dir)
        if farm is None:
            return
        keeper = farm.keeper
        if keeper is not None and farmprocs.alive(keeper):
            os.kill(keeper.pid, signal.SIGTERM)
            farmprocs.wait_gone([keeper], STOP_TIMEOUT)
        # A keeper that was killed (or hangs) leaves its processes: stop them from here.
        farm = Farm.load(dir)
        if farm is not None:
            if keeper is not None and farmprocs.alive(keeper):
                farmprocs.kill(keeper)
            farmkeeper.stop_farm(farm)


def _request(dir: Path, op: str, arg: int) -> None:
    """Have the keeper carry out `op` and wait for it to be done."""
    farm = Farm.load(dir)
    if farm is None or farm.keeper is None or not farmprocs.alive(farm.keeper):
        raise SystemExit(f"farm: nothing runs in {dir}")
    requests = dir / "requests"
    requests.mkdir(exist_ok=True)
    name = uuid.uuid4().hex
    staged = requests / f"{name}.tmp"
    staged.write_text(json.dumps({"op": op, "arg": arg}))
    staged.replace(requests / f"{name}.json")
    done = requests / f"{name}.done"
    deadline = time.monotonic() + REQUEST_TIMEOUT
    while not done.exists():
        if not farmprocs.alive(farm.keeper) or time.monotonic() > deadline:
            raise SystemExit(f"farm: the keeper did not carry out {op}")
        time.sleep(farmprocs.POLL_SECONDS)
    outcome = json.loads(done.read_text())
    done.unlink()
    if not outcome["ok"]:
        raise SystemExit(outcome["error"])


def workers(args: argparse.Namespace) -> None:
    dir = Path(args.dir).resolve()
    with locked(dir):
        if args.add is not None:
            _request(dir, "add-workers", args.add)
        elif args.kill is not None:
            _request(dir, "kill-worker", args.kill)
        else:
            _request(dir, "stop-worker", args.stop)


def engine(args: argparse.Namespace) -> None:
    dir = Path(args.dir).resolve()
    with locked(dir):
        _request(dir, "stop-engine" if args.stop else "start-engine", 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farm", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("start", help="start a farm in DIR and print its endpoint")
    p.add_argument("dir")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--store-dir", help="the store dir of the daemons the workers serve")
    p.add_argument("--instance", default="")
    p.add_argument("--property-key", action="append", default=[], help="an extra platform key")
    p.add_argument("--bot-timeout", type=int, default=DEFAULT_BOT_TIMEOUT)
    p.add_argument("--foreground", action="store_true", help="be the keeper, until stopped")
    p.set_defaults(run=start)
    p = commands.add_parser("stop", help="stop everything the farm in DIR started")
    p.add_argument("dir")
    p.set_defaults(run=stop)
    p = commands.add_parser("workers", help="add, stop or kill workers")
    p.add_argument("dir")
    one = p.add_mutually_exclusive_group(required=True)
    one.add_argument("--add", type=int, metavar="N")
    one.add_argument("--kill", type=int, metavar="I", help="SIGKILL worker I, as a crash")
    one.add_argument("--stop", type=int, metavar="I")
    p.set_defaults(run=workers)
    p = commands.add_parser("engine", help="stop or start bgd alone")
    p.add_argument("dir")
    one = p.add_mutually_exclusive_group(required=True)
    one.add_argument("--stop", action="store_true")
    one.add_argument("--start", action="store_true")
    p.set_defaults(run=engine)
    return parser


def main() -> None:
    args = _parser().parse_args()
    args.run(args)


if __name__ == "__main__":
    sys.path.insert(0, str(farmstate.ROOT))
    main()

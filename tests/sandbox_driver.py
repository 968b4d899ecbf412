"""Runs builders through a real spawner, as the daemon does, in a process of its own.

The builder is adopted by the spawner's parent (a subreaper), so this runs in a
separate process (a child subreaper, as the daemon is), with the process monitor reaping
every child.

    python -m tests.sandbox_driver STATE_DIR HOST_UID SCRIPT [--network] [--timeout S]
        [--kill-spawner-after S] [--builder PATH] [--repeat N] [--cancel-after S]
        [--kill-spare] [--input PATH] [--env-bytes N] [--spawner-dies-before-exec]

prints one JSON object: exit code, log, and what was found on the host afterwards.
"""

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import trio

from daemon.proc.processes import Process, ProcessMonitor
from daemon.proc.spawner import (
    SpawnerDied,
    SpawnError,
    SpawnerService,
    start_spawner_process,
)
from daemon.wire.spawner import SpawnRequest
from spawner.spares import SPARE
from store.store import Store

# Parents looked through for the driver among a process's: a builder's descendants are a
# few levels below it (spare, builder, a shell, its children).
MAX_DEPTH = 64


def busybox_tree(where: Path) -> Path:
    """Debian's static busybox as a directory: bin/busybox and a link per applet."""
    bin_dir = where / "busybox" / "bin"
    bin_dir.mkdir(parents=True)
    shutil.copy2("/bin/busybox", bin_dir / "busybox")
    for applet in os.popen("/bin/busybox --list").read().split():
        if applet != "busybox":
            (bin_dir / applet).symlink_to("busybox")
    return where / "busybox"


def _cmdline(pid: int | str) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def _is_spare(pid: int | str) -> bool:
    return _cmdline(pid).split(b"\0")[0] == SPARE.encode()


def sandboxed_processes(uid: int) -> list[int]:
    """Processes of `uid` living in another pid namespace than ours, below this process
    (the subreaper that adopts what a builder leaves): a builder's.  Other test runs'
    builders may run under the same uid at the same time; they are not below us.  A spare
    (still the spare program: it has not exec'd) waits for the next build, in namespaces
    of its own; it is nothing a builder left."""
    ours = os.readlink("/proc/self/ns/pid")
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if (
                    os.stat(f"/proc/{pid}").st_uid == uid
                    and os.readlink(f"/proc/{pid}/ns/pid") != ours
                    and not _is_spare(pid)
                    and _below(int(pid), os.getpid())
                ):
                    found.append(int(pid))
            except OSError:
                continue
    return found


def _below(pid: int, ancestor: int) -> bool:
    """Whether `ancestor` is among `pid`'s parents (as this pid namespace sees them)."""
    for _ in range(MAX_DEPTH):
        if pid <= 1:
            return False
        with open(f"/proc/{pid}/status") as f:
            pid = next(int(line.split()[1]) for line in f if line.startswith("PPid:"))
        if pid == ancestor:
            return True
    return False


def spares() -> list[int]:
    """Our spares waiting: the spare program, adopted by this process (a subreaper), as
    the daemon adopts them.  (Other processes' spares are none of ours.)"""
    return children_running(os.getpid(), os.path.basename(SPARE))


def children_running(pid: int, program: str) -> list[int]:
    """The children of `pid` running `program` (its path's last part)."""
    found = []
    for child in os.listdir("/proc"):
        if child.isdigit():
            try:
                with open(f"/proc/{child}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                name = os.path.basename(_cmdline(child).split(b"\0")[0])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid and name == program.encode():
                found.append(int(child))
    return found


def held_mount_namespaces(pid: int) -> int:
    """How many mount namespaces `pid` holds open (other than its own)."""
    fd_dir = f"/proc/{pid}/fd"
    return sum(os.readlink(f"{fd_dir}/{fd}").startswith("mnt:") for fd in os.listdir(fd_dir))


def zombies() -> int:
    """Our children that died and were never reaped."""
    count = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            count += fields[0] == "Z" and int(fields[1]) == os.getpid()
    return count


def big_environment(size: int) -> dict[str, str]:
    chunk = 100_000
    return {f"BIG{i}": "x" * min(chunk, size - i * chunk) for i in range(-(-size // chunk))}


async def repeat(spawner: SpawnerService, request: SpawnRequest, work: Path, n: int) -> list[int]:
    codes = []
    for i in range(n):
        root = work / f"root-{i}"
        root.mkdir()
        r, w = os.pipe()
        builder = await spawner.spawn(SpawnRequest(**{**request.__dict__, "root": str(root)}), w)
        os.close(w)
        codes.append(await builder.wait())
        os.close(r)
    return codes


async def spawner_dies_before_exec(
    spawner: SpawnerService, request: SpawnRequest, build: Path, uid: int
) -> dict[str, object]:
    """The spawner killed after it sent the spare its request, before the spare acted on
    it (stopped meanwhile): no builder may start that nobody would know of."""
    while not (found := spares()):
        await trio.sleep(0.01)
    for pid in found:
        os.kill(pid, signal.SIGSTOP)
    r, w = os.pipe()
    died = False
    async with trio.open_nursery() as n:

        async def ask() -> None:
            nonlocal died
            try:
                await spawner.spawn(request, w)
            except SpawnerDied:
                died = True

        n.start_soon(ask)
        await trio.sleep(0.3)  # the request is in the spare's socket
        os.kill(spawner.spawner_pid, signal.SIGKILL)
    os.close(w)
    for pid in found:
        os.kill(pid, signal.SIGCONT)
    await trio.sleep(0.5)
    os.close(r)
    return {
        "spawner_died": died,
        "builder_ran": (build / "ran").exists(),
        "left_running": sandboxed_processes(uid),
    }


async def wait_or_kill(proc: Process, timeout: float, grace: float = 5.0) -> int:
    """The builder's exit code; past `timeout` it gets SIGTERM, `grace` later SIGKILL (the
    daemon does this in `daemon/build/watch.py`; the driver has no daemon).

    The builder is pid 1 of its pid namespace: when it dies the kernel kills everything
    else in the namespace, so this takes the whole process tree, daemonised grandchildren
    included.  A cancelled wait kills it too.
    """
    try:
        with trio.move_on_after(timeout):
            return await proc.wait()
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            return await proc.wait()
        proc.kill()
        return await proc.wait()
    except trio.Cancelled:
        proc.kill()
        raise


async def main(args: argparse.Namespace) -> dict[str, object]:
    monitor = ProcessMonitor()
    monitor.become_subreaper()
    state = Path(args.state)
    store = Store.open(state)
    work = Path(tempfile.mkdtemp(dir=state))
    busybox = store.add_path(busybox_tree(work), name="busybox").path
    extra = [store.add_path(args.input, name="input").path] if args.input else []
    root = work / "root"
    root.mkdir()
    build = work / "build"
    build.mkdir()
    os.chown(build, args.uid, args.uid)
    proc, sock = start_spawner_process(monitor)
    spawner = SpawnerService(monitor, proc, sock)
    result: dict[str, object] = {"busybox": busybox, "spawner_restarts": 0}
    async with trio.open_nursery() as n:
        await n.start(monitor.run)
        await n.start(spawner.run)
        request = SpawnRequest(
            builder=args.builder or f"{busybox}/bin/busybox",
            args=["sh", "-c", args.script],
            root=str(root),
            build_dir=str(build),
            store_dir=store.store_dir,
            host_uid=args.uid,
            host_gid=args.uid,
            inputs=[busybox, *extra],
            env={
                "PATH": f"{busybox}/bin",
                "HOME": "/homeless-shelter",
                "out": "/build/out",
                "STATE": str(state),
                "STORE_OUT": f"{store.store_dir}/weft-test-output",
                "BB": busybox,
                **({"INPUT": extra[0]} if extra else {}),
                # Variables of 100,000 bytes each, `--env-bytes` in all (over MAX_ARG_STRLEN
                # apart, whole, as a build script of that size is).
                **big_environment(args.env_bytes),
            },
            network=args.network,
        )
        if args.repeat > 1:
            result["codes"] = await repeat(spawner, request, work, args.repeat)
            await trio.sleep(0.3)
            result["zombies"] = zombies()
            result["held_mount_namespaces"] = held_mount_namespaces(spawner.spawner_pid)
            await spawner.aclose()
            n.cancel_scope.cancel()
            return result
        if args.spawner_dies_before_exec:
            result.update(await spawner_dies_before_exec(spawner, request, build, args.uid))
            n.cancel_scope.cancel()
            return result
        if args.kill_spare:
            # Its first spare is made as the spawner starts.
            while not (found := spares()):
                await trio.sleep(0.01)
            for pid in found:
                os.kill(pid, signal.SIGKILL)
            result["spares_killed"] = len(found)
            await trio.sleep(0.1)
        r, w = os.pipe()
        t = time.monotonic()
        if args.cancel_after is not None:
            # The requester gives up before the reply: the builder must not run on.
            with trio.move_on_after(args.cancel_after) as scope:
                await spawner.spawn(request, w)
            os.close(w)
            os.close(r)
            result["cancelled"] = scope.cancelled_caught
            await trio.sleep(0.5)
            result["left_running"] = sandboxed_processes(args.uid)
            await spawner.aclose()
            n.cancel_scope.cancel()
            return result
        try:
            builder = await spawner.spawn(request, w)
        except SpawnError as e:
            failure = e.failure
            result["setup_error"] = {
                "step": failure.step,
                "errno": failure.errno,
                "path": failure.path,
                "message": failure.message,
            }
            n.cancel_scope.cancel()
            return result
        finally:
            os.close(w)
        if args.kill_spawner_after is not None:
            await trio.sleep(args.kill_spawner_after)
            os.kill(spawner.spawner_pid, signal.SIGKILL)
            while spawner.restarts == 0:
                await trio.sleep(0.01)
            result["spawner_restarts"] = spawner.restarts
        log = bytearray()

        async def read_log() -> None:
            while chunk := await trio.to_thread.run_sync(os.read, r, 65536):
                log.extend(chunk)

        n.start_soon(read_log)
        result["code"] = await wait_or_kill(builder, args.timeout, grace=0.5)
        result["elapsed"] = time.monotonic() - t
        await trio.sleep(0.3)
        result["left_running"] = sandboxed_processes(args.uid)
        # Those of builders; the next spare, made already, has one too.
        result["pastas"] = [
            pid
            for pid in children_running(spawner.spawner_pid, "pasta")
            if not _is_spare(_cmdline(pid).split(b"\0")[-2].decode())
        ]
        if args.kill_spawner_after is not None:
            # The replacement spawner serves the next build.
            root2 = work / "root2"
            root2.mkdir()
            again = SpawnRequest(
                **{
                    **request.__dict__,
                    "root": str(root2),
                    "args": ["sh", "-c", "echo second build ok"],
                }
            )
            r2, w2 = os.pipe()
            second = await spawner.spawn(again, w2)
            os.close(w2)
            result["second_code"] = await second.wait()
            result["second_log"] = os.read(r2, 65536).decode()
            os.close(r2)
        await trio.sleep(0.1)
        result["log"] = log.decode(errors="replace")
        result["outputs"] = sorted(os.listdir(root / store.store_dir.lstrip("/")))
        await spawner.aclose()
        n.cancel_scope.cancel()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("state")
    parser.add_argument("uid", type=int)
    parser.add_argument("script")
    parser.add_argument("--network", action="store_true")
    parser.add_argument("--timeout", type=float, default=30)
    parser.add_argument("--kill-spawner-after", type=float)
    parser.add_argument("--builder")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--cancel-after", type=float)
    parser.add_argument("--kill-spare", action="store_true")
    parser.add_argument("--input")
    parser.add_argument("--env-bytes", type=int, default=0)
    parser.add_argument("--spawner-dies-before-exec", action="store_true")
    print(json.dumps(trio.run(main, parser.parse_args())))
    sys.stdout.flush()

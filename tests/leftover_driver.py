"""Leaves a builder running in a daemon's build slot, as a daemon killed with kill -9 leaves
one: a real builder, in its sandbox, made by a real spawner, with the slot's build dir,
root and host uid; then exits without waiting for it, so it runs on as pid 1's orphan.

    python -m tests.leftover_driver SLOT_DIR STORE_DIR HOST_UID BUSYBOX FREEZER SCRIPT

prints the builder's pid.  FREEZER: the directory its sandbox's cgroup is made in, as the
daemon's requests name it, or "" for none.  A process of its own: the builder's reaper
must be none of the test's (pid 1 adopts it, as it adopts a killed daemon's builders),
and the process monitor here reaps every child, which a test process running the daemon
with `subprocess` cannot allow.
"""

import os
import sys
from pathlib import Path

import trio

from daemon.proc.processes import ProcessMonitor
from daemon.proc.spawner import SpawnerService, start_spawner_process
from daemon.wire.spawner import SpawnRequest


async def main(
    slot: Path, store_dir: str, uid: int, busybox: str, freezer: str, script: str
) -> int:
    monitor = ProcessMonitor()
    proc, sock = start_spawner_process(monitor)
    spawner = SpawnerService(monitor, proc, sock)
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        await nursery.start(spawner.run)
        request = SpawnRequest(
            builder=f"{busybox}/bin/busybox",
            args=["sh", "-c", script],
            env={"PATH": f"{busybox}/bin"},
            root=str(slot / "root"),
            build_dir=str(slot / "build"),
            store_dir=store_dir,
            host_uid=uid,
            host_gid=uid,
            inputs=[busybox],
            freezer=freezer,
        )
        read_end, write_end = os.pipe()
        try:
            builder = await spawner.spawn(request, write_end)
        finally:
            os.close(write_end)
            os.close(read_end)
        await spawner.aclose()
        nursery.cancel_scope.cancel()
    return builder.pid


if __name__ == "__main__":
    slot_dir, store, host_uid, bb, cgroups, code = sys.argv[1:]
    print(trio.run(main, Path(slot_dir), store, int(host_uid), bb, cgroups, code), flush=True)

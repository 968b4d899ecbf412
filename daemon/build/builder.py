"""The build room's front: what the daemon's operations call to build.

`Builder` gets the services it uses from the composition root (`daemon/compose.py`) and
makes the room's own parts: the derivation cache, the build slots, the stored logs, the
builds shared between requests.  The work is done in:

- `graph.py`: one request's walk of its graph (`GraphRun`);
- `shared.py`: a build several requests need, run once, attempt after attempt;
- `attempt.py`: one attempt in a build slot (`slots.py`), its builder watched
  (`watch.py`), its log kept (`logs.py`), its outputs registered (`outputs.py`), its
  snapshots restored and captured (`stops.py`, `snapshots.py`);
- `rebuild.py`: `--check` and repair, building valid derivations again;
- `daemon/remote/`: builds sent to a REAPI engine instead, by the remote policy.

When a build may start, and whether a failed one is tried again, is the scheduler's and
the retry policy's business (`daemon/sched/`, docs/scheduling.md).
"""

import dataclasses
import os
from collections.abc import Awaitable, Callable

import trio

from daemon.build import rebuild
from daemon.build.derivations import Derivations
from daemon.build.events import Listener
from daemon.build.graph import GraphRun
from daemon.build.logs import BuildLogs, LiveLogs
from daemon.build.request import BuildOptions, Result
from daemon.build.room import Room
from daemon.build.shared import Jobs
from daemon.build.slots import BuildSlots
from daemon.build.snapshots import SnapshotService
from daemon.proc.locks import LockService
from daemon.proc.spawner import SpawnerService
from daemon.proc.wakeups import QuickWakeups
from daemon.proc.workers import Workers
from daemon.remote.executor import RemoteExecutor
from daemon.sched.loadsignals import LoadMonitor
from daemon.sched.pauser import Pauser
from daemon.sched.retrying import RetryRunner
from daemon.sched.scheduler import Scheduler
from daemon.settings import Settings
from daemon.upkeep.collector import Collector
from store.history import History
from store.layout import StateDir
from store.store import Store


class Builder:
    def __init__(
        self,
        state: StateDir,
        store: Store,
        settings: Settings,
        *,
        locks: LockService,
        spawner: SpawnerService,
        scheduler: Scheduler,
        load: LoadMonitor,
        retrier: RetryRunner,
        history: History,
        pauser: Pauser,
        wakeups: QuickWakeups,
        workers: Workers,
        snapshots: SnapshotService,
        collector: Collector | None = None,
        remote: tuple[RemoteExecutor, RetryRunner] | None = None,
    ) -> None:
        """`remote`: the remote executor and the retry runner of remote builds (with
        their own scheduler), when an engine is set."""
        self.scheduler = scheduler
        self.load = load
        self.history = history
        self.pauser = pauser
        self.max_jobs = scheduler.admission.max_jobs
        builds_dir = state.root / "var" / "builds"
        slots = BuildSlots(
            builds_dir,
            store.store_dir,
            settings.build_slots,
            settings.build_uid_base,
            pauser.cgroups,
        )
        self.room = Room(
            store=store,
            settings=settings,
            locks=locks,
            spawner=spawner,
            scheduler=scheduler,
            pauser=pauser,
            wakeups=wakeups,
            workers=workers,
            collector=collector,
            snapshots=snapshots,
            derivations=Derivations(store),
            slots=slots,
            logs=BuildLogs(state.log_dir),
            live=LiveLogs(),
            cores=str(settings.cores or os.cpu_count() or 1),
            remote=remote[0] if remote is not None else None,
        )
        self.jobs = Jobs(self.room, retrier, remote[1] if remote is not None else None)

    async def build(self, roots: list[str], opts: BuildOptions, listener: Listener) -> list[Result]:
        """Build `roots` and what they need; a result for each root.  A snapshot to resume
        from seeds the build of the one root (the request names only one)."""
        if opts.resume_from is not None and len(roots) == 1:
            opts = dataclasses.replace(opts, resume_into=roots[0])
        return await GraphRun(self.room, self.jobs, roots, opts, listener).run()

    def learn(self, path: str, text: str) -> None:
        """A `.drv` just added, checked now (in the adding worker thread)."""
        self.room.derivations.learn(path, text)

    async def repair(self, drv_path: str, listener: Listener) -> str | None:
        """Build `drv_path` again and put its outputs in place of the registered ones
        (corrupt or missing).  Returns why it could not, or None."""
        return await rebuild.repair(self.room, drv_path, listener)

    async def send_log(
        self, drv_path: str, send: Callable[[bytes], Awaitable[None]], follow: bool
    ) -> int:
        """`send` the log of the derivation's build running now, what it wrote so far
        (and if `follow`, what it writes until it ends), else its stored log; returns the
        bytes sent.  FileNotFoundError if it is not building and has no stored log."""
        live = self.room.live.get(drv_path)
        if live is not None:
            return await live.stream(send, follow)
        data = await trio.to_thread.run_sync(self.room.logs.read, drv_path)
        await send(data)
        return len(data)

    def close(self) -> None:
        self.pauser.close()
        if self.room.remote is not None:
            self.room.remote.close()

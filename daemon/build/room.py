"""What every build in the daemon shares: the services the build room calls (built by the
composition root, `daemon/compose.py`) and the room's own parts, made once by `Builder`."""

from dataclasses import dataclass

from daemon.build.derivations import Derivations
from daemon.build.logs import BuildLogs, LiveLogs
from daemon.build.slots import BuildSlots
from daemon.build.snapshots import SnapshotService
from daemon.proc.locks import LockService
from daemon.proc.spawner import SpawnerService
from daemon.proc.wakeups import QuickWakeups
from daemon.proc.workers import Workers
from daemon.remote.executor import RemoteExecutor
from daemon.sched.pauser import Pauser
from daemon.sched.scheduler import Scheduler
from daemon.settings import Settings
from daemon.upkeep.collector import Collector
from store.store import Store


@dataclass(frozen=True)
class Room:
    # The services.
    store: Store
    settings: Settings
    locks: LockService
    spawner: SpawnerService
    scheduler: Scheduler
    pauser: Pauser
    wakeups: QuickWakeups
    workers: Workers
    collector: Collector | None  # None: no collection before builds
    snapshots: SnapshotService
    # The room's own.
    derivations: Derivations
    slots: BuildSlots
    logs: BuildLogs
    live: LiveLogs  # the logs of the builds running now
    cores: str  # NIX_BUILD_CORES
    # The remote engine's executor; None: remote builds off (no `remote-endpoint`).
    remote: RemoteExecutor | None = None

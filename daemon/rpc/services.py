"""The services the daemon's operations call, built once by the composition root
(`daemon/compose.py`) and handed to the server."""

from dataclasses import dataclass

from daemon.build.builder import Builder
from daemon.build.snapshots import SnapshotService
from daemon.proc.workers import Workers
from daemon.rpc.infocache import InfoCache
from daemon.runtime.service import Runtimes
from daemon.settings import Settings
from daemon.upkeep.collector import Collector
from daemon.upkeep.repair import Repairer
from store.layout import StateDir
from store.store import Store


@dataclass
class Services:
    state: StateDir
    store: Store
    settings: Settings
    collector: Collector
    workers: Workers
    # The store's path infos, kept between path-info queries (`infocache.py`).
    infos: InfoCache
    # None: a daemon that serves the store but does not build (no locker, no spawner).
    builder: Builder | None = None
    # None with no builder: nothing can rebuild what `verify --repair` finds.
    repairer: Repairer | None = None
    # None: a daemon that keeps no runtimes (store-run needs one that does).
    runtimes: Runtimes | None = None
    # None with no builder: builds leave the snapshots, and only they can be resumed.
    snapshots: SnapshotService | None = None

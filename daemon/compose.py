"""The composition root: every service the daemon's operations use, made once, here.

`daemon/main.py` starts what must exist before trio (the store, the locker and its lock
service, the spawner) and hands them to `compose`, which makes the rest and wires them
together; no other module makes a service.  A daemon without builds (tests run one in
process) makes `Services` with the store's alone.
"""

import dataclasses
import hashlib
import os

from daemon.build.builder import Builder
from daemon.build.snapshots import SnapshotService
from daemon.proc.cpus import Cpus
from daemon.proc.locks import LockService
from daemon.proc.spawner import SpawnerService
from daemon.proc.wakeups import QuickWakeups
from daemon.proc.workers import Workers
from daemon.remote.executor import RemoteExecutor
from daemon.rpc.infocache import InfoCache
from daemon.rpc.services import Services
from daemon.runtime.service import Runtimes
from daemon.sched.admission import Admission, Limits
from daemon.sched.freezer import Freezer
from daemon.sched.loadsignals import LoadMonitor, ProcReader
from daemon.sched.pauser import Pauser
from daemon.sched.retry import RetrySettings
from daemon.sched.retrying import RetryRunner
from daemon.sched.scheduler import Scheduler
from daemon.sched.sigstop import SIGNALS
from daemon.settings import Settings
from daemon.upkeep.collector import Collector
from daemon.upkeep.repair import Repairer
from store.history import History
from store.layout import StateDir
from store.store import Store

# Hex digits of the state dir's hash in the name of its builds' cgroup: 64 bits, so that
# no two state dirs of a machine share one.
STATE_TAG_LENGTH = 16


def pauser_for(state: StateDir) -> Pauser:
    """The builds' freezer cgroups, under one named after the state dir (one daemon serves
    it at a time), where the machine lets the daemon make them; else signals."""
    tag = hashlib.sha256(str(state.root).encode()).hexdigest()[:STATE_TAG_LENGTH]
    return Freezer.find(tag) or SIGNALS


def compose(
    state: StateDir,
    store: Store,
    settings: Settings,
    locks: LockService,
    spawner: SpawnerService,
    cpus: Cpus,
) -> Services:
    workers = Workers(cpus)
    collector = Collector(store, settings, workers)
    cores = os.cpu_count() or 1
    limits = Limits.from_settings(settings, cores)
    load = LoadMonitor(
        ProcReader(settings.load_proc_dir),
        settings.load_sample_interval,
        lambda sample: scheduler.on_sample(sample),
    )
    snapshots = SnapshotService(store, settings, workers)
    pauser = pauser_for(state)
    scheduler = Scheduler(Admission(limits, settings.max_jobs or cores), load, pauser)
    history = History(store.db)
    retry = RetrySettings.from_settings(settings)
    retrier = RetryRunner(scheduler, history, limits, retry, workers)
    remote = None
    if settings.remote_endpoint:
        # Remote builds wait in a scheduler of their own, `remote-max-jobs` at once: a
        # local slot is not theirs, and their load is the farm's (no limit is set, and
        # the load monitor samples only for the local one).
        unloaded = dataclasses.replace(
            limits,
            cpu=0.0,
            memory=0.0,
            io=0.0,
            load_per_core=0.0,
            min_available=0,
            pause_memory=0.0,
        )
        remote_runs = Scheduler(Admission(unloaded, settings.remote_max_jobs), load, pauser)
        remote_retrier = RetryRunner(remote_runs, history, limits, retry, workers)
        remote = (RemoteExecutor(settings), remote_retrier)
    builder = Builder(
        state,
        store,
        settings,
        locks=locks,
        spawner=spawner,
        scheduler=scheduler,
        load=load,
        retrier=retrier,
        history=history,
        pauser=pauser,
        wakeups=QuickWakeups(settings.quick_wakeups),
        workers=workers,
        snapshots=snapshots,
        collector=collector,
        remote=remote,
    )
    repairer = Repairer(store, builder)
    runtimes = Runtimes(state, store, settings, workers)
    infos = InfoCache(str(store.db.path))
    return Services(
        state, store, settings, collector, workers, infos, builder, repairer, runtimes, snapshots
    )

"""Building valid derivations again: `--check` compares what comes out with what is
registered, bit for bit; a repair (`store-verify --repair`) puts it in place of the
registered outputs, corrupt or missing.  One attempt each, no retries, under the output
locks and a scheduler slot like any build."""

import functools

from daemon.build.attempt import Attempt, Inputs
from daemon.build.closures import Closures
from daemon.build.derivations import pinned
from daemon.build.errors import BuildError
from daemon.build.events import Activity, Listener, Started
from daemon.build.job import Job
from daemon.build.outputs import Compare, Replace, output_paths
from daemon.build.request import BuildOptions, Outcome, State
from daemon.build.room import Room
from daemon.proc.locks import LockError
from store.derivation import Derivation, DerivationError, drv_name
from store.errors import StoreError
from store.pins import PinOwner


async def check(
    room: Room, path: str, drv: Derivation, inputs: Inputs, opts: BuildOptions, listener: Listener
) -> Outcome:
    """Build a valid derivation again and compare, bit for bit, with what is registered."""
    job = Job(path, listeners=[listener])
    compare = Compare(room.store)
    await listener(Started(path, Activity.CHECK))
    try:
        async with (
            room.scheduler.slot(path) as job.run,
            room.locks.exclusive_bytes(output_paths(drv), f"check:{path}"),
        ):
            await Attempt(room, job, drv, inputs, opts, compare).run()
    except BuildError as e:
        return Outcome(State.FAILED, str(e))
    if compare.differs:
        differs = ", ".join(compare.differs)
        message = f"{drv_name(path)}: output {differs} differs from the registered one"
        return Outcome(State.CHECKED, message, identical=False)
    return Outcome(State.CHECKED, identical=True)


async def repair(room: Room, drv_path: str, listener: Listener) -> str | None:
    """Build `drv_path` again and put its outputs in place of the registered ones.
    Returns why it could not, or None."""
    owner = PinOwner(f"repair of {drv_name(drv_path)}")
    store = room.store
    try:
        load = functools.partial(room.derivations.load, [drv_path])
        graph = await pinned(store, owner, [drv_path], load)
        drv = graph.drvs[drv_path]
        inputs = Inputs(graph.inputs(drv_path), Closures(store))
        outs = [o.path for o in drv.outputs.values()]
        valid = functools.partial(store.valid_paths, inputs.paths)
        present = await pinned(store, owner, [*inputs.paths, *outs], valid)
        absent = [p for p in inputs.paths if p not in present]
        if absent:
            return f"its input {absent[0]} is not valid: build it first"
        await listener(Started(drv_path, Activity.REPAIR))
        job = Job(drv_path, listeners=[listener])
        replace = Replace(store, drv_path, drv)
        async with (
            room.scheduler.slot(drv_path) as job.run,
            room.locks.exclusive_bytes(output_paths(drv), str(owner)),
        ):
            await Attempt(room, job, drv, inputs, BuildOptions(max_jobs=1), replace).run()
    except (BuildError, LockError, StoreError, DerivationError) as e:
        return str(e)
    finally:
        store.pins.release(owner)
    return None

"""Dependents start once an input's outputs are placed, while its registration commits
(`daemon/build/early.py`): the mechanism alone, without builds."""

from pathlib import Path

import trio
import trio.testing

from daemon.build.closures import Closures
from daemon.build.early import EarlyStart, placed_callback
from store.store import Store


def _chain() -> tuple[EarlyStart, dict[str, trio.Event]]:
    """`b` needs `a`."""
    finished = {"a": trio.Event(), "b": trio.Event()}
    return EarlyStart({"a": [], "b": ["a"]}, finished), finished


async def test_a_dependent_starts_once_its_input_is_placed_before_that_settles() -> None:
    early, finished = _chain()
    started = trio.Event()

    async def dependent() -> None:
        await early.inputs_placed("b")
        started.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dependent)
        await trio.testing.wait_all_tasks_blocked()
        assert not started.is_set()
        early.placed("a")
        with trio.fail_after(5):
            await started.wait()
    assert not finished["a"].is_set()


async def test_a_dependent_registers_only_once_its_input_settled() -> None:
    early, finished = _chain()
    early.placed("a")
    may_register = trio.Event()

    async def registering() -> None:
        await early.inputs_settled("b")
        may_register.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(registering)
        await trio.testing.wait_all_tasks_blocked()
        assert not may_register.is_set()
        finished["a"].set()
        with trio.fail_after(5):
            await may_register.wait()


async def test_inputs_settled_already_cost_the_loop_no_checkpoint() -> None:
    early, finished = _chain()
    finished["a"].set()
    with trio.CancelScope() as scope:
        scope.cancel()
        # A checkpoint here would raise Cancelled: on a chain, each is latency.
        await early.inputs_settled("b")
    assert not scope.cancelled_caught


async def test_the_stores_placed_call_teaches_the_closures_then_wakes_the_loop(
    store: Store, tmp_path: Path
) -> None:
    closures = Closures(store)
    out = f"{store.store_dir}/{'1' * 32}-thing"
    seen: list[list[str] | None] = []
    woken = trio.Event()

    def hook() -> None:
        seen.append(closures.known([out]))
        woken.set()

    placed = placed_callback(closures, hook)
    (tmp_path / "out").write_text("no references")

    def register() -> None:
        drv = f"{store.store_dir}/{'3' * 32}-thing.drv"
        store.add_outputs(drv, {"out": (str(tmp_path / "out"), out)}, [], placed=placed)

    await trio.to_thread.run_sync(register)
    with trio.fail_after(5):
        await woken.wait()
    assert seen == [[out]]
    assert store.valid_paths([out]) == {out}

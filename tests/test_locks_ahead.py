"""Output locks taken ahead for chains (`daemon/build/ahead.py`): what a request found
missing under them holds only for its own reservation, and only until a build of the
derivation ends."""

import trio
import trio.testing

from daemon.build.ahead import FoundMissing, Reservation, Started


def test_what_was_found_missing_holds_for_its_own_reservation_only() -> None:
    found, mine, other = FoundMissing(), Reservation(), Reservation()
    found.mark("d", mine)
    assert found.holds("d", mine)
    assert not found.holds("d", other)
    assert not found.holds("d", None)
    assert not found.holds("e", mine)


def test_the_end_of_any_build_of_the_derivation_drops_what_was_found() -> None:
    found, mine = FoundMissing(), Reservation()
    found.mark("d", mine)
    found.build_ended("d")
    assert not found.holds("d", mine)
    found.build_ended("d")  # no finding left: nothing to drop


def test_a_released_reservation_forgets_its_own_finding_not_a_later_ones() -> None:
    found, first, later = FoundMissing(), Reservation(), Reservation()
    found.mark("d", first)
    found.mark("d", later)
    found.forget("d", first)
    assert found.holds("d", later)
    found.forget("d", later)
    assert not found.holds("d", later)


async def test_locks_wait_until_every_input_has_its_builder_running() -> None:
    started = Started(["a", "b", "c"])
    go = trio.Event()

    async def ahead() -> None:
        await started.wait(["a", "b"])
        go.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ahead)
        started.set("a")
        await trio.testing.wait_all_tasks_blocked()
        assert not go.is_set()
        started.set("b")
        with trio.fail_after(5):
            await go.wait()

"""A build's progress as typed events (`daemon/build/events.py`): each says, to people,
what the daemon always said, and the wire's `log` frames carry its kind."""

from daemon.build.events import Activity, Built, Failed, LogLine, Note, Retried, Started
from daemon.build.request import State
from store.derivation import drv_name

DRV = "/var/weft/store/" + "a" * 32 + "-hello-2.12.drv"


def test_a_derivation_is_named_by_its_store_path_without_hash_or_suffix() -> None:
    assert drv_name(DRV) == "hello-2.12"
    assert drv_name("b" * 32 + "-x.drv") == "x"


def test_each_event_reads_as_the_line_a_person_sees() -> None:
    assert Note("3 derivations to build, 2 present", done=0, total=3).message == (
        "3 derivations to build, 2 present"
    )
    assert Started(DRV).message == "building hello-2.12"
    assert Started(DRV, Activity.CHECK).message == "checking hello-2.12"
    assert Started(DRV, Activity.REPAIR).message == "repairing hello-2.12"
    assert LogLine(DRV, "compiling").message == "hello-2.12> compiling"
    assert Failed(DRV, "the failure was not load-related").message == (
        "hello-2.12: not retried: the failure was not load-related"
    )


def test_built_says_which_attempt_succeeded_and_whether_it_was_flaky() -> None:
    assert Built(DRV, 1, False, 1, 3).message == "built hello-2.12"
    assert Built(DRV, 2, True, 2, 3).message == "built hello-2.12 on attempt 2 (flaky)"
    assert Built(DRV, 1, True, 3, 3).message == "built hello-2.12 (flaky)"


def test_a_retry_says_when_and_at_what_parallelism() -> None:
    drained = Retried(DRV, 2, 3, 1.5, 1, "exit code 1 under load")
    assert drained.message == (
        "retrying hello-2.12 (attempt 2 of 3) in 1.5 s, at most 1 build(s) at once: "
        "exit code 1 under load"
    )
    same = Retried(DRV, 3, 3, 0, None, "flaky before")
    assert same.message == (
        "retrying hello-2.12 (attempt 3 of 3) in 0 s, at the same parallelism: flaky before"
    )


def test_the_states_that_dependents_may_build_on() -> None:
    assert {s for s in State if s.succeeded} == {State.BUILT, State.VALID, State.CHECKED}
    assert [str(s) for s in State] == [
        "built",
        "valid",
        "checked",
        "failed",
        "dependency-failed",
        "cancelled",
    ]

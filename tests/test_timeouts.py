"""A builder over its time or silence limit gets SIGTERM, the grace to exit on its own,
and SIGKILL only after it (docs/sandbox.md): real daemon, real sandboxes, real signals."""

import time

from daemon.build.watch import KILL_GRACE
from tests.daemon_fixtures import Graph


def test_a_builder_over_its_timeout_may_exit_cleanly_within_the_grace(graph: Graph) -> None:
    trapper = graph.sh(
        "trapper",
        "trap 'echo got TERM, cleaning up; exit 3' TERM; echo started; sleep 60 & wait",
    )
    started = time.monotonic()
    (r,) = graph.build(trapper, timeout=1, retries=0)
    took = time.monotonic() - started
    assert r["status"] == "failed"
    assert "timed out after 1 s" in r["message"]
    assert "got TERM, cleaning up" in r["message"]
    assert took < 1 + KILL_GRACE
    (attempt,) = graph.client.call("history", drv=trapper.path)["attempts"]
    assert (attempt["outcome"], attempt["exit_code"]) == ("timeout", 3)


def test_a_builder_that_ignores_sigterm_is_killed_after_the_grace(graph: Graph) -> None:
    stubborn = graph.sh("stubborn", "trap 'echo ignoring TERM' TERM; while :; do sleep 0.1; done")
    started = time.monotonic()
    (r,) = graph.build(stubborn, max_silent_time=1, retries=0)
    took = time.monotonic() - started
    assert r["status"] == "failed"
    assert "was silent for 1 s" in r["message"] and "ignoring TERM" in r["message"]
    assert 1 + KILL_GRACE <= took < 1 + KILL_GRACE + 10
    (attempt,) = graph.client.call("history", drv=stubborn.path)["attempts"]
    assert (attempt["outcome"], attempt["exit_code"]) == ("silent", -9)

"""Every request argument is checked before its operation acts: over the real socket, each
numeric and switch argument gets NaN, infinities, huge integers and wrong types, and the
reply is a `bad-request` naming it, with nothing started."""

import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.cli.blocking import BlockingClient, DaemonError
from tests.daemon_fixtures import DaemonProc, Graph, start_daemon, stop_daemon

NAN, INF = math.nan, math.inf
NOT_NUMBERS = ["5", True, [1], {"a": 1}, b"5"]
NOT_SECONDS = [NAN, INF, -INF, 0, -1, 1e300, 2**63, *NOT_NUMBERS]
NOT_COUNTS = [NAN, INF, -INF, 1.5, -1, 2**63, 2**64 - 1, *NOT_NUMBERS]
NOT_SWITCHES = ["yes", 1, 0, NAN, [True]]


@pytest.fixture(scope="module")
def built(builder_daemon_module: DaemonProc) -> Iterator[tuple[DaemonProc, Graph, str]]:
    g = Graph(builder_daemon_module)
    sleeper = g.sh("sleeper", "sleep 30; echo > $out")
    yield builder_daemon_module, g, sleeper.path
    g.close()


@pytest.fixture(scope="module")
def builder_daemon_module() -> Iterator[DaemonProc]:
    d = Path(tempfile.mkdtemp(prefix="weft-args-", dir="/var/tmp"))
    daemon = start_daemon(d / "state")
    yield daemon
    stop_daemon(daemon)
    shutil.rmtree(d, ignore_errors=True)


def _refused(client: BlockingClient, op: str, key: str, **args: object) -> str:
    with pytest.raises(DaemonError) as e:
        client.call(op, **args)
    assert e.value.code == "bad-request", (op, args, e.value)
    assert repr(key) in e.value.message, (op, args, e.value.message)
    return e.value.message


@pytest.mark.parametrize(
    ("key", "bad"),
    [("timeout", v) for v in NOT_SECONDS]
    + [("max_silent_time", v) for v in NOT_SECONDS]
    + [("max_log_size", v) for v in [*NOT_COUNTS, 0, 1 << 40]]
    + [("max_jobs", v) for v in [*NOT_COUNTS, 0, 100_000]]
    + [("retries", v) for v in [*NOT_COUNTS, 11]]
    + [(k, v) for k in ("keep_going", "check", "keep_failed") for v in NOT_SWITCHES],
)
def test_a_bad_build_option_is_refused_before_any_builder_starts(
    built: tuple[DaemonProc, Graph, str], key: str, bad: object
) -> None:
    _, graph, drv = built
    _refused(graph.client, "build", key, drvs=[drv], **{key: bad})
    status = graph.client.call("status")
    assert status["running"] == [] and status["queued"] == 0
    assert graph.client.call("history", drv=drv)["attempts"] == []


def test_the_largest_allowed_limits_are_taken(built: tuple[DaemonProc, Graph, str]) -> None:
    _, graph, _ = built
    quick = graph.sh("quick", "echo > $out")
    (r,) = graph.build(
        quick,
        timeout=365 * 24 * 3600,
        max_silent_time=1e7,
        max_log_size=1 << 30,
        retries=10,
        max_jobs=1024,
        keep_going=False,
    )
    assert r["status"] == "built"


@pytest.mark.parametrize(
    ("op", "key", "args"),
    [
        ("gc", "max_freed", {"mode": "dry-run", "max_freed": v})
        for v in [NAN, INF, -1, 1.0, 2**63, "5", True]
    ]
    + [("verify", k, {k: v}) for k in ("check_contents", "repair") for v in NOT_SWITCHES]
    + [("history", "flaky", {"flaky": v}) for v in NOT_SWITCHES]
    + [("history", "drv", {"drv": v}) for v in [NAN, 5, "", None]]
    + [("forget-history", "drv", {"drv": v}) for v in [INF, 5, ""]]
    + [("path-info", "path", {"path": v}) for v in [NAN, 5, [], ""]]
    + [("is-valid", "paths", {"paths": v}) for v in [NAN, "x", [1], None]]
    + [("add-text", "text", {"name": "t", "text": v}) for v in [NAN, 5, None]]
    + [("add-from-path", "path", {"path": v}) for v in [INF, 5, ""]],
)
def test_every_operations_bad_arguments_are_refused_by_name(
    built: tuple[DaemonProc, Graph, str], op: str, key: str, args: dict[str, object]
) -> None:
    _, graph, _ = built
    _refused(graph.client, op, key, **args)
    assert graph.client.call("is-valid", paths=[]) == []

"""Remote builds when the engine is not there, or not asked: the remote policy as a real
daemon applies it (no engine, PostgreSQL or worker needed; the builds through a farm are
in test_remote_builds_farm.py)."""

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from bench.daemons import DaemonProc, start_daemon, stop_daemon
from daemon.build.variables import build_environment
from daemon.cli.blocking import BlockingClient, DaemonError
from store.derivation import Derivation, Output
from store.environment.delta import Delta
from store.recipe import source
from tests.daemon_fixtures import Graph


def _daemon(base: str, settings: str) -> tuple[DaemonProc, Path]:
    # Not under /tmp for the state dir: the sandbox mounts its own /tmp over it.
    d = Path(tempfile.mkdtemp(prefix="weft-remote-", dir=base))
    (d / "state").mkdir()
    (d / "state" / "weft.toml").write_text(settings.format(dir=d))
    return start_daemon(d / "state"), d


@pytest.fixture
def unreachable() -> Iterator[Graph]:
    """A daemon whose engine's socket does not exist; remote policy `all`."""
    daemon, d = _daemon(
        "/var/tmp", 'remote-endpoint = "unix://{dir}/bgd.sock"\nremote-policy = "all"\n'
    )
    g = Graph(daemon)
    yield g
    g.close()
    stop_daemon(daemon)
    shutil.rmtree(d, ignore_errors=True)


def _notes(g: Graph) -> list[str]:
    return [m for m, _ in g.logs]


def test_an_unreachable_engine_builds_locally_with_a_warning(unreachable: Graph) -> None:
    drv = unreachable.sh("fallback", "echo built here > $out")
    [r] = unreachable.build(drv, max_jobs=2)
    assert r["status"] == "built", r
    assert Path(r["outputs"]["out"]).read_text() == "built here\n"
    warnings = [n for n in _notes(unreachable) if "warning: the remote engine is unreachable" in n]
    assert len(warnings) == 1 and "building locally" in warnings[0], _notes(unreachable)


def test_a_derivation_preferring_local_builds_never_asks_the_engine(unreachable: Graph) -> None:
    drv = unreachable.sh("stays", "echo local > $out", env={"preferLocalBuild": "1"})
    [r] = unreachable.build(drv)
    assert r["status"] == "built", r
    notes = _notes(unreachable)
    assert any("preferLocalBuild" in n for n in notes), notes
    assert not any("unreachable" in n for n in notes), notes


def test_a_request_saying_remote_none_builds_locally_without_a_word(unreachable: Graph) -> None:
    drv = unreachable.sh("no-remote", "echo local > $out")
    [r] = unreachable.build(drv, remote="none")
    assert r["status"] == "built", r
    assert not any("remote engine" in n for n in _notes(unreachable)), _notes(unreachable)


def test_a_request_naming_an_unknown_remote_policy_is_refused(unreachable: Graph) -> None:
    drv = unreachable.sh("refused", "echo x > $out")
    with pytest.raises(DaemonError, match="'remote' must be one of all, overflow, none"):
        unreachable.build(drv, remote="sometimes")


def test_an_unreachable_engine_fails_the_build_when_local_fallback_is_off() -> None:
    daemon, d = _daemon(
        "/var/tmp",
        'remote-endpoint = "unix://{dir}/bgd.sock"\nremote-policy = "all"\n'
        "remote-fallback = false\n",
    )
    g = Graph(daemon)
    try:
        drv = g.sh("no-fallback", "echo x > $out")
        [r] = g.build(drv)
        assert r["status"] == "failed", r
        assert "remote-fallback is off" in r["message"]
        assert not Path(r["outputs"]["out"]).exists()
    finally:
        g.close()
        stop_daemon(daemon)
        shutil.rmtree(d, ignore_errors=True)


def test_overflow_builds_locally_while_a_local_slot_is_free() -> None:
    # An endpoint that would fail: a build that asked it would say so.
    daemon, d = _daemon("/var/tmp", 'remote-endpoint = "unix://{dir}/bgd.sock"\n')
    g = Graph(daemon)
    try:
        [r] = g.build(g.sh("overflow", "echo x > $out"))
        assert r["status"] == "built", r
        assert not any("remote engine" in n for n in _notes(g)), _notes(g)
    finally:
        g.close()
        stop_daemon(daemon)
        shutil.rmtree(d, ignore_errors=True)


def test_overflow_asks_the_engine_once_every_local_slot_is_taken() -> None:
    daemon, d = _daemon("/var/tmp", 'remote-endpoint = "unix://{dir}/bgd.sock"\nmax-jobs = 1\n')
    g = Graph(daemon)
    try:
        # Running still when the second request comes, on a busy machine too.
        slow = g.sh("slow", "sleep 5; echo slow > $out")
        late = g.sh("late", "echo late > $out")
        results: list[dict] = []
        first = threading.Thread(target=lambda: results.extend(g.build(slow)))
        first.start()
        with BlockingClient(daemon.socket) as other:
            deadline = time.monotonic() + 10
            while not other.call("status")["running"]:
                assert time.monotonic() < deadline, "the slow build never started"
                time.sleep(0.02)
            notes: list[str] = []
            other.on_log = lambda e: notes.append(e.message)
            [r] = other.call("build", drvs=[late.path])
        first.join()
        assert r["status"] == "built" and results[0]["status"] == "built"
        assert any("remote engine is unreachable" in n for n in notes), notes
        assert not any("unreachable" in m for m, _ in g.logs), g.logs
    finally:
        g.close()
        stop_daemon(daemon)
        shutil.rmtree(d, ignore_errors=True)


def test_a_builders_environment_is_the_defaults_then_the_derivations_then_its_delta() -> None:
    # One function for local and remote builds (daemon/build/variables.py): a remote
    # Command carries what a local builder gets.
    drv = Derivation(
        name="env",
        builder="/store/bb/bin/sh",
        outputs={"out": Output("/store/abc-env")},
        env={"PATH": "/store/bb/bin", "HOME": "/mine", "X": "1"},
        env_delta=Delta(scalars={"Y": "${@X@}2", "HOME": None}),
    )
    env = build_environment(drv, "/store", "3")
    assert env["Y"] == "12" and "HOME" not in env and env["PATH"] == "/store/bb/bin"
    assert env["NIX_BUILD_CORES"] == "3" and env["NIX_STORE"] == "/store"
    assert env["TMPDIR"] == env["PWD"] == "/build"


def test_a_source_holding_a_name_that_is_not_utf8_is_built_locally_and_says_why(
    unreachable: Graph,
) -> None:
    tree = Path(tempfile.mkdtemp(prefix="weft-latin1-"))
    try:
        (tree / "ok").write_text("fine\n")
        with open(os.path.join(os.fsencode(tree), b"caf\xe9"), "wb") as f:
            f.write(b"latin-1\n")
        src = source(tree, "latin1")
        drv = unreachable.sh("latin1", f"ls {src} > $out", env={"SRC": src})
        [r] = unreachable.build(drv)
        assert r["status"] == "built", r
        notes = _notes(unreachable)
        why = [n for n in notes if "built locally:" in n]
        assert len(why) == 1 and "not UTF-8" in why[0], notes
        assert not any("unreachable" in n for n in notes), notes
    finally:
        shutil.rmtree(tree)


def test_a_fixed_output_already_in_the_store_is_not_sent_to_the_engine(
    unreachable: Graph, tmp_path: Path
) -> None:
    # Found under the locks, before the engine is asked: the remote attempt ends as a
    # local one does, the outputs there.
    payload = tmp_path / "payload"
    payload.write_text("downloaded once\n")
    present = unreachable.client.call("add-from-path", path=str(payload), name="payload")
    fetch = unreachable.sh("fetch", "exit 1", output_hash=present["nar_hash"])
    [r] = unreachable.build(fetch)
    assert r["status"] == "built", r
    assert Path(fetch.out).read_text() == "downloaded once\n"
    notes = _notes(unreachable)
    assert any("content already in the store" in n for n in notes), notes
    assert not any("unreachable" in n for n in notes), notes


def test_an_operation_given_up_before_the_engine_named_it_is_cancelled_once_named() -> None:
    # Else the stream's thread, and the build on the farm, would run on to their end.
    from daemon.remote.attempt import _Operation
    from remote.execution import Execution, Stage

    cancelled: list[str] = []

    class Engine:
        def cancel(self, name: str) -> None:
            cancelled.append(name)

    operation = _Operation(cast(Execution, Engine()), "/store/x.drv")
    assert operation.abandon() == ""
    operation.staged(Stage.QUEUED, "op-1")
    operation.staged(Stage.EXECUTING, "op-1")
    assert cancelled == ["op-1"]
    named = _Operation(cast(Execution, Engine()), "/store/y.drv")
    named.staged(Stage.QUEUED, "op-2")
    assert named.abandon() == "op-2"  # the caller cancels it
    named.staged(Stage.EXECUTING, "op-2")
    assert cancelled == ["op-1"]

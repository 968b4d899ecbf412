"""Snapshots of failed and running builds, and builds resumed from them, through a real
daemon and real sandboxes (docs/snapshots.md): what a `data` and a `full` snapshot keep,
the keep-failed hazards, retries that resume, commits of running builds, the collector,
and the rules a resume meets."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.cli.blocking import BlockingClient, DaemonError
from daemon.settings import Settings
from store.durabledirs import Scope
from store.layout import ConfigError
from store.recipe import Derivation, source
from tests.daemon_fixtures import DaemonProc, Graph, run_as_nobody, start_daemon, stop_daemon

DURABLE = {"durable": "/build/durable"}
# A build that fails the first time, leaving durable/n and scratch/x, and succeeds once it
# finds durable/n, writing into it: what a resume restored is in its output.
SEEDED = (
    "if [ -e durable/n ]; then test ! -e scratch/x || echo saw-scratch >> durable/n; "
    "echo more >> durable/n; cat durable/n > $out; exit 0; fi; "
    "mkdir -p durable scratch; echo n > durable/n; echo x > scratch/x; exit 1"
)


def wait_for(check: Callable[[], object], timeout: float = 30.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError("condition not met")


@pytest.fixture
def root() -> Iterator[Path]:
    # Not under /tmp (the sandbox has its own /tmp); 0755 so that nobody reaches the socket.
    d = Path(tempfile.mkdtemp(prefix="weft-snap-", dir="/dev/shm"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(root: Path) -> Iterator[DaemonProc]:
    state = root / "state"
    state.mkdir()
    (state / "weft.toml").write_text("retry-backoff = 0.1\n")
    d = start_daemon(state)
    yield d
    stop_daemon(d)


@pytest.fixture
def graph(daemon: DaemonProc) -> Iterator[Graph]:
    g = Graph(daemon)
    yield g
    g.close()


def snapshots(graph: Graph, target: str) -> list[dict]:
    return graph.client.call("snapshots", target=target)["snapshots"]  # type: ignore[index]


def history(graph: Graph, drv: str) -> list[dict]:
    return graph.client.call("history", drv=drv)["attempts"]  # type: ignore[index]


def notes(graph: Graph) -> str:
    return "\n".join(m for m, _ in graph.logs)


def slot_file(daemon: DaemonProc, name: str) -> Path:
    """The file `name` a running builder made in its build dir, seen from the host."""
    found = wait_for(lambda: list((daemon.state / "var" / "builds").glob(f"*/build/{name}")))
    (path,) = found  # type: ignore[misc]
    return path


def build_in_thread(
    daemon: DaemonProc, drv: Derivation, **args: object
) -> tuple[threading.Thread, list]:
    out: list = []

    def run() -> None:
        with BlockingClient(daemon.socket, on_log=lambda e: None) as c:
            try:
                out.extend(c.call("build", drvs=[drv.path], **args))  # type: ignore[arg-type]
            except DaemonError as e:
                out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def as_nobody(daemon: DaemonProc, op: str, **args: object) -> dict:
    """`op` sent by an untrusted user (nobody): its reply, or its error as a dict."""
    code = f"""
import json
from daemon.cli.blocking import BlockingClient, DaemonError
from daemon.settings import Settings
from store.durabledirs import Scope
from store.layout import ConfigError
with BlockingClient({daemon.socket!r}, on_log=lambda e: None) as c:
    try:
        print(json.dumps({{"reply": c.call({op!r}, **{args!r})}}))
    except DaemonError as e:
        print(json.dumps({{"code": e.code, "message": e.message}}))
"""
    out = run_as_nobody(code, {"PYTHONPATH": str(Path(__file__).parent.parent)})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_failed_builds_data_snapshot_resumes_its_durable_data_and_nothing_else(
    graph: Graph,
) -> None:
    seeded = graph.sh("seeded", SEEDED, durable_dirs=DURABLE)
    (r,) = graph.build(seeded, on_commit="data", retries=0)
    assert r["status"] == "failed"
    (record,) = snapshots(graph, seeded.path)
    snap = Path(record["path"])
    assert f"its data snapshot is {snap}" in r["message"]
    assert (record["drv"], record["scope"], record["state"]) == (seeded.path, "data", "committed")
    assert (record["reason"], record["attempt"], record["owner"]) == ("failed", 1, 0)
    assert snap.name.endswith("-seeded-snapshot")
    assert (snap / "durable" / "durable" / "n").read_text() == "n\n"
    assert sorted(p.name for p in snap.iterdir()) == ["durable", "snapshot.json"]
    assert [a["snapshot"] for a in history(graph, seeded.path)] == [str(snap)]

    (r,) = graph.build(seeded, resume_from=str(snap))
    assert r["status"] == "built", (r["message"], notes(graph))
    assert Path(seeded.out).read_text() == "n\nmore\n"
    assert f"seeded: resuming from {snap}: restored durable/durable" in notes(graph)
    # Committed snapshots stay until forgotten; named by the output built, too.
    assert [s["path"] for s in snapshots(graph, seeded.out)] == [str(snap)]


def test_a_full_snapshot_keeps_everything_the_build_wrote_but_the_hazards(
    graph: Graph, daemon: DaemonProc, root: Path
) -> None:
    script = (
        "if [ -e scratch/x ]; then test ! -u setuid && test ! -e stolen && "
        "cat durable/n scratch/x /tmp/t $out > $out.new && mv $out.new $out; exit; fi; "
        "mkdir -p durable scratch; echo n > durable/n; echo x > scratch/x; echo t > /tmp/t; "
        "echo partial > $out; touch waiting; while [ ! -e go ]; do sleep 0.05; done; exit 1"
    )
    hazards = graph.sh("hazards", script, durable_dirs=DURABLE)
    thread, results = build_in_thread(daemon, hazards, on_commit="full", retries=0)
    waiting = slot_file(daemon, "waiting")
    build = waiting.parent
    builder = build.stat().st_uid
    # What a builder could leave if it could: a setuid file of its own, and a hard link to
    # a file of root's (planted here, as root, where the builder writes).
    setuid = build / "setuid"
    setuid.write_text("#!/bin/sh\n")
    os.chown(setuid, builder, builder)
    setuid.chmod(0o4755)
    secret = root / "secret"
    secret.write_text("root only\n")
    secret.chmod(0o600)
    os.link(secret, build / "stolen")
    (build / "go").touch()
    thread.join(60)
    (r,) = results
    assert r["status"] == "failed"
    (record,) = snapshots(graph, hazards.path)
    snap = Path(record["path"])
    assert (record["scope"], record["state"]) == ("full", "committed")
    assert f"its full snapshot is {snap}" in r["message"]
    assert (snap / "build" / "durable" / "n").read_text() == "n\n"
    assert (snap / "build" / "scratch" / "x").read_text() == "x\n"
    assert (snap / "tmp" / "t").read_text() == "t\n"
    assert (snap / "outputs" / "out").read_text() == "partial\n"
    kept = (snap / "build" / "setuid").stat()
    assert kept.st_uid == 0 and not kept.st_mode & (stat.S_ISUID | stat.S_ISGID | 0o222)
    assert not (snap / "build" / "stolen").exists()
    assert secret.read_text() == "root only\n"

    # Resumed in full, into its own derivation: the build dir, /tmp and the partial output.
    (r,) = graph.build(hazards, resume_from=str(snap), retries=0)
    assert r["status"] == "built", (r["message"], notes(graph))
    assert Path(hazards.out).read_text() == "n\nx\nt\npartial\n"
    assert f"resuming from {snap}: restored build, tmp, outputs/out" in notes(graph)


def test_a_retry_of_a_derivation_with_durable_dirs_resumes_from_the_attempt_before(
    graph: Graph,
) -> None:
    seeded = graph.sh("retried", SEEDED, durable_dirs=DURABLE)
    (r,) = graph.build(seeded, retries=1)
    assert (r["status"], r["attempts"]) == ("built", 2), r
    assert Path(seeded.out).read_text() == "n\nmore\n"
    first, second = history(graph, seeded.path)
    assert (first["outcome"], second["outcome"]) == ("exit", "built")
    (record,) = snapshots(graph, seeded.path)
    # Durable directories declared: a failure commits them, with no scope asked for.
    assert first["snapshot"] == record["path"] and second["snapshot"] is None
    assert (record["scope"], record["reason"], record["attempt"]) == ("data", "failed", 1)
    said = f"retried: resuming from the snapshot of attempt 1, {record['path']}: restored"
    assert said in notes(graph)


def test_a_running_build_is_committed_on_request_by_any_user_and_goes_on(
    graph: Graph, daemon: DaemonProc
) -> None:
    script = (
        "mkdir -p durable; echo n > durable/n; touch waiting; "
        "while [ ! -e go ]; do sleep 0.05; done; echo done > $out"
    )
    running = graph.sh("running", script, durable_dirs=DURABLE)
    with pytest.raises(DaemonError, match=re.escape(f"no build of {running.path} is running")):
        graph.client.call("snapshot-commit", drv=running.path)
    thread, results = build_in_thread(daemon, running)
    waiting = slot_file(daemon, "waiting")
    full = graph.client.call("snapshot-commit", drv=running.path)
    assert (full["scope"], full["state"], full["reason"]) == ("full", "committed", "commit")  # type: ignore[index]
    assert (Path(full["path"]) / "build" / "durable" / "n").read_text() == "n\n"  # type: ignore[index]
    assert (Path(full["path"]) / "build" / "waiting").exists()  # type: ignore[index]
    # An untrusted user may commit too, and owns what it committed.
    data = as_nobody(daemon, "snapshot-commit", drv=running.path, scope="data")["reply"]
    assert (data["scope"], data["owner"]) == ("data", 65534)
    assert sorted(os.listdir(data["path"])) == ["durable", "snapshot.json"]
    # The build was let go on, its files as they were.
    assert waiting.exists() and thread.is_alive()
    (waiting.parent / "go").touch()
    thread.join(60)
    assert [r["status"] for r in results] == ["built"]
    assert {s["path"] for s in snapshots(graph, running.path)} == {full["path"], data["path"]}  # type: ignore[index]


def test_a_snapshot_outlives_collections_until_it_is_forgotten(
    graph: Graph, daemon: DaemonProc
) -> None:
    failing = graph.sh("kept", "mkdir durable; echo n > durable/n; exit 1", durable_dirs=DURABLE)
    (r,) = graph.build(failing, retries=0)
    assert r["status"] == "failed"
    (record,) = snapshots(graph, failing.path)
    path = Path(record["path"])
    env = {**os.environ, "WEFT_STATE_DIR": str(daemon.state)}
    gc = [str(Path(sys.executable).parent / "store-gc")]
    out = subprocess.run(gc, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert path.exists()
    # Only its owner or a trusted user forgets it.
    refused = as_nobody(daemon, "snapshot-forget", path=str(path))
    assert "only its owner or a trusted user" in refused["message"]
    forgotten = graph.client.call("snapshot-forget", path=str(path))
    assert forgotten["path"] == str(path)  # type: ignore[index]
    assert snapshots(graph, failing.path) == []
    out = subprocess.run(gc, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not path.exists()


def test_the_scopes_asked_for_leave_the_derivation_path_alone(graph: Graph) -> None:
    failing = graph.sh("scoped", "mkdir durable; echo n > durable/n; exit 1", durable_dirs=DURABLE)
    for scopes in ({}, {"on_commit": "data"}, {"on_commit": "full", "on_pause": "full"}):
        (r,) = graph.build(failing, retries=0, **scopes)
        assert r["drv"] == failing.path
    assert {s["drv"] for s in snapshots(graph, failing.path)} == {failing.path}
    assert [s["scope"] for s in snapshots(graph, failing.path)] == ["full", "data", "data"]


def test_resuming_from_a_forged_snapshot_or_from_a_full_one_of_another_derivation_is_refused(
    graph: Graph, root: Path
) -> None:
    target = graph.sh("target", "cat durable/n > $out", durable_dirs=DURABLE)
    fake = root / "fake"
    (fake / "durable" / "durable").mkdir(parents=True)
    (fake / "durable" / "durable" / "n").write_text("forged\n")
    (fake / "snapshot.json").write_text(json.dumps({"weft-snapshot": 1, "drv": target.path}))
    forged = source(fake, "target-snapshot")
    with pytest.raises(DaemonError, match="is not a snapshot \\(no record of it"):
        graph.build(target, resume_from=forged)

    other = graph.sh("other", "mkdir durable; echo n > durable/n; exit 1", durable_dirs=DURABLE)
    (r,) = graph.build(other, on_commit="full", retries=0)
    assert r["status"] == "failed"
    (full,) = snapshots(graph, other.path)
    with pytest.raises(DaemonError, match="restores only into the derivation it was made from"):
        graph.build(target, resume_from=full["path"])
    assert not os.path.exists(target.out)


def test_a_data_snapshot_seeds_another_derivation_for_trusted_users_only(
    graph: Graph, daemon: DaemonProc
) -> None:
    donor = graph.sh(
        "donor", "mkdir cache; echo warm > cache/n; exit 1", durable_dirs={"cache": "/build/cache"}
    )
    (r,) = graph.build(donor, retries=0)
    (record,) = snapshots(graph, donor.path)
    # The same name, another place: a data restore goes by name.
    taker = graph.sh(
        "taker", "cat deep/cache/n > $out", durable_dirs={"cache": "/build/deep/cache"}
    )
    refused = as_nobody(daemon, "build", drvs=[taker.path], resume_from=record["path"])
    assert "for trusted users only" in refused["message"], refused
    (r,) = graph.build(taker, resume_from=record["path"])
    assert r["status"] == "built", (r["message"], notes(graph))
    assert Path(taker.out).read_text() == "warm\n"


def test_weft_tomls_scopes_are_checked_at_start_and_are_the_defaults_of_every_request() -> None:
    with pytest.raises(ConfigError, match=r"weft\.toml: snapshot-on-pause and snapshot-on-commit"):
        Settings.from_toml('snapshot-on-pause = "data"\n')
    with pytest.raises(
        ConfigError, match=r"weft\.toml: snapshot-on-commit: unknown snapshot scope"
    ):
        Settings.from_toml('snapshot-on-commit = "memory"\n')
    assert Settings.from_toml('snapshot-on-commit = "data"\n').on_commit is Scope.DATA

    root = Path(tempfile.mkdtemp(prefix="weft-snapconf-", dir="/var/tmp"))
    try:
        state = root / "state"
        state.mkdir()
        settings = 'snapshot-on-pause = "data"\nsnapshot-on-commit = "data"\n'
        (state / "weft.toml").write_text(settings)
        daemon = start_daemon(state)
        g = Graph(daemon)
        try:
            failing = g.sh("defaults", "mkdir scratch; echo x > scratch/x; exit 1")
            # The request's pair keeps the rule by itself, and so must the pair in effect.
            with pytest.raises(DaemonError, match="must be a subset of on-pause"):
                g.build(failing, on_pause="data")
            with pytest.raises(DaemonError, match="must be a subset of on-pause"):
                g.build(failing, on_commit="full")
            # No durable directory, but weft.toml's on-commit: a (data, so empty) snapshot.
            (r,) = g.build(failing, retries=0)
            assert r["status"] == "failed"
            (record,) = snapshots(g, failing.path)
            assert record["scope"] == "data"
            assert sorted(os.listdir(record["path"])) == ["durable", "snapshot.json"]
        finally:
            g.close()
            stop_daemon(daemon)
    finally:
        shutil.rmtree(root, ignore_errors=True)

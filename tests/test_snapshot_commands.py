"""The snapshot commands end to end (issue 22, docs/snapshots.md), on a real daemon building
in real sandboxes: `store-build --on-commit`, `--commit` of a running build and
`--resume-from` (and its refusals: a forged snapshot, a paused one, a full one into another
derivation, a data one into another derivation for an untrusted user), `store-snapshot`'s
listing and `--forget` (its owner, a trusted user, not anyone else), `store-history`'s
snapshot column, and a snapshot kept by `store-gc` until it is forgotten.  The state dir is
under /var/tmp (the sandbox has its own /tmp) and open to other users, who run commands as
nobody."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.daemons import DaemonProc, start_daemon, stop_daemon
from daemon.cli.blocking import BlockingClient
from store import Store
from store.durabledirs import Scope
from store.snapshots import SnapshotRecord, SnapshotState
from tests.daemon_fixtures import Graph

NOBODY = 65534
SETPRIV = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
REPO = str(Path(__file__).resolve().parent.parent)
HOME = "/build/my home directory"
# Fails the first time, leaving `n` in its durable directory and `x` beside it; started
# from a snapshot holding `n` (and not `x`), it adds to `n` and succeeds.
RESUMABLE = f"""
d="{HOME}"
if [ -e "$d/n" ]; then
  test ! -e /build/x || {{ echo "x was restored"; exit 3; }}
  echo more >> "$d/n" && cat "$d/n" > $out && exit 0
fi
mkdir -p "$d" && echo kept > "$d/n" && echo scratch > /build/x && echo tmp > /tmp/t
exit 1
"""


@pytest.fixture
def open_daemon() -> Iterator[DaemonProc]:
    """A building daemon other users can reach."""
    root = Path(tempfile.mkdtemp(prefix="weft-snapshots-", dir="/var/tmp"))
    root.chmod(0o755)
    d = start_daemon(root / "state")
    yield d
    stop_daemon(d)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def graph(open_daemon: DaemonProc) -> Iterator[Graph]:
    g = Graph(open_daemon)
    yield g
    g.close()


# A command run as a user runs it: its own process, dispatched by name.
RUNNER = """
import sys
from daemon.cli.main import run
code = run(sys.argv[1], sys.argv[2:])
sys.stdout.flush()
sys.exit(code)
"""


def _command(d: DaemonProc, name: str, *args: str) -> list[str]:
    return [sys.executable, "-c", RUNNER, name, "--socket", d.socket, *args]


def weft(
    name: str, socket: str, *args: str, user: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run command `name` against the daemon on `socket`; as nobody with `user=SETPRIV`."""
    return subprocess.run(
        [*user, sys.executable, "-c", RUNNER, name, "--socket", socket, *args],
        capture_output=True,
        text=True,
        cwd="/",
        env={**os.environ, "PYTHONPATH": REPO},
        timeout=60,
    )


def as_nobody(d: DaemonProc, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return weft(name, d.socket, *args, user=SETPRIV)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def refused(result: subprocess.CompletedProcess[str], says: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert says in result.stderr, result.stderr


def snapshots(d: DaemonProc, target: str) -> list[dict]:
    return json.loads(ok(weft("store-snapshot", d.socket, "--json", target)))


def test_a_failed_build_commits_its_durable_data_and_a_resumed_build_continues_it(
    graph: Graph,
) -> None:
    d = graph.daemon
    app = graph.sh("app", RESUMABLE, durable_dirs={"home": HOME})
    refused(weft("store-build", d.socket, "--no-retry", app.path), "failed with exit code 1")
    [record] = snapshots(d, app.path)
    path = record["path"]
    assert record["drv"] == app.path and path.endswith("-app-snapshot")
    assert (record["state"], record["scope"], record["reason"], record["attempt"]) == (
        "committed",
        "data",
        "failed",
        1,
    )
    assert record["owner"] == 0 and record["durable_dirs"] == {"home": HOME}
    assert (Path(path) / "durable" / "home" / "n").read_text() == "kept\n"
    assert sorted(os.listdir(path)) == ["durable", "snapshot.json"]
    assert snapshots(d, path) == [record]  # a snapshot names itself

    table = ok(weft("store-snapshot", d.socket, app.path)).splitlines()
    assert table[0].split() == ["path", "state", "scope", "reason", "attempt", "size", "age"]
    assert table[1].split()[:5] == [path, "committed", "data", "failed", "1"]

    history = json.loads(ok(weft("store-history", d.socket, "--json", app.path)))
    assert [a["snapshot"] for a in history["attempts"]] == [path]
    shown = ok(weft("store-history", d.socket, app.path)).splitlines()
    assert shown[0].split()[-1] == "snapshot" and shown[1].split()[-1] == path

    out = ok(weft("store-build", d.socket, "--no-retry", "--resume-from", path, app.path))
    assert Path(out.strip()).read_text() == "kept\nmore\n"
    # Built, its output names its derivation's snapshots.
    assert snapshots(d, app.outputs["out"]) == [record]
    history = json.loads(ok(weft("store-history", d.socket, "--json", app.path)))
    assert [a["snapshot"] for a in history["attempts"]] == [path, None]


def _wait_running(d: DaemonProc, drv: str) -> int:
    """The pid of `drv`'s builder, once the scheduler runs it."""
    deadline = time.monotonic() + 30
    with BlockingClient(d.socket) as c:
        while time.monotonic() < deadline:
            for r in c.call("status")["running"]:
                if r["drv"] == drv and r["pid"]:
                    return r["pid"]
            time.sleep(0.05)
    raise TimeoutError(f"{drv} never ran")


def test_commit_snapshots_a_running_build_which_then_goes_on(graph: Graph) -> None:
    d = graph.daemon
    script = (
        "mkdir -p /build/d && echo kept > /build/d/n && echo x > /build/x && "
        "until [ -e /build/go ]; do sleep 0.05; done; echo done > $out"
    )
    app = graph.sh("long", script, durable_dirs={"d": "/build/d"})
    refused(
        weft("store-build", d.socket, "--commit", app.path),
        f"error: no build of {app.path} is running",
    )
    build = subprocess.Popen(
        _command(d, "store-build", app.path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        build_root = Path(f"/proc/{_wait_running(d, app.path)}/root/build")
        deadline = time.monotonic() + 30
        while not (build_root / "x").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        full = ok(weft("store-build", d.socket, "--commit", app.path)).strip()
        data = ok(weft("store-build", d.socket, "--commit", app.path, "--on-commit", "data"))
        data = data.strip()
        (build_root / "go").write_text("")
        out, err = build.communicate(timeout=60)
    finally:
        if build.poll() is None:
            build.kill()
            build.wait()
    assert build.returncode == 0, err
    assert Path(out.strip()).read_text() == "done\n"
    assert (Path(full) / "build" / "x").read_text() == "x\n"
    assert (Path(full) / "build" / "d" / "n").read_text() == "kept\n"  # durable data within
    assert (Path(data) / "durable" / "d" / "n").read_text() == "kept\n"
    assert not (Path(data) / "build").exists()
    listed = {r["path"]: r for r in snapshots(d, app.path)}
    assert set(listed) == {full, data}
    assert (listed[full]["scope"], listed[full]["reason"]) == ("full", "commit")
    assert (listed[data]["scope"], listed[data]["reason"]) == ("data", "commit")


def test_only_its_owner_or_a_trusted_user_forgets_a_snapshot_and_then_gc_deletes_it(
    graph: Graph,
) -> None:
    d = graph.daemon
    roots = graph.sh(
        "roots", "mkdir -p /build/d && echo r > /build/d/f; exit 1", durable_dirs={"d": "/build/d"}
    )
    theirs = graph.sh(
        "theirs", "mkdir -p /build/d && echo t > /build/d/f; exit 1", durable_dirs={"d": "/build/d"}
    )
    refused(weft("store-build", d.socket, "--no-retry", roots.path), "failed")
    refused(as_nobody(d, "store-build", "--no-retry", theirs.path), "failed")
    [mine] = snapshots(d, roots.path)
    [nobodys] = snapshots(d, theirs.path)
    assert (mine["owner"], nobodys["owner"]) == (0, NOBODY)

    refused(
        as_nobody(d, "store-snapshot", "--forget", mine["path"]),
        f"error: {mine['path']} is uid 0's snapshot: only its owner or a trusted user may "
        "forget it",
    )
    code = FORGET.format(socket=d.socket, path=mine["path"])
    assert json.loads(ok(python_as_nobody(code))) == "permission-denied"
    ok(weft("store-gc", d.socket))
    assert Path(mine["path"]).exists()
    gone = ok(weft("store-snapshot", d.socket, "--forget", mine["path"]))
    assert gone.startswith(f"forgot {mine['path']}, the committed data snapshot of {roots.path}")
    assert ok(weft("store-snapshot", d.socket, roots.path)) == ""
    ok(weft("store-gc", d.socket))
    assert not Path(mine["path"]).exists()

    forgotten = json.loads(
        ok(as_nobody(d, "store-snapshot", "--json", "--forget", nobodys["path"]))
    )
    assert forgotten == nobodys
    refused(
        weft("store-snapshot", d.socket, "--forget", nobodys["path"]),
        f"error: {nobodys['path']} is not a snapshot (no record of it)",
    )


# The operation's own answer, as nobody: its error code.
FORGET = """
import json
from daemon.cli.blocking import BlockingClient, DaemonError
with BlockingClient({socket!r}) as c:
    try:
        print(json.dumps(c.call("snapshot-forget", path={path!r})))
    except DaemonError as e:
        print(json.dumps(e.code))
"""


def python_as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SETPRIV, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd="/",
        env={**os.environ, "PYTHONPATH": REPO},
        timeout=60,
    )


def _forged(d: DaemonProc, tmp: Path, drv: str) -> str:
    """A tree shaped like a snapshot, added with store-add: a path, not a snapshot."""
    tree = tmp / "app-snapshot"
    (tree / "durable" / "home").mkdir(parents=True)
    (tree / "durable" / "home" / "n").write_text("forged\n")
    manifest = {"weft-snapshot": 1, "drv": drv, "attempt": 1, "scope": "data"}
    (tree / "snapshot.json").write_text(json.dumps(manifest))
    return ok(weft("store-add", d.socket, str(tree))).strip()


def test_resume_from_refuses_a_forged_a_paused_and_a_full_snapshot_into_another_drv(
    graph: Graph, tmp_path: Path
) -> None:
    d = graph.daemon
    app = graph.sh("app", RESUMABLE, durable_dirs={"home": HOME})
    other = graph.sh("other", RESUMABLE.replace("more", "other"), durable_dirs={"home": HOME})
    forged = _forged(d, tmp_path, app.path)
    resume = ("store-build", d.socket, "--no-retry", "--resume-from")
    refused(
        weft(*resume, forged, app.path),
        f"error: {forged} is not a snapshot (no record of it: snapshots are made by builds, "
        "not added)",
    )
    refused(weft("store-build", d.socket, "--no-retry", "--on-commit", "full", app.path), "failed")
    [full] = snapshots(d, app.path)
    assert full["scope"] == "full"
    assert (Path(full["path"]) / "build" / "x").read_text() == "scratch\n"
    refused(weft(*resume, full["path"], other.path), "a full snapshot restores only into")
    refused(
        as_nobody(d, "store-build", "--resume-from", full["path"], other.path),
        "a full snapshot restores only into",
    )

    # A paused record (an evicted build's own), written as the daemon would, while it is
    # stopped; the daemon reads it when it starts again.
    stop_daemon(d)
    paused = SnapshotRecord(
        forged, app.path, 1, Scope.DATA, SnapshotState.PAUSED, "evicted", time.time(), 0, {}, 0
    )
    store = Store.open(d.state)
    try:
        store.snapshots.record(paused)
    finally:
        store.close()
    restarted = start_daemon(d.state)
    try:
        refused(
            weft("store-build", restarted.socket, "--resume-from", forged, app.path),
            f"error: {forged} is a paused build's snapshot; only committed snapshots can be "
            "resumed from",
        )
    finally:
        stop_daemon(restarted)


def test_seeding_another_derivation_from_a_data_snapshot_is_for_trusted_users(
    graph: Graph,
) -> None:
    d = graph.daemon
    app = graph.sh("app", RESUMABLE, durable_dirs={"home": HOME})
    other = graph.sh("other", RESUMABLE.replace("more", "other"), durable_dirs={"home": HOME})
    refused(weft("store-build", d.socket, "--no-retry", app.path), "failed")
    [data] = snapshots(d, app.path)
    refused(
        as_nobody(d, "store-build", "--no-retry", "--resume-from", data["path"], other.path),
        "for trusted users only",
    )
    out = ok(weft("store-build", d.socket, "--no-retry", "--resume-from", data["path"], other.path))
    assert Path(out.strip()).read_text() == "kept\nother\n"

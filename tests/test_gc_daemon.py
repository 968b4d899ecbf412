"""store-gc, store-optimise and store-verify --repair through a real daemon, with builds."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from daemon.cli.blocking import BlockingClient, DaemonError
from tests.daemon_fixtures import DaemonProc, Graph, start_daemon, stop_daemon

BIN = Path(sys.executable).parent


def cmd(d: DaemonProc, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WEFT_STATE_DIR": str(d.state)}
    return subprocess.run([BIN / name, *args], capture_output=True, text=True, env=env, timeout=120)


def gc_lines(d: DaemonProc, *args: str) -> list[str]:
    out = cmd(d, "store-gc", *args)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_store_gc_command(graph: Graph, builder_daemon: DaemonProc, tmp_path: Path) -> None:
    d = builder_daemon
    app = graph.sh("app", "echo app > $out")
    junk = graph.sh("junk", "echo junk > $out")
    graph.build(app, junk)
    link = tmp_path / "result"
    out = cmd(d, "store-build", "-o", str(link), app.path)
    assert out.returncode == 0, out.stderr
    graph.close()  # the graph's connection pinned everything it added

    roots = gc_lines(d, "--print-roots")
    assert f"{link} -> {app.out}" in roots
    live = set(gc_lines(d, "--print-live"))
    # keep-derivations: the .drv that built a live output is live too.
    assert {app.out, app.path} <= live and junk.out not in live
    dead = gc_lines(d, "--print-dead")
    assert junk.out in dead and app.out not in dead
    assert gc_lines(d, "--dry-run") == dead

    refused = cmd(d, "store-gc", "--delete", app.out)
    assert refused.returncode == 1
    assert "still alive" in refused.stderr and str(link) in refused.stderr
    one = cmd(d, "store-gc", "--json", "--delete", junk.out)
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["deleted"] == [junk.out]

    rest = cmd(d, "store-gc")
    assert rest.returncode == 0, rest.stderr
    assert sorted(rest.stdout.splitlines()) == sorted(set(dead) - {junk.out})
    assert "store paths deleted" in rest.stderr
    assert not os.path.exists(junk.out) and Path(app.out).read_text() == "app\n"
    link.unlink()
    assert app.out in gc_lines(d)
    assert os.listdir(d.state / "var" / "gcroots" / "auto") == []  # dangling: dropped


def test_temp_roots_of_a_live_connection(builder_daemon: DaemonProc, tmp_path: Path) -> None:
    d = builder_daemon
    src = tmp_path / "src"
    src.write_text("held")
    with BlockingClient(d.socket) as holder:
        path = holder.call("add-from-path", path=str(src))["path"]
        later = f"{d.store_dir}/{'3' * 32}-later"
        holder.call("add-temp-root", path=later)
        roots = gc_lines(d, "--print-roots")
        assert any(r.startswith("{client pid") and r.endswith(f"-> {path}") for r in roots)
        assert gc_lines(d) == []
        assert os.path.exists(path)
    deadline = time.monotonic() + 5
    while path not in gc_lines(d):
        assert time.monotonic() < deadline, "never collected after the client left"
        time.sleep(0.05)


def test_running_builds_keep_their_inputs(graph: Graph, builder_daemon: DaemonProc) -> None:
    d = builder_daemon
    dep = graph.sh("dep", "echo dep > $out")
    graph.build(dep)
    slow = graph.sh("slow", f"sleep 2; cat {dep} > $out")
    graph.close()
    results: list[object] = []
    with BlockingClient(d.socket) as c:
        t = threading.Thread(target=lambda: results.append(c.call("build", drvs=[slow.path])))
        t.start()
        deadline = time.monotonic() + 10
        while not any(r.startswith("{build of slow}") for r in gc_lines(d, "--print-roots")):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        roots = gc_lines(d, "--print-roots")
        assert f"{{build of slow}} -> {dep.out}" in roots
        assert f"{{build of slow}} -> {slow.path}" in roots
        assert not any(r.endswith(slow.out) for r in roots)  # not made yet: no root
        deleted = gc_lines(d)
        assert dep.out not in deleted and slow.path not in deleted
        t.join(30)
    (result,) = results[0]  # type: ignore[misc]
    assert result["status"] == "built", result
    assert Path(slow.out).read_text() == "dep\n"


def test_gc_in_a_loop_while_clients_add_build_and_take_roots(
    builder_daemon: DaemonProc, tmp_path: Path
) -> None:
    d = builder_daemon
    stop = threading.Event()
    errors: list[BaseException] = []
    rooted: list[str] = []

    def builder_client(n: int) -> None:
        g = Graph(d)
        try:
            i = 0
            while not stop.is_set():
                base = g.sh(f"base{n}", f"echo {n} {i % 3} > $out")
                top = g.sh(f"top{n}", f"cat {base} > $out; echo {base} >> $out")
                (r,) = g.build(top)
                assert r["status"] == "built" or r["status"] == "valid", r
                if i % 2 == 0:
                    link = tmp_path / f"result-{n}-{i}"
                    link.symlink_to(top.out)
                    g.client.call("add-root", link=str(link))
                    rooted.append(top.out)
                i += 1
        except BaseException as e:
            errors.append(e)
        finally:
            g.close()

    def adder(n: int) -> None:
        try:
            i = 0
            while not stop.is_set():
                with BlockingClient(d.socket) as c:
                    a = c.call("add-text", name=f"t{n}", text=f"{i % 5}")["path"]
                    b = c.call("add-text", name=f"u{n}", text=a, references=[a])["path"]
                    assert c.call("closure", paths=[b]) == [a, b]
                    assert Path(b).read_text() == a
                i += 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=builder_client, args=(n,)) for n in range(2)]
    threads += [threading.Thread(target=adder, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    deleted = 0
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and not errors:
        deleted += len(gc_lines(d))
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    assert deleted > 0 and rooted
    gc_lines(d)
    check = cmd(d, "store-verify", "--check-contents")
    assert check.returncode == 0, check.stderr
    with BlockingClient(d.socket) as c:
        for out in set(rooted):
            for p in c.call("closure", paths=[out]):
                assert os.path.exists(p), p


def test_repair_rebuilds_corrupt_and_missing_outputs(
    graph: Graph, builder_daemon: DaemonProc, tmp_path: Path
) -> None:
    d = builder_daemon
    tree = graph.sh("tree", "mkdir $out; echo original > $out/file")
    flat = graph.sh("flat", "echo flat > $out")
    graph.build(tree, flat)
    os.chmod(tree.out, 0o755)
    os.chmod(f"{tree.out}/file", 0o644)
    Path(f"{tree.out}/file").write_text("corrupted\n")
    os.unlink(flat.out)
    src = tmp_path / "src"
    src.write_text("source")
    source = graph.client.call("add-from-path", path=str(src))["path"]
    os.chmod(source, 0o644)
    Path(source).write_text("changed")
    orphan = graph.client.call("add-text", name="orphan", text="o")["path"]
    os.unlink(orphan)
    needed = graph.client.call("add-text", name="needed", text="n")["path"]
    graph.client.call("add-text", name="needing", text=needed, references=[needed])
    os.unlink(needed)

    check = cmd(d, "store-verify", "--check-contents")
    assert check.returncode == 1
    assert f"hash mismatch: {tree.out}" in check.stderr and f"missing: {flat.out}" in check.stderr
    repair = cmd(d, "store-verify", "--check-contents", "--repair", "--json")
    report = json.loads(repair.stdout)
    assert sorted(report["repaired"]) == sorted([tree.out, flat.out])
    assert report["removed"] == [orphan]
    unrepairable = dict(report["unrepairable"])
    assert sorted(unrepairable) == sorted([source, needed])
    assert "corrupted source" in unrepairable[source]
    # A missing path another path refers to is not forgotten: that would break a closure.
    assert "missing, and cannot be forgotten" in unrepairable[needed]
    assert repair.returncode == 1  # the source could not be repaired
    assert Path(f"{tree.out}/file").read_text() == "original\n"
    assert Path(flat.out).read_text() == "flat\n"
    assert os.stat(tree.out).st_mode & 0o777 == 0o555
    with BlockingClient(d.socket) as c:
        assert c.call("is-valid", paths=[orphan]) == []
        assert c.call("is-valid", paths=[needed]) == [needed]
        after = c.call("verify", paths=[tree.out, flat.out], check_contents=True)
        assert not after["missing"] and not after["mismatched"]
        try:
            c.call("verify", repair=True)
        except DaemonError as e:  # root is trusted: repair is allowed
            raise AssertionError(e) from None


def test_store_optimise_command(builder_daemon: DaemonProc, tmp_path: Path) -> None:
    d = builder_daemon
    with BlockingClient(d.socket) as c:
        for i in range(3):
            t = tmp_path / f"t{i}"
            t.mkdir()
            (t / "big").write_bytes(b"x" * 50_000)
            c.call("add-from-path", path=str(t))
    out = cmd(d, "store-optimise", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["bytes_saved"] == 100_000
    again = cmd(d, "store-optimise")
    assert again.stdout.startswith("0 bytes saved")


def test_auto_gc_before_builds_keeps_the_build_going(tmp_path: Path) -> None:
    base = Path("/var/tmp") / f"weft-autogc-{os.getpid()}"
    state = base / "state"
    state.mkdir(parents=True)
    # More free space than any disk has: every build starts with a collection.
    (state / "weft.toml").write_text("min-free = 4611686018427387904\n")
    d = start_daemon(state)
    try:
        g = Graph(d)
        junk = g.client.call("add-text", name="junk", text="dead weight")["path"]
        g.close()
        g = Graph(d)
        dep = g.sh("dep", "echo dep > $out")
        top = g.sh("top", f"cat {dep} > $out")
        (r,) = g.build(top)
        assert r["status"] == "built", r
        assert Path(top.out).read_text() == "dep\n"
        assert not os.path.exists(junk)
        assert any("free space was low" in m for m, _ in g.logs)
        g.close()
    finally:
        stop_daemon(d)
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_a_derivation_read_by_an_earlier_request_must_still_be_valid(
    builder_daemon: DaemonProc,
) -> None:
    # The daemon keeps the derivations it has read and checked; each request still asks
    # the database whether they are valid.
    d = builder_daemon
    g = Graph(d)
    drv = g.sh("once", "echo once > $out")
    assert [r["status"] for r in g.build(drv)] == ["built"]
    assert [r["status"] for r in g.build(drv)] == ["valid"]
    g.close()  # its connection's pins go with it
    deleted = cmd(d, "store-gc", "--json", "--delete", drv.out, drv.path)
    assert deleted.returncode == 0, deleted.stderr
    assert sorted(json.loads(deleted.stdout)["deleted"]) == sorted([drv.out, drv.path])
    with BlockingClient(d.socket) as client:
        try:
            client.call("build", drvs=[drv.path])
        except DaemonError as e:
            assert "is not a valid derivation in the store" in str(e)
        else:
            raise AssertionError("a deleted derivation was built")

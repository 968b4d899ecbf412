"""Builds through a real daemon: real sandboxes, real busybox, real locks."""

import dataclasses
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import apsw
import pytest

from daemon.cli.blocking import BlockingClient, DaemonError
from store.derivation import Output
from store.recipe import derivation
from tests.daemon_fixtures import DaemonProc, Graph, start_daemon, stop_daemon

ROOT = Path(__file__).parent.parent


def test_diamond(graph: Graph) -> None:
    base = graph.sh("base", "echo base > $out")
    left = graph.sh("left", f"cat {base} > $out; echo left >> $out")
    right = graph.sh("right", f"cat {base} > $out; echo right >> $out")
    top = graph.sh("top", f"mkdir $out; cat {left} {right} > $out/both; echo {left} > $out/uses")
    (result,) = graph.build(top)
    assert result["status"] == "built"
    assert Path(top.out, "both").read_text() == "base\nleft\nbase\nright\n"
    info = graph.client.call("path-info", path=top.out)
    assert info["deriver"] == top.path
    # A reference is a path that occurs in the output, not any input.
    assert info["references"] == [left.out]
    assert graph.client.call("references", path=left.out) == []
    graph.logs.clear()
    (again,) = graph.build(top)
    assert again["status"] == "valid"
    assert not [m for m, _ in graph.logs if m.startswith("building")]


def test_parallelism_is_bounded_by_max_jobs(graph: Graph) -> None:
    # Each builder notes when it ran (host uptime, which pid namespaces share).
    script = "read a _ < /proc/uptime; sleep 0.6; read b _ < /proc/uptime; echo $a $b > $out"
    drvs = [graph.sh(f"par{i}", script, env={"I": str(i)}) for i in range(6)]
    results = graph.build(*drvs, max_jobs=2)
    assert [r["status"] for r in results] == ["built"] * 6
    spans = [tuple(map(float, Path(d.out).read_text().split())) for d in drvs]
    most = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
    assert most == 2


def test_each_builder_runs_in_a_freezer_cgroup_of_its_own_removed_after(graph: Graph) -> None:
    from daemon.sched.freezer import _mount

    script = "cat /proc/self/cgroup > $out; sleep 0.3"
    drvs = [graph.sh(f"cg{i}", script, env={"I": str(i)}) for i in range(3)]
    assert [r["status"] for r in graph.build(*drvs, max_jobs=3)] == ["built"] * 3
    cgroups = []
    for d in drvs:
        (line,) = [x for x in Path(d.out).read_text().splitlines() if x.startswith("0::")]
        cgroups.append(line.removeprefix("0::"))
    assert len(set(cgroups)) == 3
    for cgroup in cgroups:
        assert os.path.basename(os.path.dirname(cgroup)).startswith("weft-"), cgroup
        assert not os.path.exists(f"{_mount(2)}{cgroup}")
    assert os.path.isdir(f"{_mount(2)}{os.path.dirname(cgroups[0])}")


def test_what_a_killed_daemon_left_in_its_cgroup_goes_when_the_next_starts() -> None:
    from daemon.sched.freezer import _mount

    where = Path(tempfile.mkdtemp(prefix="weft-cgroups-", dir="/var/tmp"))
    d = start_daemon(where / "state")
    try:
        graph = Graph(d)
        drv = graph.sh("where", "cat /proc/self/cgroup > $out")
        assert [r["status"] for r in graph.build(drv)] == ["built"]
        graph.close()
        (line,) = [x for x in Path(drv.out).read_text().splitlines() if x.startswith("0::")]
        base = Path(f"{_mount(2)}{os.path.dirname(line.removeprefix('0::'))}")
        d.proc.kill()
        d.proc.wait()
        (base / "left-behind").mkdir()
        d = start_daemon(where / "state")
        # Its socket may listen before it is ready: a request served means it is.
        with BlockingClient(d.socket) as client:
            client.call("store-dir")
        assert base.is_dir() and not (base / "left-behind").exists()
    finally:
        stop_daemon(d)
        shutil.rmtree(where, ignore_errors=True)


def test_two_clients_one_build(graph: Graph, builder_daemon: DaemonProc) -> None:
    slow = graph.sh("slow", "sleep 1; echo done > $out")
    seen: list[list[str]] = []

    def client() -> None:
        logs: list[str] = []
        with BlockingClient(builder_daemon.socket, on_log=lambda e: logs.append(e.message)) as c:
            (r,) = c.call("build", drvs=[slow.path])
            assert r["status"] == "built"
        seen.append(logs)

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    started = [m for logs in seen for m in logs if m.startswith("building slow")]
    waited = [m for logs in seen for m in logs if m.startswith("waiting for slow")]
    assert len(started) == 1 and len(waited) == 1


def test_failures_are_reported_with_the_log_tail(graph: Graph) -> None:
    failing = graph.sh("failing", "echo some output; echo the last line; exit 3")
    dependent = graph.sh("dependent", f"cat {failing} > $out")
    lazy = graph.sh("lazy", "echo not making my output")
    independent = graph.sh("independent", "echo fine > $out")
    results = graph.build(dependent, lazy, independent, keep_going=True, max_jobs=1)
    by_drv = {r["drv"]: r for r in results}
    assert by_drv[dependent.path]["status"] == "dependency-failed"
    # The failed dependency is named by its .drv store path, as Nix names it.
    assert failing.path in by_drv[dependent.path]["message"]
    assert by_drv[lazy.path]["status"] == "failed"
    assert f"builder for '{lazy.path}' did not produce output 'out'" in by_drv[lazy.path]["message"]
    assert by_drv[independent.path]["status"] == "built"
    (fail,) = graph.build(failing)
    assert fail["message"] == (
        f"builder for '{failing.path}' failed with exit code 3; last 2 log lines:\n"
        "  some output\n"
        "  the last line"
    )
    # The logs of failed builds are kept too, whatever the failure.
    for drv, text in ((failing, b"some output\nthe last line\n"), (lazy, b"not making")):
        log = bytearray()
        graph.client.download("log", log.extend, path=drv.path)
        assert log.startswith(text), log


def test_timeout_and_silence_kill_the_builder(graph: Graph) -> None:
    stuck = graph.sh("stuck", "trap '' TERM; sleep 60")
    # No retries: under load the policy would retry a timeout with twice the time.
    (r,) = graph.build(stuck, timeout=1, retries=0)
    assert r["status"] == "failed" and "timed out after 1 s" in r["message"]
    quiet = graph.sh("quiet", "echo hi; sleep 60")
    (r,) = graph.build(quiet, max_silent_time=1, retries=0)
    assert "was silent for 1 s" in r["message"]


def test_fixed_output_hash_mismatch(graph: Graph) -> None:
    fetched = graph.sh("fetched", "echo downloaded > $out", output_hash="blake3:" + "0" * 64)
    (r,) = graph.build(fetched)
    assert r["status"] == "failed" and fetched.path in r["message"]
    assert "blake3:" + "0" * 64 in r["message"]
    assert not graph.client.call("is-valid", paths=[fetched.out])


def test_reference_hidden_in_binary_data_is_found(graph: Graph) -> None:
    dep = graph.sh("dep", "echo dep > $out")
    unrelated = graph.sh("unrelated", "echo unrelated > $out")
    graph.build(unrelated)
    user = graph.sh(
        "user",
        f"{{ head -c 1000 /dev/urandom; printf '\\0{dep}\\0'; head -c 999 /dev/urandom; }} > $out",
        inputs=[unrelated],
    )
    (r,) = graph.build(user)
    assert r["status"] == "built"
    assert graph.client.call("references", path=user.out) == [dep.out]


def test_build_log_is_stored_compressed(graph: Graph, builder_daemon: DaemonProc) -> None:
    noisy = graph.sh("noisy", "echo line one; echo line two >&2; echo x > $out")
    graph.build(noisy)
    log = builder_daemon.state / "var" / "log" / f"{os.path.basename(noisy.path)}.gz"
    assert gzip.decompress(log.read_bytes()) == b"line one\nline two\n"
    env = {**os.environ, "WEFT_STATE_DIR": str(builder_daemon.state)}
    for target in (noisy.path, noisy.out):
        out = subprocess.run(
            [Path(sys.executable).parent / "store-log", target],
            capture_output=True,
            env=env,
            timeout=60,
        )
        assert out.returncode == 0 and out.stdout == b"line one\nline two\n", out.stderr


def test_log_size_limit_and_first_failure_stops_the_rest(graph: Graph) -> None:
    chatty = graph.sh("chatty", "while :; do echo 0123456789abcdef; done")
    delay = graph.sh("delay", "sleep 1; echo delay > $out")
    later = graph.sh("later", f"cat {delay} > $out")
    results = graph.build(chatty, later, max_log_size=100_000, max_jobs=2)
    by_drv = {r["drv"]: r for r in results}
    assert "exceeded the log size limit of 100000 bytes" in by_drv[chatty.path]["message"]
    # `later` could only start after chatty had failed: without --keep-going it never does.
    assert by_drv[later.path]["status"] == "cancelled"


def test_store_build_command_with_recipes_and_result_link(
    builder_daemon: DaemonProc, tmp_path: Path
) -> None:
    env = {**os.environ, "WEFT_STATE_DIR": str(builder_daemon.state)}
    cmd = [
        Path(sys.executable).parent / "store-build",
        "-o",
        str(tmp_path / "result"),
        str(ROOT / "examples" / "recipes.py"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    (path,) = out.stdout.split()
    assert Path(path).read_text() == "STORE\nBUILD\nDAEMON\nlines: 3\n"
    assert os.readlink(tmp_path / "result") == path
    roots = os.listdir(builder_daemon.state / "var" / "gcroots" / "auto")
    assert len(roots) == 1


def test_fixed_output_already_in_the_store_is_not_built_again(graph: Graph, tmp_path: Path) -> None:
    payload = tmp_path / "payload"
    payload.write_text("downloaded once\n")
    present = graph.client.call("add-from-path", path=str(payload), name="payload")
    fetch = graph.sh("fetch", "echo the builder ran >&2; exit 1", output_hash=present["nar_hash"])
    graph.logs.clear()
    (r,) = graph.build(fetch)
    assert r["status"] == "built", r
    assert Path(fetch.out).read_text() == "downloaded once\n"
    assert not [m for m, _ in graph.logs if "the builder ran" in m]
    assert [m for m, _ in graph.logs if "content already in the store" in m]
    assert graph.client.call("path-info", path=fetch.out)["nar_hash"] == present["nar_hash"]


def test_check_rebuilds_and_compares(graph: Graph) -> None:
    steady = graph.sh("steady", "echo same every time > $out")
    moody = graph.sh("moody", "head -c 16 /dev/urandom > $out")
    graph.build(steady, moody)
    by_drv = {r["drv"]: r for r in graph.build(steady, moody, check=True)}
    assert by_drv[steady.path]["status"] == "checked" and by_drv[steady.path]["identical"]
    assert by_drv[moody.path]["identical"] is False
    assert "differs" in by_drv[moody.path]["message"]


def test_keep_failed_hands_a_sanitized_build_dir_over(graph: Graph) -> None:
    # It tries a setuid file and hard links to root-owned files (an input, /etc/passwd).
    script = (
        "echo data > kept; mkdir open; chmod 777 open; mkfifo pipe; "
        "chmod 4755 kept 2>/dev/null; "
        f"ln {graph.bb}/bin/busybox stolen 2>/dev/null; ln /etc/passwd passwd 2>/dev/null; "
        "exit 1"
    )
    failing = graph.sh("keepme", script)
    (r,) = graph.build(failing, keep_failed=True, retries=0)
    assert r["status"] == "failed"
    kept = Path(r["message"].rsplit("the build dir is kept at ", 1)[1].strip())
    try:
        assert (kept / "kept").read_text() == "data\n"
        assert not (kept / "pipe").exists()
        for p in [kept, *kept.rglob("*")]:
            st = p.lstat()
            assert st.st_uid == os.geteuid()
            assert not st.st_mode & 0o7022, (p, oct(st.st_mode))
            assert p.is_dir() or st.st_nlink == 1, p
        bb = Path(f"{graph.bb}/bin/busybox").stat()
        assert all(
            (p.lstat().st_dev, p.lstat().st_ino) != (bb.st_dev, bb.st_ino) for p in kept.rglob("*")
        )
        assert (kept.parent.stat().st_mode & 0o777) == 0o700
    finally:
        shutil.rmtree(kept.parent)


def test_keep_failed_with_retries_names_every_attempts_build_dir(graph: Graph) -> None:
    # Each attempt writes a random token in its build dir: two dirs with two tokens are
    # the two attempts' own, not one dir named twice.
    failing = graph.sh(
        "keepeach", "echo attempt > mark; head -c 16 /dev/urandom | od -x > when; exit 3"
    )
    (r,) = graph.build(failing, keep_failed=True, retries=1)
    assert r["status"] == "failed" and r["attempts"] == 2, r
    last = r["message"].split("the build dir is kept at ", 1)[1].split("\n", 1)[0].strip()
    earlier = r["message"].rsplit("the earlier attempts' build dirs are kept at ", 1)[1]
    dirs = [Path(last), *(Path(p.strip()) for p in earlier.split(","))]
    try:
        assert len(dirs) == 2 and dirs[0] != dirs[1]
        for d in dirs:
            assert (d / "mark").read_text() == "attempt\n"
        assert (dirs[0] / "when").read_text() != (dirs[1] / "when").read_text()
    finally:
        for d in dirs:
            shutil.rmtree(d.parent, ignore_errors=True)


def test_log_lines_come_live_and_together(graph: Graph) -> None:
    # Lines that come close together reach the client in one batch, so that a client
    # following quick builds is not woken twice per build; none waits for the reply.
    quick = [graph.sh("quick0", "echo 0 > $out")]
    for i in range(1, 10):
        quick.append(graph.sh(f"quick{i}", f"cat {quick[-1]} > $out; echo {i} >> $out"))
    slow = graph.sh("slow", f"sleep 0.5; cat {quick[-1]} > $out")
    seen: list[tuple[str, int, float]] = []
    waits = 0

    def idle() -> None:
        nonlocal waits
        waits += 1

    graph.client.on_log = lambda e: seen.append((e.message, waits, time.monotonic()))
    graph.client.on_idle = idle
    (result,) = graph.build(slow)
    replied = time.monotonic()
    assert result["status"] == "built"
    lines = [(m, w) for m, w, _ in seen if m.split()[-1].startswith("quick")]
    assert len(lines) == 20  # building and built, for each
    assert len({w for _, w in lines}) <= 10
    (started,) = [t for m, _, t in seen if m == "building slow"]
    assert replied - started > 0.4


def test_progress_lines_and_status_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from daemon.cli.build import Progress
    from daemon.wire.protocol import Log, LogKind

    written: list[str] = []
    monkeypatch.setattr(os, "write", lambda fd, data: written.append(data.decode()) or len(data))
    a = "/store/" + "a" * 32 + "-a.drv"
    events = [
        Log(1, "2 derivations to build, 0 present", 0, 2, LogKind.NOTE),
        Log(1, "building a", kind=LogKind.STARTED, drv=a),
        Log(1, "a> compiling", kind=LogKind.LINE, drv=a),
        Log(1, "built a", 1, 2, LogKind.BUILT, a),
    ]
    plain = Progress(show_logs=False, terminal=False)
    for e in events:
        plain.update(e)
    assert written == []  # gathered until the client waits for the daemon again
    plain.flush()
    assert written == ["[0/2] 2 derivations to build, 0 present\nbuilding a\n[1/2] built a\n"]
    written.clear()
    term = Progress(show_logs=True, terminal=True)
    for e in events[:3]:
        term.update(e)
    term.finish()
    out = "".join(written)
    assert "[0/2 built] running: a" in out and "a> compiling\n" in out
    assert out.endswith("\r\x1b[K")


def test_the_client_tells_log_lines_from_notes_by_their_kind_not_their_words(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from daemon.cli.build import Progress
    from daemon.wire.protocol import Log, LogKind

    written: list[str] = []
    monkeypatch.setattr(os, "write", lambda fd, data: written.append(data.decode()) or len(data))
    plain = Progress(show_logs=False, terminal=False)
    plain.update(Log(1, "a> looks like a log line", kind=LogKind.NOTE))
    plain.update(Log(1, "says nothing of its name", kind=LogKind.LINE, drv="/store/x-a.drv"))
    plain.finish()
    assert written == ["a> looks like a log line\n"]


def test_progress_reaches_the_client_as_typed_events(graph: Graph) -> None:
    seen: list[tuple[str | None, str | None, str]] = []
    graph.client.on_log = lambda e: seen.append((e.kind, e.drv, e.message))
    talker = graph.sh("talker", "echo hello; echo x > $out")
    (result,) = graph.build(talker)
    assert result["status"] == "built"
    assert seen == [
        ("note", None, "1 derivations to build, 0 present"),
        ("started", talker.path, "building talker"),
        ("line", talker.path, "talker> hello"),
        ("built", talker.path, "built talker"),
    ]


def test_a_dependent_never_builds_when_its_inputs_registration_fails(graph: Graph) -> None:
    # Dependents start once an input's outputs are registered.  Here a trigger fails that
    # registration, slowly, after the outputs were put in place.
    victim = graph.sh("victim", "echo victim > $out")
    dependent = graph.sh("dependent", f"cat {victim} > $out")
    db = apsw.Connection(str(graph.daemon.state / "var" / "db" / "db.sqlite"))
    db.execute(
        "CREATE TRIGGER refuse_victim BEFORE INSERT ON ValidPaths WHEN NEW.path = ? "
        "BEGIN SELECT RAISE(ABORT, 'refused by the test') "
        "WHERE length(hex(randomblob(40000000))) > 0; END".replace("?", f"'{victim.out}'")
    )
    by_drv = {r["drv"]: r for r in graph.build(victim, dependent)}
    assert by_drv[victim.path]["status"] == "failed"
    assert "refused by the test" in by_drv[victim.path]["message"]
    assert by_drv[dependent.path]["status"] == "dependency-failed"
    assert victim.path in by_drv[dependent.path]["message"]
    assert ("building dependent", None) not in graph.logs
    assert not os.path.exists(victim.out)
    assert not os.path.exists(dependent.out)
    assert graph.client.call("is-valid", paths=[victim.out, dependent.out]) == []
    db.execute("DROP TRIGGER refuse_victim")
    db.close()
    assert [r["status"] for r in graph.build(dependent)] == ["built"]
    assert Path(dependent.out).read_text() == "victim\n"


# A build notes its network namespace, the TCP sockets it finds at its start and whether
# TIME_WAIT is kept, then makes a loopback connection whose server closes first (which
# leaves the server's port in TIME_WAIT, if it is kept).
NETWORK_SCRIPT = (
    "readlink /proc/self/ns/net > $out; tail -n +2 /proc/net/tcp | wc -l >> $out; "
    "cat /proc/sys/net/ipv4/tcp_max_tw_buckets >> $out; "
    "nc -l -p 5555 -e true & sleep 0.2; nc 127.0.0.1 5555 </dev/null; wait"
)


def test_network_namespaces_are_reused_one_build_at_a_time_and_clean(graph: Graph) -> None:
    chain = [graph.sh("net0", NETWORK_SCRIPT)]
    for i in range(1, 5):
        chain.append(graph.sh(f"net{i}", f": {chain[-1]}; {NETWORK_SCRIPT}"))
    (result,) = graph.build(chain[-1])
    assert result["status"] == "built"
    seen = [Path(d.out).read_text().split() for d in chain]
    namespaces = [ns for ns, _, _ in seen]
    assert len(set(namespaces)) < len(namespaces), namespaces  # some were reused
    assert all(sockets == "0" and tw == "0" for _, sockets, tw in seen), seen
    # Builds running at once never share one.
    script = "readlink /proc/self/ns/net > $out; sleep 0.5"
    apart = [graph.sh(f"apart{i}", script, env={"I": str(i)}) for i in range(3)]
    assert [r["status"] for r in graph.build(*apart, max_jobs=3)] == ["built"] * 3
    assert len({Path(d.out).read_text() for d in apart}) == 3


def test_reuse_network_namespaces_false_gives_every_build_a_new_one(tmp_path: Path) -> None:
    state = Path(tempfile.mkdtemp(prefix="weft-build-", dir="/var/tmp")) / "state"
    state.mkdir()
    (state / "weft.toml").write_text("reuse-network-namespaces = false\n")
    d = start_daemon(state)
    graph = Graph(d)
    try:
        # As in the test above; here the TIME_WAIT sockets are kept, but in namespaces
        # no later build gets.
        chain = [graph.sh("fresh0", NETWORK_SCRIPT)]
        for i in range(1, 5):
            chain.append(graph.sh(f"fresh{i}", f": {chain[-1]}; {NETWORK_SCRIPT}"))
        assert [r["status"] for r in graph.build(chain[-1])] == ["built"]
        seen = [Path(d.out).read_text().split() for d in chain]
        assert all(sockets == "0" and tw != "0" for _, sockets, tw in seen), seen
    finally:
        graph.close()
        stop_daemon(d)
        shutil.rmtree(state.parent, ignore_errors=True)


def test_a_sandbox_that_cannot_be_made_fails_the_build_not_the_daemon(graph: Graph) -> None:
    broken = derivation("broken", "/nonexistent/builder", [])
    fine = graph.sh("fine-after", "echo ok > $out")
    by_drv = {r["drv"]: r for r in graph.build(broken, fine, keep_going=True)}
    assert by_drv[broken.path]["status"] == "failed"
    assert by_drv[broken.path]["message"].startswith(
        f"builder for '{broken.path}' could not be started: sandbox setup failed at exec"
    )
    assert by_drv[fine.path]["status"] == "built"


def test_a_derivation_whose_outputs_do_not_follow_from_its_inputs_is_refused(
    graph: Graph,
) -> None:
    # Added through the daemon, it is checked as it is added.
    honest = graph.sh("honest", "echo honest > $out")
    other = graph.sh("other", "echo other > $out")
    forged = dataclasses.replace(
        honest.drv,
        outputs={"out": Output(other.out)},
        env={**honest.drv.env, "out": other.out},
    )
    # Refused as it is added, or, if added, when asked to build.
    with pytest.raises(DaemonError, match="output paths do not match the derivation"):
        path = graph.client.call(
            "add-text", name="honest.drv", text=forged.to_json(), references=forged.references()
        )["path"]
        graph.client.call("build", drvs=[path])
    assert not os.path.exists(other.out)

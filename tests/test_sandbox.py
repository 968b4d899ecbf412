"""Real builders (Debian's static busybox, from the store) in real namespaces."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
BUILD_UID = 30001
NOBODY = 65534

CHECKS = r"""
echo "uid=$(id -u) gid=$(id -g)"
echo "pid=$$"
echo "hostname=$(hostname)"
echo "ifaces=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\n' ,)"
echo "root=$(ls -A / | tr '\n' ,)"
echo "procs=$(ls /proc | grep -c '^[0-9]')"
for p in /root /etc/shadow "$STATE/var/daemon.sock" "$STATE/var/db" /var/lib/weft; do
  if [ -e "$p" ]; then echo "visible=$p"; fi
done
if echo x > "$BB/intruder" 2>/dev/null; then echo "input=writable"; else echo "input=read-only"; fi
touch /build/suid
if chmod 4755 /build/suid 2>/dev/null; then echo "chmod=allowed"; else echo "chmod=refused"; fi
if [ -u /build/suid ]; then echo "setuid=present"; else echo "setuid=absent"; fi
echo "cwd=$(pwd) umask=$(umask) env=$(env | cut -d= -f1 | sort | tr '\n' ,)"
status=/proc/self/status
echo "caps=$(grep CapEff $status | cut -f2) nnp=$(grep NoNewPrivs $status | cut -f2)"
echo "core=$(ulimit -c)"
mkdir "$out" && echo built > "$out/result"
exit 3
"""


@pytest.fixture
def state() -> Iterator[Path]:
    # Not under /tmp: the sandbox mounts its own /tmp over that path.
    d = Path(tempfile.mkdtemp(prefix="weft-spawn-", dir="/var/tmp"))
    d.chmod(0o755)
    yield d / "state"
    shutil.rmtree(d, ignore_errors=True)


def drive(
    state: Path, script: str, *extra: str, uid: int = BUILD_UID, as_nobody: bool = False
) -> dict:
    python, env = sys.executable, None
    if as_nobody:
        # The system interpreter with the venv's packages: the venv's python may link to
        # an interpreter under a directory only root can enter (pyenv in /root).
        python = "/usr/bin/python3"
        env = {**os.environ, "PYTHONPATH": f"{ROOT}:{sysconfig.get_paths()['purelib']}"}
    cmd = [python, "-m", "tests.sandbox_driver", str(state), str(uid), script, *extra]
    if as_nobody:
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def parse(log: str) -> dict[str, str]:
    """`key=value` lines; `visible=P` lines become keys `visible:P`."""
    found: dict[str, str] = {}
    for line in log.splitlines():
        key, _, value = line.partition("=")
        if key == "visible":
            key = f"visible:{value}"
        found[key] = value
    return found


def check_sandbox(result: dict, state: Path) -> None:
    assert result["code"] == 3, result
    seen = parse(result["log"])
    assert seen["uid"] == "1000 gid=100"
    assert seen["pid"] == "1"
    assert seen["hostname"] == "localhost"
    assert seen["ifaces"] == "lo,"
    top = str(state).split("/")[1]
    assert seen["root"] == ",".join(sorted(["build", "dev", "etc", "proc", "tmp", top])) + ","
    assert int(seen["procs"]) <= 4
    assert not [k for k in seen if k.startswith("visible:")], seen
    assert seen["input"] == "read-only"
    assert seen["chmod"] == "refused"
    assert seen["setuid"] == "absent"
    assert seen["cwd"] == "/build umask=0022 env=BB,HOME,PATH,PWD,SHLVL,STATE,STORE_OUT,out,"
    assert seen["caps"] == "0000000000000000 nnp=1"
    assert seen["core"] == "0"
    assert result["left_running"] == []


def test_builder_sees_only_its_sandbox(state: Path) -> None:
    check_sandbox(drive(state, CHECKS), state)


def test_same_sandbox_with_the_daemon_as_an_ordinary_user(state: Path) -> None:
    state.parent.chmod(0o777)
    result = drive(state, CHECKS, uid=NOBODY, as_nobody=True)
    check_sandbox(result, state)


def test_a_fixed_output_build_gets_a_network_namespace_of_its_own_not_the_hosts(
    state: Path,
) -> None:
    script = "readlink /proc/self/ns/net; tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '"
    result = drive(state, script, "--network")
    netns, *interfaces = result["log"].split()
    assert netns != os.readlink("/proc/self/ns/net")
    # Its loopback, and pasta's tap named as the host's interface with the default route.
    route = subprocess.run(["ip", "route", "show", "default"], capture_output=True, text=True)
    outside = route.stdout.split()[route.stdout.split().index("dev") + 1]
    assert sorted(interfaces) == sorted(["lo", outside])


def test_daemonised_grandchildren_do_not_outlive_the_builder(state: Path) -> None:
    script = "(sleep 1000 &) ; setsid sleep 1000 & nohup sleep 1000 >/dev/null 2>&1 & exit 0"
    result = drive(state, script)
    assert result["code"] == 0
    assert result["left_running"] == []


def test_builder_ignoring_sigterm_is_killed_on_timeout(state: Path) -> None:
    result = drive(state, "trap '' TERM; while :; do sleep 1; done", "--timeout", "1")
    assert result["code"] == -signal.SIGKILL
    assert result["elapsed"] < 5
    assert result["left_running"] == []


def test_spawner_killed_mid_build_is_replaced(state: Path) -> None:
    script = 'sleep 1; echo x > /tmp/x && mkdir "$STORE_OUT" && echo first build done'
    result = drive(state, script, "--kill-spawner-after", "0.2")
    assert result["spawner_restarts"] == 1
    # The running builder belongs to the daemon, not to the dead spawner; its sandbox is
    # whole (the next spawner removes the dead one's scratch directory only once unused).
    assert result["code"] == 0 and "first build done" in result["log"], result
    assert "weft-test-output" in result["outputs"]
    assert result["second_code"] == 0
    assert result["second_log"].strip() == "second build ok"


def test_a_spare_whose_spawner_died_before_its_exec_starts_no_builder(state: Path) -> None:
    result = drive(state, "touch /build/ran; sleep 1000", "--spawner-dies-before-exec")
    assert result["spawner_died"]
    assert not result["builder_ran"] and result["left_running"] == [], result


def test_a_builder_whose_requester_gave_up_is_killed(state: Path) -> None:
    result = drive(state, "sleep 1000", "--cancel-after", "0.001")
    assert result["cancelled"]
    assert result["left_running"] == []


def test_a_dead_spare_is_replaced(state: Path) -> None:
    result = drive(state, "echo built", "--kill-spare")
    assert result["spares_killed"] == 1
    assert result["code"] == 0 and result["log"].strip() == "built"


def test_setup_errors_name_the_step(state: Path) -> None:
    result = drive(state, "true", "--builder", "/nonexistent/builder")
    assert result["setup_error"] == {
        "step": "exec",
        "errno": errno.ENOENT,
        "path": "/nonexistent/builder",
        "message": os.strerror(errno.ENOENT),
    }


def test_a_state_dir_deep_down_works(state: Path) -> None:
    # 450 bytes: SQLite opens no database past 512, and the skeleton's path comes on top.
    deep = state.parent.joinpath(*["a-rather-long-directory-name-to-go-deep"] * 10, "state")
    deep.parent.mkdir(parents=True)
    result = drive(deep, 'mkdir -p "$STORE_OUT" && echo made > "$STORE_OUT/file"')
    assert result["code"] == 0, result
    assert "weft-test-output" in result["outputs"]


def test_outputs_land_in_the_sandbox_store_dir(state: Path) -> None:
    result = drive(state, 'mkdir -p "$STORE_OUT" && echo made > "$STORE_OUT/file"')
    assert result["code"] == 0
    assert "weft-test-output" in result["outputs"]


def test_a_thousand_builds_leave_no_zombie(state: Path) -> None:
    result = drive(state, "(sleep 0.01 &) ; exit 0", "--repeat", "1000")
    assert result["codes"] == [0] * 1000
    assert result["zombies"] == 0
    # The spawner holds the newest builder's mount namespace only (`release_mounts`).
    assert result["held_mount_namespaces"] == 1


def test_build_slots_map_to_their_own_host_ids() -> None:
    from daemon.proc.spawner import build_ids

    assert build_ids(0, 30000, 64) == (30000, 30000)
    assert build_ids(5, 30000, 64) == (30005, 30005)
    with pytest.raises(ValueError, match="outside"):
        build_ids(64, 30000, 64)
    with pytest.raises(ValueError, match="daemon's uid"):
        build_ids(0, 0, 64)


def test_spawn_messages_read_back_and_both_ends_word_a_failed_step_alike() -> None:
    from daemon.proc.spawner import SpawnError
    from daemon.wire.packets import pack, unpack
    from daemon.wire.spawner import (
        SetupFailure,
        Spawned,
        SpawnRequest,
        decode_reply,
        decode_request,
        encode_reply,
        encode_request,
    )
    from spawner.sandbox import SetupError

    request = SpawnRequest(
        builder="/store/abc-sh/bin/sh",
        root="/var/tmp/slot-0",
        build_dir="/var/tmp/build-0",
        store_dir="/store",
        host_uid=30000,
        host_gid=30000,
        args=["-c", "true"],
        env={"out": "/store/def-out"},
        inputs=["/store/abc-sh"],
        network=True,
        freezer="/sys/fs/cgroup/weft",
    )
    rid, fields = unpack(pack(5, encode_request(request)))
    assert (rid, decode_request(fields)) == (5, request)
    failure = SetupFailure("bind mount", errno.EPERM, "/store/abc-sh", "Operation not permitted")
    for reply in (Spawned(123, "/sys/fs/cgroup/weft/1-0"), failure):
        assert decode_reply(unpack(pack(5, encode_reply(reply)))[1]) == reply
    error = SetupError("bind mount", errno.EPERM, "/store/abc-sh", "Operation not permitted")
    assert error.failure == failure
    assert str(error) == "bind mount: Operation not permitted (/store/abc-sh)"
    assert str(SpawnError(failure)) == (
        "sandbox setup failed at bind mount: Operation not permitted (/store/abc-sh)"
    )


def _slot_preparer(tmp_path: Path) -> tuple[Path, Path, Callable[[list[Path]], None]]:
    """A store dir, a build slot's store dir, and `prepare_root` for requests of inputs."""
    from daemon.wire.spawner import SpawnRequest
    from spawner.sandbox import make_skeleton, prepare_root

    store = tmp_path / "store"
    store.mkdir()
    root = tmp_path / "root"
    skeleton = make_skeleton(str(tmp_path / "spawner"))

    def prepare(inputs: list[Path]) -> None:
        request = SpawnRequest(
            builder="/bin/true",
            root=str(root),
            build_dir=str(tmp_path / "build"),
            store_dir=str(store),
            host_uid=os.geteuid(),
            host_gid=os.getegid(),
            inputs=[str(p) for p in inputs],
        )
        prepare_root(request, skeleton)

    return store, root / str(store).lstrip("/"), prepare


def test_mount_points_are_kept_only_while_they_are_still_mount_points(tmp_path: Path) -> None:
    store, slot_store, prepare = _slot_preparer(tmp_path)
    tree, text, link = store / "aaa-tree", store / "bbb-text", store / "ccc-link"
    (tree / "bin").mkdir(parents=True)
    text.write_text("x")
    link.symlink_to("aaa-tree")
    prepare([tree, text, link])
    kept = (slot_store / "aaa-tree").stat().st_ino
    # What a builder could leave under the names of inputs (after a crash of the daemon,
    # which otherwise empties the slot's store dir but for mount points): a full directory,
    # a file with content, a symlink elsewhere.
    (slot_store / "bbb-text").write_text("left by a builder")
    (slot_store / "ccc-link").unlink()
    (slot_store / "ccc-link").symlink_to("/etc")
    prepare([tree, text, link])
    assert (slot_store / "aaa-tree").stat().st_ino == kept
    assert (slot_store / "bbb-text").read_text() == ""
    assert os.readlink(slot_store / "ccc-link") == "aaa-tree"
    (slot_store / "aaa-tree" / "junk").mkdir()
    (slot_store / "aaa-tree" / "junk").chmod(0o500)
    prepare([tree, text, link])
    assert os.listdir(slot_store / "aaa-tree") == []
    assert sorted(os.listdir(slot_store)) == ["aaa-tree", "bbb-text", "ccc-link"]


def test_what_an_earlier_build_left_in_the_slot_store_dir_goes(tmp_path: Path) -> None:
    store, slot_store, prepare = _slot_preparer(tmp_path)
    (store / "aaa-input").write_text("x")
    (store / "eee-other").write_text("y")
    prepare([store / "eee-other", store / "aaa-input"])
    # The daemon leaves an earlier build's mount points; a crash may leave its outputs.
    (slot_store / "fff-output" / "bin").mkdir(parents=True)
    (slot_store / "fff-output" / "bin").chmod(0o500)
    prepare([store / "aaa-input"])
    assert os.listdir(slot_store) == ["aaa-input"]


def test_a_mount_point_left_for_another_path_is_renamed_rather_than_made_anew(
    tmp_path: Path,
) -> None:
    store, slot_store, prepare = _slot_preparer(tmp_path)
    (store / "aaa-file").write_text("a")
    (store / "bbb-file").write_text("b")
    (store / "ccc-dir").mkdir()
    prepare([store / "aaa-file"])
    first = (slot_store / "aaa-file").stat().st_ino
    prepare([store / "bbb-file", store / "ccc-dir"])
    assert sorted(os.listdir(slot_store)) == ["bbb-file", "ccc-dir"]
    assert (slot_store / "bbb-file").stat().st_ino == first
    assert (slot_store / "ccc-dir").is_dir()


def test_a_spare_is_cloned_right_into_its_cgroup(tmp_path: Path) -> None:
    """Not moved there once cloned (which takes locks that sometimes wait long): that is
    `make_spare`'s fallback, for kernels without clone3's CLONE_INTO_CGROUP."""
    from daemon.sched.freezer import Freezer
    from spawner.sandbox import make_skeleton
    from spawner.spares import start_spare

    freezer = Freezer.find(f"test-{os.getpid()}")
    assert freezer is not None and freezer.version == 2
    cgroup = freezer.base / "spare"
    cgroup.mkdir()
    try:
        spare = start_spare(make_skeleton(str(tmp_path / "spawner")), "own", str(cgroup))
        try:
            assert (cgroup / "cgroup.procs").read_text().split() == [str(spare.pid)]
        finally:
            spare.close()
            os.kill(spare.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (cgroup / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        freezer.close()


def test_a_network_namespace_is_lent_again_only_once_its_holder_has_exited() -> None:
    from spawner.networks import Networks

    networks = Networks(shared=True)
    holder = subprocess.Popen(["sleep", "30"])
    netns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    networks.lend(netns, holder.pid)
    try:
        assert networks.take() is None
    finally:
        holder.kill()
        holder.wait()
    assert networks.take() == netns
    assert networks.take() is None
    os.close(netns)

"""The sandbox's /tmp on disk: the build slot's `var/builds/<slot>/tmp/`, bound at /tmp, so
that a `full` snapshot can keep what a build wrote there.  Real daemons, real sandboxes,
real busybox; the slot's dir looked at from the host while the build runs."""

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from daemon.build import leftovers
from daemon.build.slots import TMP_MODE, prepare_workdir
from daemon.proc.spawner import build_ids
from daemon.settings import Settings
from daemon.wire.spawner import SpawnRequest, decode_request, encode_request
from spawner.sandbox import SetupError, check_tmp_dir
from spawner.spares import _for_spare
from tests.daemon_fixtures import DaemonProc, Graph

# How long the host side waits for what a builder does, and a builder for the host.
WAIT = 30.0
POLL = 0.05
# One slot, so that every build of a test runs in slot 0.


def _slot(d: DaemonProc, index: int = 0) -> Path:
    return d.state / "var" / "builds" / str(index)


def _wait_for(what: object, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not what():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(POLL)


def _in_tmp_of_its_own(graph: Graph) -> set[str]:
    """What a sandbox's /tmp holds that no build put there: the mount point of the store
    dir, when the state dir lies under /tmp."""
    store = graph.daemon.store_dir
    return {store.split("/")[2]} if store.startswith("/tmp/") else set()


def _build_in_thread(graph: Graph, *drvs: object, **args: object) -> tuple[threading.Thread, list]:
    results: list = []
    thread = threading.Thread(target=lambda: results.extend(graph.build(*drvs, **args)))
    thread.start()
    return thread, results


def test_what_a_builder_writes_to_tmp_is_in_its_slots_tmp_dir_while_it_runs(
    one_slot: Graph,
) -> None:
    graph = one_slot
    token = uuid.uuid4().hex
    # The builder writes /tmp/x, then waits for the host to answer in /tmp/go: both
    # ways through the same directory, while the sandbox stands.
    script = f"""
echo {token} > /tmp/x
i=0
while [ ! -e /tmp/go ]; do sleep {POLL}; i=$((i+1)); [ $i -gt {int(WAIT / POLL)} ] && exit 9; done
{{
  cat /tmp/go
  stat -f -c %T /tmp
  stat -c %d /tmp
  grep ' /tmp ' /proc/self/mountinfo | tail -n 1
}} > $out
"""
    drv = graph.sh("tmp-live", script)
    thread, results = _build_in_thread(graph, drv)
    try:
        tmp = _slot(graph.daemon) / "tmp"
        _wait_for(lambda: (tmp / "x").exists() and (tmp / "x").read_text() == f"{token}\n")
        uid, gid = build_ids(0, Settings().build_uid_base, 1)
        assert ((tmp / "x").stat().st_uid, (tmp / "x").stat().st_gid) == (uid, gid)
        (tmp / "go").write_text(f"go {token}\n")
    finally:
        thread.join(WAIT * 2)
    assert [r["status"] for r in results] == ["built"], results
    answer, fs_type, device, mount = Path(drv.out).read_text().splitlines()
    assert answer == f"go {token}"
    assert fs_type != "tmpfs"
    assert int(device) == tmp.stat().st_dev
    # mountinfo: id, parent, dev, the root of the mount within its file system, where.
    fields = mount.split()
    assert fields[3].endswith("/var/builds/0/tmp") and fields[4] == "/tmp", mount
    assert {"nosuid", "nodev"} <= set(fields[5].split(",")), mount
    # Emptied once the build is done, the slot ready for the next: but for the store dir's
    # mount point, kept for the next build (daemon/build/slots.py).
    assert sorted(os.listdir(tmp)) == sorted(_in_tmp_of_its_own(graph))


def test_the_next_build_in_the_slot_finds_tmp_empty_whatever_the_last_one_left(
    one_slot: Graph,
) -> None:
    graph = one_slot
    # Hard to delete: a read-only tree, a file nobody may read, a fifo, a dangling
    # symlink, a symlink to the host's /etc.
    mess = graph.sh(
        "tmp-mess",
        "mkdir -p /tmp/ro/deep && echo x > /tmp/ro/deep/f && chmod 0500 /tmp/ro/deep /tmp/ro;"
        " echo y > /tmp/secret && chmod 0 /tmp/secret; mkfifo /tmp/fifo;"
        " ln -s /nowhere /tmp/dangling; ln -s /etc /tmp/etc; exit 3",
    )
    (failed,) = graph.build(mess)
    assert failed["status"] == "failed"
    tmp = _slot(graph.daemon) / "tmp"
    assert sorted(os.listdir(tmp)) == sorted(_in_tmp_of_its_own(graph))
    assert Path("/etc/passwd").exists()  # the symlink was removed, not followed
    looks = graph.sh("tmp-looks", "ls -A /tmp > $out; echo z > /tmp/z")
    assert [r["status"] for r in graph.build(looks)] == ["built"]
    assert set(Path(looks.out).read_text().split()) == _in_tmp_of_its_own(graph)
    assert sorted(os.listdir(tmp)) == sorted(_in_tmp_of_its_own(graph))


def test_tmp_is_sticky_and_the_build_users_to_write_in_not_to_change(one_slot: Graph) -> None:
    graph = one_slot
    script = """
{
  stat -c '%a %u' /tmp
  touch /tmp/mine && stat -c 'mine %a %u' /tmp/mine
  if chmod 0777 /tmp 2>/dev/null; then echo chmod-allowed; else echo chmod-refused; fi
  touch /tmp/suid
  if chmod 4755 /tmp/suid 2>/dev/null; then echo setuid-allowed; else echo setuid-refused; fi
  stat -c '%a' /tmp
} > $out
"""
    drv = graph.sh("tmp-perms", script)
    assert [r["status"] for r in graph.build(drv)] == ["built"]
    # Inside, the daemon's tmp/ is nobody's (an unmapped uid), as the tmpfs was.
    assert Path(drv.out).read_text().splitlines() == [
        "1777 65534",
        "mine 644 1000",
        "chmod-refused",
        "setuid-refused",
        "1777",
    ]
    # On the host: tmp/ the daemon's, 1777; the slot's own dir the daemon's alone, so
    # nobody else can plant anything (a symlink) in place of tmp/.
    work = _slot(graph.daemon)
    tmp = os.lstat(work / "tmp")
    assert stat.S_ISDIR(tmp.st_mode) and stat.S_IMODE(tmp.st_mode) == TMP_MODE
    assert (tmp.st_uid, tmp.st_gid) == (os.geteuid(), os.getegid())
    slot = os.lstat(work)
    assert stat.S_IMODE(slot.st_mode) == 0o700 and slot.st_uid == os.geteuid()


def test_laying_a_slot_out_replaces_a_planted_tmp_and_fixes_its_mode_and_owner(
    tmp_path: Path,
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("not the slot's")
    work = tmp_path / "builds" / "0"
    work.mkdir(parents=True)
    (work / "tmp").symlink_to(outside)
    prepare_workdir(work, "/nix/store", 30000, 30000)
    tmp = os.lstat(work / "tmp")
    assert stat.S_ISDIR(tmp.st_mode) and stat.S_IMODE(tmp.st_mode) == TMP_MODE
    assert (outside / "keep").read_text() == "not the slot's"
    # A tmp/ the builder's, without its sticky bit, holding what a build left.
    os.chown(work / "tmp", 30000, 30000)
    os.chmod(work / "tmp", 0o777)
    (work / "tmp" / "left").mkdir()
    (work / "tmp" / "left" / "f").write_text("x")
    os.chmod(work / "tmp" / "left", 0)
    prepare_workdir(work, "/nix/store", 30000, 30000)
    tmp = os.lstat(work / "tmp")
    assert stat.S_IMODE(tmp.st_mode) == TMP_MODE
    assert (tmp.st_uid, tmp.st_gid) == (os.geteuid(), os.getegid())
    assert os.listdir(work / "tmp") == []


def test_a_request_without_a_tmp_dir_is_what_it_was_before_tmp_dirs() -> None:
    request = SpawnRequest(
        builder="/s/b", root="/r", build_dir="/b", store_dir="/s", host_uid=1, host_gid=2
    )
    fields = encode_request(request)
    assert "tmp_dir" not in fields
    assert decode_request(dict(fields)) == request
    assert b"tmp" not in _for_spare(request, ["/s/in"], 7).split(b"\0")
    with_tmp = SpawnRequest(**{**vars(request), "tmp_dir": "/w/tmp"})
    fields = encode_request(with_tmp)
    assert fields["tmp_dir"] == "/w/tmp"
    assert decode_request(dict(fields)) == with_tmp
    # After the binds, before a plan (spare.c).
    strings = _for_spare(with_tmp, ["/s/in"], 7).split(b"\0")[:-1]
    assert strings[-4:] == [b"1", b"/s/in", b"tmp", b"/w/tmp"]


def test_the_spawner_refuses_a_tmp_dir_that_is_a_symlink_or_relative(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    base = {"builder": "/s/b", "root": "/r", "build_dir": "/b", "store_dir": "/s"}

    def check(tmp_dir: str) -> None:
        check_tmp_dir(SpawnRequest(**base, host_uid=1, host_gid=1, tmp_dir=tmp_dir))

    check(str(real))
    check("")
    for bad, err in ((tmp_path / "link", "not a directory"), ("rel/tmp", "not an absolute path")):
        with pytest.raises(SetupError) as e:
            check(str(bad))
        assert e.value.failure.step == "tmp dir" and e.value.failure.message == err
    with pytest.raises(SetupError, match="No such file"):
        check(str(tmp_path / "missing"))


@pytest.mark.parametrize("where", ["/var/tmp", "/tmp"])
def test_a_leftover_sitting_in_a_slots_tmp_dir_is_swept_and_an_onlooker_is_not(
    where: str,
) -> None:
    builds = Path(tempfile.mkdtemp(prefix="weft-sweep-tmp-", dir=where)) / "builds"
    work = builds / "3"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        prepare_workdir(work, "/nix/store", 30003, 30003)
        # In a pid namespace of its own, as every builder is; its working directory the
        # slot's tmp dir (a builder that did `cd /tmp`).
        leftover = subprocess.Popen(["unshare", "--pid", "--fork", "sleep", "60"], cwd=work / "tmp")
        onlooker = subprocess.Popen(["sleep", "60"], cwd=work / "tmp")
        procs = [leftover, onlooker]
        _wait_for(lambda: leftovers.find(leftovers.build_dirs(builds)))
        assert leftovers.sweep_slot(work) == []
        assert leftover.wait(WAIT) != 0  # its child killed, unshare reports it
        assert onlooker.poll() is None
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()
        shutil.rmtree(builds.parent, ignore_errors=True)

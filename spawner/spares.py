"""The spare: a process in fresh namespaces, ready to become the next builder.

The spare program (`spare.c`, started by posix_spawn) clones itself into new user, mount,
pid, ipc and uts namespaces and exits; its clone, pid 1 of the new pid namespace and
orphaned, is adopted by the nearest subreaper, the daemon, whose process monitor reaps it.
The spare mounts what every sandbox has and waits on a socket of its own for the request
that makes it a builder.  Here is the spawner's side of it: starting one, in a cgroup of
its own in the daemon's freezer directory (where its builder's whole tree will be: the
daemon freezes that cgroup to pause the build, and removes it after) and in a network
namespace `networks.py` lends it, or of its own (connected by pasta for a fixed-output
build: `pasta.py`); then writing its uid and gid maps (only a process outside the new user
namespace may) and handing it the request and the log pipe.  With the request goes the
pid of the spare's parent (the daemon, which adopted it) as the spawner sees it: the
builder dies with that process, and does not start if it has died already (`spare.c`).
"""

import contextlib
import errno
import itertools
import os
import select
import socket
from dataclasses import dataclass

from daemon.wire.packets import outgoing, unpack
from daemon.wire.spawner import (
    Plan,
    SetupFailure,
    Spawned,
    SpawnReply,
    SpawnRequest,
    decode_failure,
)
from spawner.networks import Networks
from spawner.pasta import Pasta, start_pasta, sync_host_files
from spawner.sandbox import BUILD_GID, BUILD_UID, SetupError, store_dir_of

# The program a spare execs into, built by install.sh from spare.c.
SPARE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weft-spare")
SPARE_MAGIC = "weft-spare-2"
# Where the spare program finds the cgroup to clone into, and a network namespace to join.
_CGROUP_FD = 5
_NETNS_FD = 6
# The read size on the spare program's pipes: its pid, or its report of a failed step (a
# msgpack map with a path, under 4,096 bytes), comes in one read.
_PIPE_READ = 1 << 16


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, _PIPE_READ):
        chunks.append(chunk)
    return b"".join(chunks)


def _reported(data: bytes) -> SetupFailure:
    """The spare program's report on its status pipe: an error reply without an id."""
    return decode_failure(unpack(data)[1])


def _for_spare(req: SpawnRequest, binds: list[str], parent: int) -> bytes:
    """The request as the spare reads it (spare.c): NUL-terminated strings; the slot's
    tmp dir after the binds, if it has one (else the same as before there was one); a
    plan's after the rest (runner.c)."""
    env = [f"{k}={v}" for k, v in req.env.items()]
    parts = [SPARE_MAGIC, req.builder, req.build_dir, store_dir_of(req), req.store_dir]
    parts.append(str(parent))
    for part in (req.args, env, binds):
        parts.append(str(len(part)))
        parts.extend(part)
    if req.tmp_dir:
        parts.extend(("tmp", req.tmp_dir))
    if req.plan is not None:
        parts.extend(_plan_for_runner(req.plan))
    if any("\0" in p for p in parts):
        raise SetupError("request", errno.EINVAL, "", "a NUL byte in the request")
    return b"".join(p.encode() + b"\0" for p in parts)


def _counted(items: list[str]) -> list[str]:
    return [str(len(items)), *items]


def _seconds(timeout: float | None) -> str:
    """A timeout as the runner reads it, and writes it into a hook's JSON: a JSON number
    (repr's are), or "" for none."""
    return "" if timeout is None else repr(timeout)


def _plan_for_runner(plan: Plan) -> list[str]:
    parts = ["plan", str(round(plan.grace * 1000)), *_counted(plan.declared)]
    parts.append(str(len(plan.environments)))
    for e in plan.environments:
        parts.append(e.name)
        parts.extend(_counted([f"{k}={v}" for k, v in e.variables.items()]))
    parts.append(str(len(plan.steps)))
    for s in plan.steps:
        parts.extend((s.kind, str(s.environment), s.label, s.command, *_counted(s.args)))
        parts.extend((_seconds(s.timeout), s.hook, s.wrapped_command, *_counted(s.wrapped_args)))
        parts.append(_seconds(s.wrapped_timeout))
    return parts


@dataclass
class Spare:
    """A process waiting in fresh namespaces for the request that makes it a builder."""

    pid: int
    proc_dir: int  # /proc/<pid>: pins this very process for the uid and gid maps
    ctl: socket.socket  # the request and the log pipe go to it here
    status: int  # close-on-exec pipe: EOF = exec happened; data = a setup error
    freezer: str  # the freezer directory it was made for ("" for none)
    cgroup: str  # its own cgroup in that directory, if it could be made there
    kept_network: bool = False  # its network namespace is one `Networks` lends
    pasta: Pasta | None = None  # what connects its network namespace, if anything does

    def waiting(self) -> bool:
        """Still alive and waiting: it never writes to its socket, it only closes it by
        dying (killed, say, or failing to settle); and its network still connected."""
        if self.pasta is not None and not self.pasta.alive():
            return False
        return not select.select([self.ctl], [], [], 0)[0]

    def close(self) -> None:
        """Drop it; a spare that got no request sees EOF and exits."""
        self.ctl.close()
        os.close(self.proc_dir)
        os.close(self.status)

    def discard(self) -> None:
        """Drop a spare that will never be a builder, its pasta, and its cgroup (once it
        is empty: else the daemon removes it when it stops)."""
        self.close()
        if self.pasta is not None:
            self.pasta.stop()
        _remove_cgroup(self.cgroup)

    def start(
        self, req: SpawnRequest, binds: list[str], log_fd: int, report_fd: int | None = None
    ) -> SpawnReply:
        """Make it the builder (or, with a plan and its report pipe, the session runner)."""
        try:
            self._write_maps(req)
        except OSError as e:
            return SetupFailure("uid map", e.errno or 0, e.filename or "", e.strerror or "")
        try:
            request = _for_spare(req, binds, self._parent())
            fds = log_fd if report_fd is None else (log_fd, report_fd)
            with outgoing(request, fds) as (buffers, ancillary):
                self.ctl.sendmsg(buffers, ancillary)
        except OSError as e:
            # The spare died before its request: its status pipe may say why.
            failure = _read_all(self.status)
            if failure:
                return _reported(failure)
            return SetupFailure("start builder", e.errno or 0, "", "the spare process died")
        failure = _read_all(self.status)
        if failure:
            return _reported(failure)
        return Spawned(self.pid, self.cgroup)

    def _parent(self) -> int:
        """Its parent's pid (the daemon's, which adopted it: a subreaper)."""
        fd = os.open("stat", os.O_RDONLY, dir_fd=self.proc_dir)
        try:
            stat = os.read(fd, _PIPE_READ)
        finally:
            os.close(fd)
        return int(stat.rsplit(b")", 1)[1].split()[1])

    def hold_mounts(self) -> int | None:
        """Its mount namespace, held open: see `Spawner.release_mounts` (`server.py`)."""
        try:
            return os.open("ns/mnt", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.proc_dir)
        except OSError:
            return None

    def deny_setgroups(self) -> None:
        """Before the gid map, and the same for every builder: done as the spare is made."""
        self._write("setgroups", "deny\n")

    def _write_maps(self, req: SpawnRequest) -> None:
        self._write("uid_map", f"{BUILD_UID} {req.host_uid} 1\n")
        self._write("gid_map", f"{BUILD_GID} {req.host_gid} 1\n")

    def _write(self, name: str, text: str) -> None:
        fd = os.open(name, os.O_WRONLY, dir_fd=self.proc_dir)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


_cgroup_names = itertools.count()


def _new_cgroup(freezer: str) -> str:
    """A cgroup of its own for the next spare, in the freezer directory; "" if none can
    be made (the build then runs outside, and the daemon pauses it with signals)."""
    if not freezer:
        return ""
    path = os.path.join(freezer, f"{os.getpid()}-{next(_cgroup_names)}")
    try:
        os.mkdir(path)
    except OSError:
        return ""
    return path


def make_spare(
    skeleton: str, network: bool, freezer: str = "", networks: Networks | None = None
) -> Spare:
    """Start the spare program, which clones the spare (in a cgroup of its own, in
    `freezer`; in a network namespace from `networks`, or of its own, which pasta connects
    if `network`) and reports its pid (spare.c)."""
    cgroup = _new_cgroup(freezer)
    try:
        try:
            spare = _start_networked(skeleton, network, cgroup, networks)
        except SetupError as e:
            if not cgroup or e.failure.step == "network":
                raise
            # A cgroup v1 freezer, or a kernel without clone3's CLONE_INTO_CGROUP: the
            # spare is moved there instead, while it waits.
            spare = _start_networked(skeleton, network, "", networks)
            try:
                with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                    f.write(str(spare.pid))
            except OSError:
                _remove_cgroup(cgroup)
                cgroup = ""
    except BaseException:
        _remove_cgroup(cgroup)
        raise
    spare.freezer, spare.cgroup = freezer, cgroup
    try:
        spare.deny_setgroups()
    except OSError as e:
        spare.discard()
        raise SetupError("uid map", e.errno or 0, "setgroups", e.strerror or str(e)) from e
    return spare


def _remove_cgroup(path: str) -> None:
    if path:
        with contextlib.suppress(OSError):
            os.rmdir(path)


def _start_networked(skeleton: str, network: bool, cgroup: str, networks: Networks | None) -> Spare:
    if network:
        return _start_connected(skeleton, cgroup)
    if networks is None or not networks.shared:
        return start_spare(skeleton, "own", cgroup)
    netns = networks.take()
    if netns is None:
        try:
            spare = start_spare(skeleton, "new", cgroup)
        except SetupError as e:
            if e.failure.step != "network namespace":
                raise
            # None of the host's user namespace can be made here (a container, say):
            # each spare makes its own from now on.
            networks.shared = False
            return start_spare(skeleton, "own", cgroup)
        try:
            netns = os.open("ns/net", os.O_RDONLY | os.O_CLOEXEC, dir_fd=spare.proc_dir)
        except OSError:
            return spare  # its namespace goes with it
    else:
        try:
            spare = start_spare(skeleton, f"join={_NETNS_FD}", cgroup, netns)
        except BaseException:
            os.close(netns)
            raise
    networks.lend(netns, spare.pid)
    spare.kept_network = True
    return spare


def _start_connected(skeleton: str, cgroup: str) -> Spare:
    """A spare with a network namespace of its own connected by pasta, for a fixed-output
    build: never one kept, which a build without the network would get next."""
    sync_host_files(skeleton)
    spare = start_spare(skeleton, "own", cgroup)
    try:
        spare.pasta = start_pasta(SPARE, spare.pid)
    except BaseException:
        spare.discard()
        raise
    return spare


def start_spare(skeleton: str, network: str, cgroup: str, netns: int = -1) -> Spare:
    """The spare the spare program clones, right into `cgroup` if one is given; `network`
    as spare.c reads it (own, new, or join=FD with `netns` the namespace)."""
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    pid_r, pid_w = os.pipe2(os.O_CLOEXEC)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    cgroup_fd = -1
    try:
        try:
            if cgroup:
                # Opened last, its number is above those posix_spawn's actions move fds
                # to (in order: one moved onto a number still to be read would be lost).
                cgroup_fd = _open_cgroup(cgroup)
            launcher = os.posix_spawn(
                SPARE,
                [SPARE, skeleton, network, *([str(_CGROUP_FD)] if cgroup else [])],
                {},
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, pid_w, 1),
                    (os.POSIX_SPAWN_DUP2, theirs.fileno(), 3),
                    (os.POSIX_SPAWN_DUP2, status_w, 4),
                    *([(os.POSIX_SPAWN_DUP2, cgroup_fd, _CGROUP_FD)] if cgroup else []),
                    *([(os.POSIX_SPAWN_DUP2, netns, _NETNS_FD)] if netns >= 0 else []),
                ],
            )
        except OSError as e:
            raise SetupError("start spare", e.errno or 0, SPARE, e.strerror or str(e)) from e
        finally:
            theirs.close()
            os.close(status_w)
            os.close(pid_w)
            if cgroup_fd >= 0:
                os.close(cgroup_fd)
        reported = _read_all(pid_r)
        os.waitpid(launcher, 0)
        if not reported:
            failure = _read_all(status_r)
            if not failure:
                raise SetupError("start spare", 0, SPARE, "the spare program reported no spare")
            step = _reported(failure)
            raise SetupError(step.step, step.errno, step.path, step.message)
        pid = int(reported)
        try:
            proc_dir = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise SetupError("clone", e.errno or 0, f"/proc/{pid}", e.strerror or str(e)) from e
    except BaseException:
        ours.close()
        os.close(status_r)
        raise
    finally:
        os.close(pid_r)
    return Spare(pid, proc_dir, ours, status_r, "", "")


def _open_cgroup(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise SetupError("start spare", e.errno or 0, path, e.strerror or str(e)) from e

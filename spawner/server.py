"""The spawner process: starts each builder from a spare in fresh namespaces, on the
daemon's word.

Started by the daemon before trio starts.  It keeps a spare ready: the spare program
(`spare.c`, started by posix_spawn) clones itself into new user, mount, pid, ipc and uts
namespaces and exits; its clone, pid 1 of the new pid namespace and orphaned, is adopted
by the nearest subreaper, the daemon, whose process monitor reaps it.  The spare mounts
what every sandbox has and waits on a socket of its own.  Unless the request shares the
host's network, the spare has a network namespace of its own: as root, one a finished
build left, or a new one the spawner then keeps for later builds (`networks.py`).

Given a freezer directory (`SpawnRequest.freezer`, learnt from the requests), each spare
is made in a cgroup of its own in it, where its builder's whole tree will be: the daemon
freezes that cgroup to pause the build, and removes it after.

For each request (a msgpack map on a SEQPACKET socket, the log pipe's write end in
SCM_RIGHTS) the spawner lays out the mount points, writes the spare's uid and gid maps
(only a process outside the new user namespace may) and passes it the request and the
log pipe; the spare binds the inputs, pivots and execs.  A setup error
comes back on a close-on-exec pipe (EOF with no data means the exec happened), and the
spawner answers the daemon with the builder's pid or the error: the step, errno and
path.  Then, unless another request waits, it makes the next spare: the clone and the
namespaces, most of a spawn's cost, are off the path from request to exec.
"""

import contextlib
import ctypes
import errno
import itertools
import os
import select
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import msgpack

from daemon.wire.packets import recv_packet, rights
from spawner.networks import Networks
from spawner.sandbox import (
    BUILD_GID,
    BUILD_UID,
    SetupError,
    SpawnRequest,
    make_skeleton,
    prepare_root,
    store_dir_of,
)

# The program a spare execs into, built by install.sh from spare.c.
SPARE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weft-spare")
SPARE_MAGIC = "weft-spare-1"
# Where the spare program finds a network namespace to join.
_NETNS_FD = 6
PR_SET_PDEATHSIG = 1


def _error(step: str, err: int, path: str, message: str) -> dict[str, Any]:
    return {"status": "error", "step": step, "errno": err, "path": path, "message": message}


def _error_of(e: BaseException) -> dict[str, Any]:
    if isinstance(e, SetupError):
        return _error(e.step, e.errno, e.path, e.message)
    if isinstance(e, OSError):
        return _error("setup", e.errno or 0, e.filename or "", e.strerror or str(e))
    return _error("setup", 0, "", f"{type(e).__name__}: {e}")


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _for_spare(req: SpawnRequest, binds: list[str]) -> bytes:
    """The request as the spare reads it (spare.c): NUL-terminated strings."""
    env = [f"{k}={v}" for k, v in req.env.items()]
    parts = [SPARE_MAGIC, req.builder, req.build_dir, store_dir_of(req), req.store_dir]
    for part in (req.args, env, binds):
        parts.append(str(len(part)))
        parts.extend(part)
    if any("\0" in p for p in parts):
        raise SetupError("request", errno.EINVAL, "", "a NUL byte in the request")
    return b"".join(p.encode() + b"\0" for p in parts)


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

    def waiting(self) -> bool:
        """Still alive and waiting: it never writes to its socket, it only closes it by
        dying (killed, say, or failing to settle)."""
        return not select.select([self.ctl], [], [], 0)[0]

    def close(self) -> None:
        """Drop it; a spare that got no request sees EOF and exits."""
        self.ctl.close()
        os.close(self.proc_dir)
        os.close(self.status)

    def discard(self) -> None:
        """Drop a spare that will never be a builder, and its cgroup (once it is empty:
        else the daemon removes it when it stops)."""
        self.close()
        _remove_cgroup(self.cgroup)

    def start(self, req: SpawnRequest, binds: list[str], log_fd: int) -> dict[str, Any]:
        try:
            self._write_maps(req)
        except OSError as e:
            return _error("uid map", e.errno or 0, e.filename or "", e.strerror or "")
        try:
            self.ctl.sendmsg([_for_spare(req, binds)], rights(log_fd))
        except OSError as e:
            # The spare died before its request: its status pipe may say why.
            failure = _read_all(self.status)
            if failure:
                return dict(msgpack.unpackb(failure))
            return _error("start builder", e.errno or 0, "", "the spare process died")
        failure = _read_all(self.status)
        if failure:
            return dict(msgpack.unpackb(failure))
        return {"status": "ok", "pid": self.pid, "cgroup": self.cgroup}

    def hold_mounts(self) -> int | None:
        """Its mount namespace, held open: see `Spawner.release_mounts`."""
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
    `freezer`, and unless `network` in a network namespace from `networks`, or of its own)
    and reports its pid (spare.c)."""
    cgroup = _new_cgroup(freezer)
    try:
        try:
            spare = _start_networked(skeleton, network, cgroup, networks)
        except SetupError:
            if not cgroup:
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
        return _start_spare(skeleton, "host", cgroup)
    if networks is None or not networks.shared:
        return _start_spare(skeleton, "own", cgroup)
    netns = networks.take()
    if netns is None:
        try:
            spare = _start_spare(skeleton, "new", cgroup)
        except SetupError as e:
            if e.step != "network namespace":
                raise
            # None of the host's user namespace can be made here (a container, say):
            # each spare makes its own from now on.
            networks.shared = False
            return _start_spare(skeleton, "own", cgroup)
        try:
            netns = os.open("ns/net", os.O_RDONLY | os.O_CLOEXEC, dir_fd=spare.proc_dir)
        except OSError:
            return spare  # its namespace goes with it
    else:
        try:
            spare = _start_spare(skeleton, f"join={_NETNS_FD}", cgroup, netns)
        except BaseException:
            os.close(netns)
            raise
    networks.lend(netns, spare.pid)
    spare.kept_network = True
    return spare


def _start_spare(skeleton: str, network: str, cgroup: str, netns: int = -1) -> Spare:
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
                [SPARE, skeleton, network, *(["5"] if cgroup else [])],
                {},
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, pid_w, 1),
                    (os.POSIX_SPAWN_DUP2, theirs.fileno(), 3),
                    (os.POSIX_SPAWN_DUP2, status_w, 4),
                    *([(os.POSIX_SPAWN_DUP2, cgroup_fd, 5)] if cgroup else []),
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
            raise (
                _setup_error(failure)
                if failure
                else SetupError("start spare", 0, SPARE, "the spare program reported no spare")
            )
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


def _setup_error(failure: bytes) -> SetupError:
    msg = msgpack.unpackb(failure)
    return SetupError(
        str(msg.get("step")),
        int(msg.get("errno") or 0),
        str(msg.get("path") or ""),
        str(msg.get("message")),
    )


class Spawner:
    def __init__(self, skeleton: str) -> None:
        self.skeleton = skeleton
        self.spares: dict[bool, Spare] = {}
        self.last_network = False
        self.freezer = ""  # the last request's
        self.reuse_network = True  # the last request's
        # Mount namespaces of the latest builders, held open (`release_mounts`).
        self.held: list[int] = []
        self.networks = Networks()

    def spawn(self, req: SpawnRequest, log_fd: int) -> dict[str, Any]:
        self.freezer, self.reuse_network = req.freezer, req.reuse_network
        try:
            binds = prepare_root(req, self.skeleton)
            spare = self.spares.pop(req.network, None)
            if spare is not None and (
                spare.freezer != req.freezer
                or (spare.kept_network and not req.reuse_network)
                or not spare.waiting()
            ):
                spare.discard()
                spare = None
            if spare is None:
                spare = make_spare(self.skeleton, req.network, req.freezer, self._networks())
        except SetupError as e:
            return _error_of(e)
        reply: dict[str, Any] = {"status": "error"}
        try:
            reply = spare.start(req, binds, log_fd)
            if reply["status"] == "ok" and (held := spare.hold_mounts()) is not None:
                self.held.append(held)
        finally:
            # A builder's cgroup is the daemon's to remove.
            if reply["status"] == "ok":
                spare.close()
            else:
                spare.discard()
        return reply

    def _networks(self) -> Networks | None:
        return self.networks if self.reuse_network else None

    def release_mounts(self) -> None:
        """Let go of the mount namespaces of all builders but the newest.  A builder whose
        namespace is held exits without unmounting its sandbox, which waits for every
        CPU; the spawner unmounts it here instead, after a later builder has started,
        off the path from one build to the next."""
        while len(self.held) > 1:
            os.close(self.held.pop(0))

    def keep_spare(self, network: bool) -> None:
        """Make a spare for the next request like the last one, if there is none."""
        if network not in self.spares:
            # A failure here comes back to the request that needs the spare.
            with contextlib.suppress(SetupError):
                self.spares[network] = make_spare(
                    self.skeleton, network, self.freezer, self._networks()
                )

    def close(self) -> None:
        for spare in self.spares.values():
            spare.discard()
        self.spares.clear()
        self.networks.close()
        for fd in self.held:
            os.close(fd)
        self.held.clear()


def _request(msg: dict[str, Any]) -> SpawnRequest:
    fields = {k: v for k, v in msg.items() if k in SpawnRequest.__dataclass_fields__}
    return SpawnRequest(**fields)


def serve(sock: socket.socket, spawner: Spawner) -> None:
    spawner.keep_spare(spawner.last_network)
    while True:
        try:
            data, fds, truncated = recv_packet(sock)
        except ConnectionResetError:
            return
        if not data and not fds:
            return
        rid = None
        req = None
        try:
            msg = msgpack.unpackb(data)
            rid = msg.get("id")
            if truncated or len(fds) != 1:
                reply = _error("request", errno.EINVAL, "", "a request carries one log fd")
            else:
                req = _request(msg)
                reply = spawner.spawn(req, fds[0])
        except Exception as e:
            reply = _error_of(e)
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(msgpack.packb({"id": rid, **reply}))
        if req is not None:
            spawner.last_network = req.network
        spawner.release_mounts()
        # The next spare is made now, while the builder just started runs, unless a
        # request waits already: on a chain of builds the next request comes once this
        # builder is done, and would otherwise wait for the spare to be made.
        if not select.select([sock], [], [], 0)[0]:
            spawner.keep_spare(spawner.last_network)


def main(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    with tempfile.TemporaryDirectory(prefix="weft-sandbox-") as where:
        os.chmod(where, 0o755)
        spawner = Spawner(make_skeleton(where))
        try:
            serve(sock, spawner)
        finally:
            spawner.close()
    sys.exit(0)

"""The spawner process: clones each builder into fresh namespaces, on the daemon's word.

Started by the daemon before trio starts, it is single-threaded, so forking it is cheap
and safe.  For each request (a msgpack map on a SEQPACKET socket, the log pipe's write
end in SCM_RIGHTS) it forks an intermediate process A, which unshares the user, mount,
pid, ipc, uts and (unless asked not to) network namespaces; the spawner writes A's uid
and gid maps (only a process outside the new user namespace may), then A forks the
builder B, pid 1 of the new pid namespace, reports B's pid and exits.  B is thereby
orphaned to the daemon, a child subreaper, whose process monitor reaps it.  B builds its
sandbox (`sandbox.enter`) and execs; a setup error comes back on a close-on-exec pipe
(EOF with no data means the exec happened), and the spawner answers the daemon with B's
pid or the error: the step, errno and path.
"""

import contextlib
import ctypes
import errno
import os
import signal
import socket
import sys
import tempfile
from typing import Any

import msgpack

from daemon.packets import recv_packet
from spawner import linux
from spawner.sandbox import (
    BUILD_GID,
    BUILD_UID,
    SetupError,
    SpawnRequest,
    enter,
    make_template,
    prepare_root,
)

NAMESPACES = (
    linux.CLONE_NEWUSER
    | linux.CLONE_NEWNS
    | linux.CLONE_NEWPID
    | linux.CLONE_NEWIPC
    | linux.CLONE_NEWUTS
)


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


def _default_signals() -> None:
    """Python ignores SIGPIPE and SIGXFSZ; a builder must start with every default."""
    for sig in range(1, signal.NSIG):
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError, RuntimeError):
            continue
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _intermediate(
    req: SpawnRequest, template: str, log_fd: int, report: int, go: int, status: int
) -> None:
    """Process A: new namespaces, then the builder B as pid 1.  Never returns."""
    try:
        if req.cgroup:
            # Before the builder exists, so that all it starts is in the cgroup too.  A
            # failure is no build failure: the daemon checks, and pauses with signals.
            with contextlib.suppress(OSError), open(req.cgroup, "w") as f:
                f.write(str(os.getpid()))
        linux.unshare(NAMESPACES | (0 if req.network else linux.CLONE_NEWNET))
        os.write(report, b"u")
        if os.read(go, 1) != b"m":
            os._exit(1)
        pid = os.fork()
        if pid == 0:
            os.close(report)
            os.close(go)
            try:
                _default_signals()
                os.setsid()
                enter(req, template, log_fd, status)
            except BaseException as e:
                os.write(status, msgpack.packb(_error_of(e)))
            os._exit(127)
        os.write(report, str(pid).encode())
        os._exit(0)
    except BaseException as e:
        os.write(report, b"E" + msgpack.packb(_error_of(e)))
        os._exit(1)


def _write_maps(pid: int, req: SpawnRequest) -> None:
    with open(f"/proc/{pid}/uid_map", "w") as f:
        f.write(f"{BUILD_UID} {req.host_uid} 1\n")
    with open(f"/proc/{pid}/setgroups", "w") as f:
        f.write("deny\n")
    with open(f"/proc/{pid}/gid_map", "w") as f:
        f.write(f"{BUILD_GID} {req.host_gid} 1\n")


def spawn(req: SpawnRequest, template: str, log_fd: int) -> dict[str, Any]:
    try:
        prepare_root(req)
    except SetupError as e:
        return _error_of(e)
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    pid_a = os.fork()
    if pid_a == 0:
        os.close(report_r)
        os.close(go_w)
        os.close(status_r)
        _intermediate(req, template, log_fd, report_w, go_r, status_w)
    for fd in (report_w, go_r, status_w):
        os.close(fd)
    try:
        first = os.read(report_r, 1)
        if first == b"u":
            try:
                _write_maps(pid_a, req)
            except OSError as e:
                os.kill(pid_a, signal.SIGKILL)
                return _error("uid map", e.errno or 0, e.filename or "", e.strerror or "")
            os.write(go_w, b"m")
            rest = _read_all(report_r)
        else:
            rest = first + _read_all(report_r)
        os.waitpid(pid_a, 0)
        if rest.startswith(b"E") or not rest.isdigit():
            return (
                msgpack.unpackb(rest[1:])
                if rest.startswith(b"E")
                else _error("fork builder", errno.ECHILD, "", "the intermediate process died")
            )
        failure = _read_all(status_r)
        if failure:
            return msgpack.unpackb(failure)
        return {"status": "ok", "pid": int(rest)}
    finally:
        for fd in (report_r, go_w, status_r):
            os.close(fd)


def _request(data: bytes) -> SpawnRequest:
    msg = msgpack.unpackb(data)
    fields = {k: v for k, v in msg.items() if k in SpawnRequest.__dataclass_fields__}
    return SpawnRequest(**fields)


def serve(sock: socket.socket, template: str) -> None:
    while True:
        try:
            data, fds, truncated = recv_packet(sock)
        except ConnectionResetError:
            return
        if not data and not fds:
            return
        rid = None
        try:
            rid = msgpack.unpackb(data).get("id")
            if truncated or len(fds) != 1:
                reply = _error("request", errno.EINVAL, "", "a request carries one log fd")
            else:
                reply = spawn(_request(data), template, fds[0])
        except Exception as e:
            reply = _error_of(e)
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(msgpack.packb({"id": rid, **reply}))


def main(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    with tempfile.TemporaryDirectory(prefix="weft-sandbox-template-") as template:
        os.chmod(template, 0o755)
        make_template(template)
        serve(sock, template)
    sys.exit(0)

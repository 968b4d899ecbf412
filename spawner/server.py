"""The spawner process: starts each builder from a spare in fresh namespaces, on the
daemon's word.

Started by the daemon before trio starts.  It keeps a spare ready (`spares.py`): a process
already in fresh namespaces, with what every sandbox has mounted, waiting on a socket of
its own.  The spare has a network namespace of its own: as root, one a finished build
left, or a new one the spawner then keeps for later builds (`networks.py`); for a
fixed-output build (`SpawnRequest.network`) always a new one, which pasta connects to the
outside, and which the spawner stops once the builder has exited (`pasta.py`).  Given a
freezer directory (`SpawnRequest.freezer`, learnt from the requests), each spare is made
in a cgroup of its own in it.

For each request (`daemon/wire/spawner.py`: a `SpawnRequest` in one packet, the log pipe's
write end in SCM_RIGHTS, and with a plan the report pipe's) the spawner checks its tmp dir
and lays out the mount points (`sandbox.py`), writes the spare's uid and gid maps and
passes it the request and the pipes; the spare binds the slot's tmp dir and the inputs,
pivots and execs (or, with a plan, becomes the session runner: `runner.c`).  A setup
error comes back on a close-on-exec pipe (EOF with no data means the exec happened), and
the spawner answers the daemon with the builder's pid or the error: the step, errno and
path.  Then, unless another request waits, it makes the next spare: the clone and the
namespaces, most of a spawn's cost, are off the path from request to exec.

It dies with the daemon (the parent-death signal; and EOF on its socket, if the daemon
died before it asked for that signal), and every builder with it: the builders are the
daemon's (adopted), and each asks for the same signal as it starts (`spare.c`).  Its
skeletons live in a scratch directory that the next spawner removes if this one is killed
(`scratch.py`).
"""

import contextlib
import ctypes
import errno
import os
import select
import signal
import socket
import sys

from daemon.wire.packets import pack, recv_packet, unpack
from daemon.wire.spawner import (
    SetupFailure,
    Spawned,
    SpawnReply,
    SpawnRequest,
    decode_request,
    encode_reply,
)
from spawner.networks import Networks
from spawner.pasta import Pastas
from spawner.sandbox import SetupError, check_tmp_dir, make_skeleton, prepare_root, remove_tree
from spawner.scratch import make_scratch
from spawner.spares import Spare, make_spare

PR_SET_PDEATHSIG = 1


def _failure_of(e: BaseException) -> SetupFailure:
    if isinstance(e, SetupError):
        return e.failure
    if isinstance(e, OSError):
        return SetupFailure("setup", e.errno or 0, e.filename or "", e.strerror or str(e))
    return SetupFailure("setup", 0, "", f"{type(e).__name__}: {e}")


class Spawner:
    """What the spawner keeps between requests: a spare per kind of network, the newest
    builders' mount namespaces, the network namespaces to lend again, the pastas of the
    fixed-output builders running."""

    def __init__(self, where: str) -> None:
        # The skeletons, in the scratch directory `where`: by the request's `network`.
        self.skeletons = {False: make_skeleton(where), True: make_skeleton(where, "network")}
        self.spares: dict[bool, Spare] = {}
        self.last_network = False
        self.freezer = ""  # the last request's
        self.reuse_network = True  # the last request's
        # Mount namespaces of the latest builders, held open (`release_mounts`).
        self.held: list[int] = []
        self.networks = Networks()
        self.pastas = Pastas()

    def spawn(self, req: SpawnRequest, log_fd: int, report_fd: int | None = None) -> SpawnReply:
        self.freezer, self.reuse_network = req.freezer, req.reuse_network
        try:
            check_tmp_dir(req)
            binds = prepare_root(req, self.skeletons[req.network])
            spare = self.spares.pop(req.network, None)
            if spare is not None and (
                spare.freezer != req.freezer
                or (spare.kept_network and not req.reuse_network)
                or not spare.waiting()
            ):
                spare.discard()
                spare = None
            if spare is None:
                spare = self._make(req.network, req.freezer)
        except SetupError as e:
            return e.failure
        try:
            reply = spare.start(req, binds, log_fd, report_fd)
        except BaseException:
            spare.discard()
            raise
        if isinstance(reply, Spawned):
            if (held := spare.hold_mounts()) is not None:
                self.held.append(held)
            if spare.pasta is not None:
                self.pastas.watch(spare.pid, spare.pasta)
                spare.pasta = None
            spare.close()  # a builder's cgroup is the daemon's to remove
        else:
            spare.discard()
        return reply

    def _make(self, network: bool, freezer: str) -> Spare:
        networks = self.networks if self.reuse_network else None
        return make_spare(self.skeletons[network], network, freezer, networks)

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
                self.spares[network] = self._make(network, self.freezer)

    def close(self) -> None:
        for spare in self.spares.values():
            spare.discard()
        self.spares.clear()
        self.networks.close()
        self.pastas.close()
        for fd in self.held:
            os.close(fd)
        self.held.clear()


def _wait_for_request(sock: socket.socket, spawner: Spawner) -> None:
    """Until a request (or EOF) comes, stopping the pasta of each builder that exits."""
    poll = select.poll()
    poll.register(sock, select.POLLIN)
    while watched := spawner.pastas.fds():
        for fd in watched:
            poll.register(fd, select.POLLIN)
        ready = {fd for fd, _ in poll.poll()}
        spawner.pastas.reap(ready)
        if sock.fileno() in ready:
            return
        for fd in watched:
            poll.unregister(fd)


def serve(sock: socket.socket, spawner: Spawner) -> None:
    spawner.keep_spare(spawner.last_network)
    while True:
        _wait_for_request(sock, spawner)
        try:
            data, fds, truncated = recv_packet(sock)
        except ConnectionResetError:
            return
        if not data and not fds:
            return
        rid = None
        req = None
        reply: SpawnReply
        try:
            rid, fields = unpack(data)
            req = None if truncated else decode_request(fields)
            # The log pipe, and with a plan the runner's report pipe.
            wanted = 1 if req is None or req.plan is None else 2
            if req is None or len(fds) != wanted:
                req = None
                reply = SetupFailure(
                    "request", errno.EINVAL, "", "a request carries a log fd (and a report fd)"
                )
            else:
                reply = spawner.spawn(req, fds[0], fds[1] if wanted == 2 else None)
        except Exception as e:
            reply = _failure_of(e)
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(pack(rid, encode_reply(reply)))
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
    where = make_scratch()
    try:
        spawner = Spawner(where)
        try:
            serve(sock, spawner)
        finally:
            spawner.close()
    finally:
        remove_tree(where)
    sys.exit(0)

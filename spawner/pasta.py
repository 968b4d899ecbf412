"""The network of fixed-output builds: a namespace of their own, connected by pasta.

A fixed-output build may download (its output's hash is known beforehand), so it gets the
network.  Not the host's network namespace: there a builder reaches every service on the
host's loopback and the host's abstract Unix sockets (the class of CVE-2024-27297 and
CVE-2025-46416).  Its spare makes a network namespace of its own, as every build's, and
pasta (of passt; Lix does the same, Guix with slirp4netns) connects it: a tap interface
with the host's addresses and routes, whose traffic pasta carries over ordinary sockets
of the host's.  Nothing reaches in (`-t`/`-u none`); nothing goes to the host's loopback
(no port forwarding from the namespace, `-T`/`-U none`, and the gateway's address stays
the gateway's, `--no-map-gw`); abstract Unix sockets are the namespace's own.  DNS
queries to `DNS_FORWARD` go to the host's resolver, whatever address it listens on.

Each pasta lives as long as its build.  It runs in the foreground, the spawner's child,
started through `weft-spare --die-with` (`spare.c`), so that it dies with the spawner,
which dies with the daemon.  It is ready once it has written its pid, which it does once
the namespace is configured, and it is killed and reaped by the spawner as soon as its
builder has exited (`Pastas`: a pidfd of the builder tells; pasta itself never notices,
it holds the namespace open).
"""

import contextlib
import errno
import os
import select
import shutil
import signal
from dataclasses import dataclass

from spawner.sandbox import SetupError, write_if_changed

PASTA = shutil.which("pasta") or "/usr/bin/pasta"
# What pasta makes its tap interface with, as the user the spawner runs as: some systems
# let only root open it, and then a daemon that is not root cannot connect a namespace.
TUN = "/dev/net/tun"
# The address the sandbox's resolv.conf names, which pasta forwards to the host's first
# resolver: the host's own may listen on its loopback (127.0.0.53, say), out of reach.
# Link-local, so that no real server has it; the namespace's default route takes it to
# pasta.
DNS_FORWARD = "169.254.1.53"
# The host's files a downloader needs, copied into the network sandboxes' /etc.
HOST_FILES = ("hosts", "services", "resolv.conf")
# How long pasta may take to configure a namespace: 20 ms here; past this, it is stuck.
READY_WAIT = 10.0
# pasta's pid file, which it writes once the namespace is configured: this descriptor.
_READY_FD = 3
_OPTIONS = (
    "--foreground",
    "--quiet",
    "--config-net",
    *("--tcp-ports", "none", "--udp-ports", "none"),
    *("--tcp-ns", "none", "--udp-ns", "none"),
    "--no-map-gw",
    *("--dns-forward", DNS_FORWARD),
)


@dataclass
class Pasta:
    """A pasta process connecting one spare's (then builder's) network namespace."""

    pid: int
    reaped: bool = False

    def alive(self) -> bool:
        if not self.reaped:
            self.reaped = os.waitpid(self.pid, os.WNOHANG)[0] != 0
        return not self.reaped

    def stop(self) -> None:
        """Kill and reap it."""
        if not self.reaped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.reaped = True


def start_pasta(spare: str, spare_pid: int) -> Pasta:
    """pasta for the network namespace (and user namespace) of process `spare_pid`, ready;
    `spare` is the spare program, which starts it to die with this process."""
    if not os.access(TUN, os.R_OK | os.W_OK):
        message = f"fixed-output builds need pasta (of passt), and this user may not open {TUN}"
        raise SetupError("network", errno.EACCES, "", message)
    # As root, pasta would first drop to nobody, who may not enter the spare's namespaces:
    # it stays root, and enters the spare's user namespace, where it is nobody's.
    runas = ("--runas", "0:0") if os.geteuid() == 0 else ()
    argv = [spare, "--die-with", str(os.getpid()), PASTA, *_OPTIONS, *runas]
    argv += ["--pid", f"/proc/self/fd/{_READY_FD}", str(spare_pid)]
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            pid = os.posix_spawn(
                spare, argv, {}, file_actions=[(os.POSIX_SPAWN_DUP2, ready_w, _READY_FD)]
            )
        except OSError as e:
            raise SetupError("network", e.errno or 0, spare, e.strerror or str(e)) from e
        finally:
            os.close(ready_w)
        pasta = Pasta(pid)
        try:
            _wait_ready(ready_r, pasta)
        except BaseException:
            pasta.stop()
            raise
    finally:
        os.close(ready_r)
    return pasta


def _wait_ready(ready: int, pasta: Pasta) -> None:
    if select.select([ready], [], [], READY_WAIT)[0] and os.read(ready, 64).strip():
        return
    if pasta.alive():
        message = f"pasta did not configure the network in {READY_WAIT:g} s"
        raise SetupError("network", errno.ETIMEDOUT, PASTA, message)
    raise SetupError(
        "network",
        errno.ENETUNREACH,
        PASTA,
        "pasta (of passt) exited before the network was up (its messages are in the "
        "daemon's log): fixed-output builds need it",
    )


class Pastas:
    """The pasta of every running fixed-output builder, stopped once the builder exits."""

    def __init__(self) -> None:
        self._running: dict[int, Pasta] = {}  # a pidfd of the builder: its pasta

    def watch(self, builder: int, pasta: Pasta) -> None:
        try:
            holder = os.pidfd_open(builder)
        except OSError:
            pasta.stop()  # gone already (or no pidfds: never left running unwatched)
            return
        self._running[holder] = pasta

    def fds(self) -> list[int]:
        """What to poll: each becomes readable when its builder has exited."""
        return list(self._running)

    def reap(self, ready: set[int]) -> None:
        """Stop the pastas whose builders have exited (of `ready`, from a poll)."""
        for holder in ready & self._running.keys():
            self._running.pop(holder).stop()
            os.close(holder)

    def close(self) -> None:
        self.reap(set(self._running))


def sync_host_files(skeleton: str) -> None:
    """The host's files of `HOST_FILES` into the network skeleton's /etc, where they
    changed (resolv.conf as the sandbox needs it): running sandboxes see them change, as
    the host does."""
    for name in HOST_FILES:
        try:
            with open(os.path.join("/etc", name)) as f:
                text = f.read()
        except OSError:
            text = ""
        if name == "resolv.conf":
            text = sandbox_resolv_conf(text)
        write_if_changed(os.path.join(skeleton, "etc", name), text)


def sandbox_resolv_conf(host: str) -> str:
    """The host's resolv.conf with its resolvers replaced by `DNS_FORWARD`, which pasta
    forwards to the host's first: from the sandbox, the host's loopback is out of reach."""
    lines = [line for line in host.splitlines() if line.split()[:1] != ["nameserver"]]
    return "".join(f"{line}\n" for line in [f"nameserver {DNS_FORWARD}", *lines])

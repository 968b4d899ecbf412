"""The daemon's side of the locker: file locks without the daemon holding any.

To lock a path the daemon opens the lock file, sends the descriptor to the locker with
the request, and closes its own copy at once, so the daemon's fd count does not grow
with the locks it holds and no close in the daemon can drop a lock.  A build's outputs
are locked as bytes of one file instead (`exclusive_bytes`), which the locker keeps open
from its start: no file is made, sent or deleted per build.

    async with locks.exclusive([out1, out2], owner="build:...") as held:
        ...   # cancelled, then LockLost, if the locker dies meanwhile

Several paths are locked in sorted order, so two owners never deadlock.  After each
grant the lock file is checked as Nix does: if it was deleted or replaced meanwhile
(another inode at the path, or the deletion token written into it) the lock is stale
and is taken again on the new file.

If the locker dies, every request in flight fails with `LockerDied`, the body of every
`exclusive`/`shared` block holding a lock is cancelled and raises `LockLost` (whatever
else the body raised as it was cancelled is its cause), and a new locker is started:
owners do not get their locks back (another process may have taken them in between), they
fail cleanly instead, with an error that says the locker died and the request may be
retried.  An unlock meant for a dead locker is dropped: its locks went with it.
"""

import contextlib
import functools
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from daemon.proc.helper import MAX_REPLY, HelperConnection, start_helper
from daemon.proc.processes import Process, ProcessMonitor
from daemon.wire.locker import (
    Cancel,
    Key,
    Lock,
    LockByte,
    Mode,
    ReleaseOwner,
    Reply,
    Request,
    Status,
    Unlock,
    byte_of,
    decode_reply,
    encode_request,
)
from daemon.wire.packets import Fields, pack, rights, unpack

log = logging.getLogger("weft.locks")
DAEMON_OWNER = "daemon"
# How long a restarted locker waits to take the one-daemon lock back.  Between the old
# locker's death and the new one's request the lock is free, and anyone may hold it for
# a moment (a probe with `flock -n`, a second daemon starting that will find this one's
# socket and exit); a daemon that took it for good still holds it after this long.
DAEMON_LOCK_WAIT = 2.0
# What a client is told: which helper died, and that trying again is the remedy.
DIED = "the lock helper (locker) died before it answered; retry"
LOST = "the lock helper (locker) died, and the locks went with it; retry"
# The one-daemon lock's request id, sent before any `LockService` (whose ids start at 1).
_BLOCKING_ID = 0


class LockError(Exception):
    """The locker could not lock a file."""


class LockerDied(LockError):
    """The locker exited while a request was in flight."""


class LockLost(LockError):
    """An owner's locks vanished with the locker; its work was cancelled."""


class WouldBlock(LockError):
    """`wait=False` and someone else holds the lock."""


@dataclass
class Held:
    path: str  # the lock file, or the name whose byte is locked
    key: Key
    mode: Mode


@dataclass
class _Owner:
    """What one owner holds of the locker serving now; a locker's death makes it `lost`
    and forgotten, and the owner's next lock starts a new record."""

    keys: dict[Key, int] = field(default_factory=dict)  # inode -> times held
    scopes: set[trio.CancelScope] = field(default_factory=set)
    lost: bool = False


def start_locker_process(
    monitor: ProcessMonitor, cpus: Collection[int] | None = None, bytes_file: str | None = None
) -> tuple[Process, socket.socket]:
    """The locker, with `bytes_file` (made if missing) as its byte-lock file, if given."""
    if bytes_file is None:
        return start_helper(monitor, "locker", cpus)
    fd = _open_lock_file(bytes_file)
    try:
        return start_helper(monitor, "locker", cpus, [fd])
    finally:
        os.close(fd)


def lock_file_blocking(sock: socket.socket, path: str, owner: str) -> bool:
    """Before trio runs: one exclusive lock, without waiting (the one-daemon lock)."""
    fd = _open_lock_file(path)
    try:
        request = Lock(owner, Mode.EXCLUSIVE, wait=False)
        sock.sendmsg([pack(_BLOCKING_ID, encode_request(request))], rights(fd))
    finally:
        os.close(fd)
    data = sock.recv(MAX_REPLY)
    if not data:
        raise LockerDied("the lock helper (locker) exited as it started (its error is above)")
    _, fields = unpack(data)
    reply = decode_reply(fields)
    if reply.status is Status.FAILED:
        raise LockError(f"{path}: {reply.error}")
    return reply.status is Status.GRANTED


def _open_lock_file(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


class LockService(HelperConnection[Request, Reply]):
    """Talks to the locker, restarts it when it dies, and tracks what each owner holds."""

    name = "locker"

    def __init__(
        self,
        monitor: ProcessMonitor,
        proc: Process,
        sock: socket.socket,
        daemon_lock: str | None = None,
        on_daemon_lock_lost: Callable[[], object] = lambda: None,
        cpus: Collection[int] | None = None,
        bytes_file: str | None = None,
    ) -> None:
        start = functools.partial(start_locker_process, cpus=cpus, bytes_file=bytes_file)
        super().__init__(monitor, start, proc, sock)
        self._abandoned_locks: dict[int, str] = {}  # request -> owner, for unawaited grants
        self._owners: dict[str, _Owner] = {}
        self._daemon_lock = daemon_lock
        self._on_daemon_lock_lost = on_daemon_lock_lost

    @property
    def locker_pid(self) -> int:
        return self.pid

    async def _restarted(self) -> None:
        """The one-daemon lock died with the locker; if another daemon took it, stop."""
        if self._daemon_lock is None:
            return
        with trio.move_on_after(DAEMON_LOCK_WAIT):
            try:
                await self.lock(self._daemon_lock, Mode.EXCLUSIVE, DAEMON_OWNER)
            except LockerDied:
                return  # died again at once: the next locker takes it
            except LockError as e:
                log.error("lost the one-daemon lock (%s); shutting down", e)
                self._on_daemon_lock_lost()
            return
        log.error(
            "lost the one-daemon lock: another process held it for %g s; shutting down",
            DAEMON_LOCK_WAIT,
        )
        self._on_daemon_lock_lost()

    def _encode(self, request: Request) -> Fields:
        return encode_request(request)

    def _decode(self, fields: Fields) -> Reply:
        return decode_reply(fields)

    async def _unclaimed(self, rid: int | None, reply: Reply) -> None:
        owner = self._abandoned_locks.pop(rid, None) if rid is not None else None
        if owner is not None and reply.status is Status.GRANTED and reply.key is not None:
            try:
                await self._send(Unlock(owner, reply.key))
            except OSError as e:
                # Nobody awaits this grant to be told, and it runs beside the reply reader:
                # the lock stays held until the owner is released or the locker exits, a
                # smaller harm than an error out of the reader, which would end the daemon.
                log.warning("could not release %s's abandoned lock: %s", owner, e)

    async def _abandoned(self, rid: int, request: Request) -> None:
        if isinstance(request, Lock):
            self._abandoned_locks[rid] = request.owner
            await self._send(Cancel(rid))

    def _died(self) -> None:
        self._abandoned_locks.clear()
        for owner in self._owners.values():
            owner.lost = True
            for scope in owner.scopes:
                scope.cancel()
        self._owners = {}

    async def _locker_call(self, request: Request, fd: int | None = None) -> Reply:
        reply = await self._call(request, fd)
        if reply is None:
            raise LockerDied(DIED)
        return reply

    async def lock(self, path: str, mode: Mode, owner: str, wait: bool = True) -> Held:
        """Lock one file; stale lock files (deleted or replaced meanwhile) are retried."""
        while True:
            # Creating a file can take milliseconds on a slow disk: not on the loop.
            # (The stale check below only looks at an inode just opened, in the cache.)
            fd = await trio.to_thread.run_sync(_open_lock_file, path)
            try:
                # Inside the `try`: this waits exactly when the locker has died, which is
                # when holders' scopes are cancelled, and the fd must be closed then too.
                serving = await self._serving()
                reply = await self._locker_call(Lock(owner, mode, wait), fd)
            finally:
                os.close(fd)
            key = self._granted(path, reply, serving)
            if _still_current(path, key):
                return self._held(path, key, mode, owner)
            await self._send(Unlock(owner, key))

    async def lock_byte(self, name: str, mode: Mode, owner: str, wait: bool = True) -> Held:
        """Lock the byte of the byte-lock file that stands for `name` (`byte_of`)."""
        serving = await self._serving()
        reply = await self._locker_call(LockByte(owner, mode, byte_of(name), wait))
        return self._held(name, self._granted(name, reply, serving), mode, owner)

    def _granted(self, name: str, reply: Reply, serving: object) -> Key:
        """The key a lock request was granted on; else why not, raised."""
        if not self._still_serving(serving):
            # Granted by a locker that died before we got here: the lock went with it.
            raise LockerDied(DIED)
        if reply.status is Status.REFUSED:
            raise WouldBlock(f"{name} is locked")
        if reply.status is not Status.GRANTED or reply.key is None:
            raise LockError(f"{name}: {reply.error or reply.status.value}")
        return reply.key

    def _held(self, name: str, key: Key, mode: Mode, owner: str) -> Held:
        state = self._owners.setdefault(owner, _Owner())
        state.keys[key] = state.keys.get(key, 0) + 1
        return Held(name, key, mode)

    async def unlock(self, held: Held, owner: str, delete: bool = False) -> None:
        """Release one lock; with `delete`, the lock file is removed as Nix does."""
        state = self._owners.get(owner)
        if state is None or held.key not in state.keys:
            return
        state.keys[held.key] -= 1
        if not state.keys[held.key]:
            del state.keys[held.key]
        if not state.keys and not state.scopes:
            del self._owners[owner]
        # Not while the owner holds it again (it locked the file twice): the next locker
        # would make a new file and lock that.  Nor if it is gone already, or another file
        # now: its holder deleted it, or another's it is.
        delete = (
            delete
            and len(held.key) == 2  # a byte is never deleted
            and held.key not in state.keys
            and _still_current(held.path, held.key)
        )
        if delete:
            try:
                await trio.to_thread.run_sync(_unlink_quietly, held.path)
            except OSError as e:
                # The lock is released all the same: a file that would not go must not
                # keep it held (the file stays, empty, and serves the next owner).
                log.warning("%s: the lock file stays: %s", held.path, e)
                delete = False
        await self._send(Unlock(owner, held.key, delete))

    async def release_owner(self, owner: str) -> None:
        self._owners.pop(owner, None)
        await self._locker_call(ReleaseOwner(owner))

    @asynccontextmanager
    async def hold(
        self,
        paths: Sequence[str],
        mode: Mode,
        owner: str,
        wait: bool = True,
        delete: bool = False,
        by_byte: bool = False,
    ) -> AsyncIterator[list[Held]]:
        """`paths` locked in order (bytes in the order of their offsets: names whose
        bytes are one are then still taken in one order)."""
        state = self._owners.setdefault(owner, _Owner())
        scope = trio.CancelScope()
        state.scopes.add(scope)
        held: list[Held] = []
        lock = self.lock_byte if by_byte else self.lock
        try:
            with scope:
                for path in sorted(set(paths), key=byte_of if by_byte else None):
                    held.append(await lock(path, mode, owner, wait))
                yield held
        except Exception as e:
            # What the body raised as it was cancelled (an exception group of its tasks,
            # say) is the loss's consequence: the caller is told of the loss.
            if state.lost and not isinstance(e, LockError):
                raise LockLost(f"{owner}: {LOST}") from e
            raise
        finally:
            state.scopes.discard(scope)
            if not state.lost:
                with trio.CancelScope(shield=True):
                    for h in reversed(held):
                        await self.unlock(h, owner, delete=delete)
            # Kept only while it holds or may hold something: owners come and go with
            # builds, and the table must not grow with every one there ever was.
            if not state.keys and not state.scopes and self._owners.get(owner) is state:
                del self._owners[owner]
        if state.lost:
            raise LockLost(f"{owner}: {LOST}")

    def exclusive(
        self, paths: Sequence[str], owner: str, wait: bool = True, delete: bool = False
    ) -> "AsyncIterator[list[Held]]":
        """Hold `paths` exclusively; with `delete`, the lock files go when released."""
        return self.hold(paths, Mode.EXCLUSIVE, owner, wait, delete)  # type: ignore[return-value]

    def exclusive_bytes(
        self, names: Sequence[str], owner: str, wait: bool = True
    ) -> "AsyncIterator[list[Held]]":
        """Hold the bytes that stand for `names` exclusively (`lock_byte`)."""
        return self.hold(names, Mode.EXCLUSIVE, owner, wait, by_byte=True)  # type: ignore[return-value]

    def shared(
        self, paths: Sequence[str], owner: str, wait: bool = True
    ) -> "AsyncIterator[list[Held]]":
        return self.hold(paths, Mode.SHARED, owner, wait)  # type: ignore[return-value]


def _still_current(path: str, key: Key) -> bool:
    """Nix's stale rule: the path still names this inode, and nobody marked it deleted."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == key and st.st_size == 0


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@asynccontextmanager
async def running_locker(
    monitor: ProcessMonitor | None = None, bytes_file: str | None = None
) -> AsyncIterator[LockService]:
    """A locker for the length of the block, for library users, tests and benchmarks,
    with `bytes_file` as its byte-lock file if given.

    Without a monitor one is made that reaps only its own children, so it can live in a
    process that also uses `subprocess`.
    """
    own = monitor is None
    monitor = monitor or ProcessMonitor(reap_all=False)
    proc, sock = start_locker_process(monitor, bytes_file=bytes_file)
    svc = LockService(monitor, proc, sock, bytes_file=bytes_file)
    async with trio.open_nursery() as nursery:
        if own:
            await nursery.start(monitor.run)
        await nursery.start(svc.run)
        yield svc
        await svc.aclose()
        nursery.cancel_scope.cancel()

"""The locker's lock table: who holds which inode, who waits, in what order.

Owners (a client session, a build, the GC) lock inodes shared or exclusive.  Between its
own owners the locker decides by itself, first come first served: a request waits if an
incompatible holder exists or anyone is queued ahead of it, so a stream of shared
requests can never starve an exclusive one.  Toward other processes it holds one kernel
lock per inode (`Kernel`), in the strongest mode any owner holds; when the kernel says
another process holds a conflicting lock, the head of the queue waits and is retried.

No I/O here except through `Kernel`, so the rules can be tested on their own.
"""

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from daemon.wire.locker import Key, Mode, Status


class Kernel(Protocol):
    """The kernel lock on an inode, held on one file descriptor the locker keeps."""

    def acquire(self, key: Key, exclusive: bool) -> bool:
        """Set the lock to this mode without waiting; False if another process conflicts."""

    def release(self, key: Key) -> None:
        """Drop the kernel lock and the descriptor."""


@dataclass
class Waiter:
    request: int
    owner: str
    mode: Mode


@dataclass
class Inode:
    holders: dict[str, list[Mode]] = field(default_factory=dict)  # owner -> modes held
    queue: deque[Waiter] = field(default_factory=deque)
    kernel_mode: Mode | None = None

    def exclusive_held(self) -> bool:
        return any(Mode.EXCLUSIVE in modes for modes in self.holders.values())

    def compatible(self, owner: str, mode: Mode) -> bool:
        others = {o: m for o, m in self.holders.items() if o != owner}
        if mode is Mode.EXCLUSIVE:
            return not others
        return not any(Mode.EXCLUSIVE in m for m in others.values())


@dataclass(frozen=True)
class Outcome:
    """What became of a request: granted, refused (would wait), cancelled, or failed."""

    request: int
    status: Status
    error: str = ""


class LockTable:
    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.inodes: dict[Key, Inode] = {}
        self.by_owner: dict[str, set[Key]] = {}
        self.waiting: dict[int, Key] = {}  # queued request -> inode
        # Inodes whose queue head could go but for another process's lock.
        self.blocked: set[Key] = set()

    def has(self, key: Key) -> bool:
        return key in self.inodes

    def lock(self, key: Key, request: int, owner: str, mode: Mode, wait: bool) -> list[Outcome]:
        inode = self.inodes.setdefault(key, Inode())
        held = inode.holders.get(owner)
        if held is not None:
            # Re-entry by a holder never queues: it would wait behind a waiter that waits
            # for this very holder.
            if Mode.EXCLUSIVE in held or mode is Mode.SHARED:
                self._grant(key, inode, owner, mode)
                return [Outcome(request, Status.GRANTED)]
            return [
                Outcome(request, Status.FAILED, "owner already holds a shared lock; no upgrades")
            ]
        try:
            if not inode.queue and inode.compatible(owner, mode) and self._kernel(key, inode, mode):
                self._grant(key, inode, owner, mode)
                return [Outcome(request, Status.GRANTED)]
        except OSError as e:
            self._forget_if_idle(key)
            return [Outcome(request, Status.FAILED, f"cannot lock: {e.strerror}")]
        if not wait:
            self._forget_if_idle(key)
            return [Outcome(request, Status.REFUSED)]
        inode.queue.append(Waiter(request, owner, mode))
        self.waiting[request] = key
        self.by_owner.setdefault(owner, set()).add(key)
        if len(inode.queue) == 1 and inode.compatible(owner, mode):
            self.blocked.add(key)
        return []

    def cancel(self, request: int) -> list[Outcome]:
        """Withdraw a waiting request; one already granted is left to be unlocked."""
        key = self.waiting.pop(request, None)
        if key is None:
            return []
        inode = self.inodes[key]
        waiter = next(w for w in inode.queue if w.request == request)
        inode.queue.remove(waiter)
        self._drop_owner_key(waiter.owner, key)
        return [Outcome(request, Status.CANCELLED), *self._advance(key, inode)]

    def unlock(self, key: Key, owner: str) -> list[Outcome]:
        inode = self.inodes.get(key)
        if inode is None or owner not in inode.holders:
            return []
        modes = inode.holders[owner]
        modes.pop()
        if not modes:
            del inode.holders[owner]
            self._drop_owner_key(owner, key)
        return self._advance(key, inode)

    def release_owner(self, owner: str) -> list[Outcome]:
        """Everything the owner holds is released and everything it waits for cancelled."""
        outcomes: list[Outcome] = []
        for key in sorted(self.by_owner.pop(owner, set())):
            inode = self.inodes[key]
            inode.holders.pop(owner, None)
            for w in [w for w in inode.queue if w.owner == owner]:
                inode.queue.remove(w)
                self.waiting.pop(w.request, None)
                outcomes.append(Outcome(w.request, Status.CANCELLED))
            outcomes += self._advance(key, inode)
        return outcomes

    def retry(self) -> list[Outcome]:
        """Try again the queue heads that wait on another process's lock."""
        outcomes: list[Outcome] = []
        for key in list(self.blocked):
            inode = self.inodes.get(key)
            if inode is None:
                self.blocked.discard(key)
            else:
                outcomes += self._advance(key, inode)
        return outcomes

    def waiting_on_kernel(self) -> bool:
        return bool(self.blocked)

    def _advance(self, key: Key, inode: Inode) -> list[Outcome]:
        granted: list[Outcome] = []
        self.blocked.discard(key)
        while inode.queue:
            head = inode.queue[0]
            if not inode.compatible(head.owner, head.mode):
                break
            try:
                if not self._kernel(key, inode, head.mode):
                    self.blocked.add(key)
                    break
            except OSError as e:
                inode.queue.popleft()
                self.waiting.pop(head.request, None)
                self._drop_owner_key(head.owner, key)
                granted.append(Outcome(head.request, Status.FAILED, f"cannot lock: {e.strerror}"))
                continue
            inode.queue.popleft()
            self.waiting.pop(head.request, None)
            self._grant(key, inode, head.owner, head.mode)
            granted.append(Outcome(head.request, Status.GRANTED))
        if not inode.holders:
            self._settle(key, inode)
        elif not inode.exclusive_held() and inode.kernel_mode is Mode.EXCLUSIVE:
            # Only shared holders remain: let other processes' readers in.
            self.kernel.acquire(key, exclusive=False)
            inode.kernel_mode = Mode.SHARED
        return granted

    def _kernel(self, key: Key, inode: Inode, mode: Mode) -> bool:
        want = Mode.EXCLUSIVE if mode is Mode.EXCLUSIVE or inode.exclusive_held() else Mode.SHARED
        if inode.kernel_mode is want or inode.kernel_mode is Mode.EXCLUSIVE:
            return True
        if not self.kernel.acquire(key, exclusive=want is Mode.EXCLUSIVE):
            return False
        inode.kernel_mode = want
        return True

    def _grant(self, key: Key, inode: Inode, owner: str, mode: Mode) -> None:
        inode.holders.setdefault(owner, []).append(mode)
        self.by_owner.setdefault(owner, set()).add(key)

    def _settle(self, key: Key, inode: Inode) -> None:
        """No holders left: waiters (blocked on another process) keep the inode."""
        if not inode.queue:
            del self.inodes[key]
            self.kernel.release(key)

    def _forget_if_idle(self, key: Key) -> None:
        inode = self.inodes[key]
        if not inode.holders and not inode.queue:
            del self.inodes[key]
            self.kernel.release(key)

    def _drop_owner_key(self, owner: str, key: Key) -> None:
        keys = self.by_owner.get(owner)
        if keys is None:
            return
        inode = self.inodes.get(key)
        if inode is None or not any(w.owner == owner for w in inode.queue):
            keys.discard(key)
        if not keys:
            del self.by_owner[owner]

"""The first stage of a deletion: dead paths claimed and renamed out of the store, a batch
at a time, in a thread of their own, while the batch before is being unregistered.

A path is claimed first (`Pins.begin_delete`: anyone who pins it now waits until its batch
is over), then renamed under its own name into the batch's deletion directory, and its
bytes are counted.  It is still registered: the batch's transaction (`store.gc.deletion`)
unregisters it, or renames it back when the database refuses, before the write lock is
free again, so that whenever it is free every path on disk is registered.  A crash in
between leaves registered paths in a dead owner's deletion directory, which the next open
renames back (`Store.recover`).  The renames are the other half of a collection's time, so
they run beside the transactions rather than inside them, on directory descriptors.
"""

import os
import queue
import stat
import threading
from collections import deque
from dataclasses import dataclass, field

from store.gc.marking import Plan
from store.store import Store

# Batches moved out and waiting for their transaction: with the one being unregistered
# and the one being moved, three hold claims at most.  More would hold more claims
# (pinning one of those paths waits) for no more speed: the stages only need overlap.
AHEAD = 1
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


@dataclass(slots=True)
class Moved:
    """A batch moved out of the store and not yet unregistered."""

    into: str  # its deletion directory
    into_fd: int  # owned by the batch: `close` closes it
    claimed: list[str]  # in plan order; `Pins.end_delete` is owed for each
    pinned: list[str]  # pinned when reached: not claimed, left alone
    names: dict[str, str] = field(default_factory=dict)  # path -> its name there, if out
    sizes: dict[str, int] = field(default_factory=dict)  # of the same: bytes their removal frees

    def close(self) -> None:
        os.close(self.into_fd)


class Mover:
    """Claims and moves out batches in a thread, `AHEAD` at most; `next` hands them over
    in order (None at the end).  `size` may be changed between batches (the pace)."""

    def __init__(
        self, store: Store, store_fd: int, gc_plan: Plan, size: int, max_freed: int | None
    ) -> None:
        self.store = store
        self.store_fd = store_fd
        self.plan = gc_plan
        self.size = size
        self.max_freed = max_freed
        self._todo = deque(gc_plan.dead)
        self._ready: queue.Queue[Moved | BaseException | None] = queue.Queue(AHEAD)
        self._stop = threading.Event()
        # A daemon thread: a process that exits mid-collection leaves what it moved out
        # to the next open (`Store.recover`) rather than waiting on a batch nobody takes.
        self._thread = threading.Thread(target=self._run, name="gc-mover", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def next(self) -> Moved | None:
        got = self._ready.get()
        if isinstance(got, BaseException):
            raise got
        return got

    def stop(self) -> None:
        """Stop moving, and put back whatever was moved and not handed over."""
        self._stop.set()
        while True:
            # Looked at before the queue: once it is dead, what it put is all there.
            alive = self._thread.is_alive()
            while not self._ready.empty():
                got = self._ready.get_nowait()
                if isinstance(got, Moved):
                    self.undo(got)
            if not alive:
                return
            self._thread.join(0.01)

    def undo(self, batch: Moved) -> None:
        """Rename a batch's paths back (all still registered) and release its claims."""
        try:
            for name in reversed(batch.names.values()):
                move_back(batch.into_fd, self.store_fd, name)
        finally:
            self.store.pins.end_delete(batch.claimed)
            batch.close()
        os.rmdir(batch.into)

    def _run(self) -> None:
        freed = 0
        try:
            while self._todo and not self._stop.is_set():
                if self.max_freed is not None and freed >= self.max_freed:
                    break
                budget = None if self.max_freed is None else self.max_freed - freed
                batch = self._move(self._take(budget))
                freed += sum(batch.sizes.values())
                self._put(batch)
            self._put(None)
        except BaseException as e:
            self._put(e)

    def _put(self, item: Moved | BaseException | None) -> None:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        if isinstance(item, Moved):
            self.undo(item)

    def _take(self, budget: int | None) -> list[str]:
        """The next batch: `size` paths, fewer once their archive sizes reach `budget`."""
        batch: list[str] = []
        estimate = 0
        while self._todo and len(batch) < self.size:
            if budget is not None and estimate >= budget:
                break
            path = self._todo.popleft()
            batch.append(path)
            estimate += self.plan.sizes.get(path, 0)
        return batch

    def _move(self, paths: list[str]) -> Moved:
        pins = self.store.pins
        claimed: list[str] = []
        pinned: list[str] = []
        for path in paths:
            (claimed if pins.begin_delete(path) else pinned).append(path)
        try:
            into = self.store.deletion_dir()
            batch = Moved(into, os.open(into, DIR_FLAGS), claimed, pinned)
        except BaseException:
            pins.end_delete(claimed)
            raise
        store_fd, into_fd, names, sizes = self.store_fd, batch.into_fd, batch.names, batch.sizes
        try:
            for path in claimed:
                name = path.rpartition("/")[2]
                if move_out(store_fd, into_fd, name):
                    names[path] = name
                    sizes[path] = bytes_freed(into, into_fd, name)
        except BaseException:
            self.undo(batch)
            raise
        return batch


def move_out(store_fd: int, into_fd: int, name: str) -> bool:
    """Rename a store path into a deletion directory, under its own name (recovery finds
    it there); False if it is not on disk."""
    try:
        try:
            os.rename(name, name, src_dir_fd=store_fd, dst_dir_fd=into_fd)
        except PermissionError:
            # Not root: moving a directory to a new parent rewrites its '..'.
            os.chmod(name, 0o755, dir_fd=store_fd)
            os.rename(name, name, src_dir_fd=store_fd, dst_dir_fd=into_fd)
    except FileNotFoundError:
        return False
    return True


def move_back(into_fd: int, store_fd: int, name: str) -> None:
    os.rename(name, name, src_dir_fd=into_fd, dst_dir_fd=store_fd)
    if stat.S_ISDIR(os.lstat(name, dir_fd=store_fd).st_mode):
        os.chmod(name, 0o555, dir_fd=store_fd)


def bytes_freed(into: str, into_fd: int, name: str) -> int:
    """What removing a moved-out path will free: its files whose last link it holds (as
    `store.tmparea.remove_tree` counts them)."""
    st = os.lstat(name, dir_fd=into_fd)
    if stat.S_ISDIR(st.st_mode):
        return _tree_bytes(os.path.join(into, name))
    return st.st_size if st.st_nlink == 1 else 0


def _tree_bytes(path: str) -> int:
    freed = 0
    with os.scandir(path) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                freed += _tree_bytes(entry.path)
            else:
                st = entry.stat(follow_symlinks=False)
                freed += st.st_size if st.st_nlink == 1 else 0
    return freed

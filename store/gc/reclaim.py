"""Reclaiming the space of deleted paths: removing what a collection moved out of the store.

A collection moves each dead path out of the store into a deletion directory and
unregisters it (`store.gc.moving`, `store.gc.deletion`); from then on the path is gone for
everyone (its name free for a new add), and only its space remains to be given back.  That
is one unlink per file, and an unlink waits for the disk: on the VM of bench/RESULTS.md
(ext4 mounted with `discard`, no journal) each one of a file with data waits about 0.3 ms
for its discard and uses about 40 µs of CPU.  The removal is bound by the disk's latency,
not the CPU, so it runs in many threads at once, each taking a chunk of a deletion
directory, mostly asleep.

The `Reclaimer` outlives a collection: the daemon lets a collection answer once its paths
are out of the store, and the reclaimer goes on (docs/gc.md, "Space comes back after the
reply"), though it starts no removal while a collection's transactions run (`paused`).
Its threads start when work comes and end when there is none, so an idle daemon keeps
none; they are not daemon threads, so a process that exits first finishes the removal it
started (a killed one leaves it to `Store.recover` at the next open).
"""

import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

from store.tmparea import remove_tree

log = logging.getLogger("weft.gc")

# Unlinks in flight at once.  Each waits ~0.3 ms on the disk with ~40 µs of CPU: on the
# 2-core VM, 4 threads removed 2,700 files/s and 16 removed 6,800 (64: no more), while
# they take under a third of one CPU.  More would only queue in the block layer.
REMOVER_THREADS = 16
# Entries of a deletion directory per work item: small enough that one batch keeps every
# thread busy, large enough that a thread's per-item work (a directory opened) is noise.
CHUNK = 32
# How long a thread with nothing to do waits for more before it ends: a collection hands
# over a batch every few tens of milliseconds, and a thread started for each would cost
# more than its work.
LINGER_SECONDS = 1.0

# Run in each remover thread around its work, e.g. to lower its priority.
Wrap = Callable[[Callable[[], None]], Callable[[], None]]
# Frees what the removals left unused (the `.links` entries); (entries, bytes).
Cleanup = Callable[[], tuple[int, int]]


@dataclass(slots=True)
class _Dir:
    """A deletion directory whose entries are being removed, chunk by chunk."""

    path: str
    chunks_left: int


@dataclass(slots=True)
class Totals:
    """What a reclaimer has done since it was made (only ever grows)."""

    entries_removed: int = 0
    links_removed: int = 0
    links_bytes: int = 0
    errors: int = 0  # entries left behind (logged), for the next open to remove


class _Step(Enum):
    REMOVE = "remove"  # a chunk of a deletion directory
    CLEANUP = "cleanup"  # what the removals left unused
    END = "end"  # nothing to do for LINGER_SECONDS: the thread ends


class Reclaimer:
    """Removes deletion directories in up to `threads` threads; `cleanup` runs whenever
    the work runs out, after removals that may have left `.links` entries unused."""

    def __init__(
        self,
        cleanup: Cleanup | None = None,
        threads: int = REMOVER_THREADS,
        wrap: Wrap | None = None,
    ) -> None:
        self._cleanup = cleanup
        self._max_threads = threads
        self._wrap = wrap
        self._cond = threading.Condition()
        self._work: deque[tuple[_Dir, list[str]]] = deque()
        self._running = 0  # threads alive
        self._busy = 0  # work items or a cleanup in progress
        self._dirty = False  # removals since the last cleanup
        self._paused = 0  # blocks of `paused` under way
        self.totals = Totals()

    def put(self, directory: str, names: list[str]) -> None:
        """Remove `names` in `directory`, then the directory itself."""
        chunks = [names[i : i + CHUNK] for i in range(0, len(names), CHUNK)] or [[]]
        d = _Dir(directory, len(chunks))
        with self._cond:
            self._work.extend((d, chunk) for chunk in chunks)
            self._dirty = True
            self._start()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No removal starts in the block (those under way finish).  A collection's
        transactions run in one: removals beside them, competing for the interpreter and
        the disk, made them take twice as long, and the space back no sooner."""
        with self._cond:
            self._paused += 1
        try:
            yield
        finally:
            with self._cond:
                self._paused -= 1
                self._start()

    def wait(self) -> None:
        """Until everything put so far is removed and the cleanup after it has run."""
        with self._cond:
            self._cond.wait_for(self._idle)

    def idle(self) -> bool:
        with self._cond:
            return self._idle()

    def _idle(self) -> bool:
        return not self._work and not self._busy and not self._dirty

    def _start(self) -> None:
        """Threads for the work there is, unless paused (the caller holds the lock)."""
        if self._paused:
            return
        self._cond.notify_all()  # lingering threads first
        wanted = min(self._max_threads, len(self._work) + self._busy)
        for _ in range(wanted - self._running):
            self._running += 1
            run = self._run if self._wrap is None else self._wrap(self._run)
            # Not a daemon thread (as it would be, started from one of trio's): a process
            # that exits finishes the removal first.
            threading.Thread(target=run, name="gc-reclaim", daemon=False).start()

    def _next(self) -> tuple[_Step, _Dir | None, list[str]]:
        """What this thread does next (the caller holds the lock)."""
        lingered = False
        while True:
            if not self._paused:
                if self._work:
                    d, chunk = self._work.popleft()
                    return _Step.REMOVE, d, chunk
                if self._dirty and self._busy == 0:
                    # The last removals are done: what they left unused goes once.
                    self._dirty = False
                    return _Step.CLEANUP, None, []
            if lingered:
                self._running -= 1
                return _Step.END, None, []
            lingered = not self._cond.wait(LINGER_SECONDS)

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    step, d, chunk = self._next()
                    if step is _Step.END:
                        return
                    self._busy += 1
                try:
                    if d is not None:
                        self._remove(d, chunk)
                    else:
                        self._run_cleanup()
                finally:
                    with self._cond:
                        self._busy -= 1
                        if self._idle():
                            self._cond.notify_all()
        except BaseException:
            # Not an OSError (those are counted and logged): the thread ends, and another
            # takes its place if work is left.
            with self._cond:
                self._running -= 1
                self._start()
            raise

    def _remove(self, d: _Dir, names: list[str]) -> None:
        removed = 0
        try:
            fd = os.open(d.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            self._failed(d.path, e)
        else:
            try:
                for name in names:
                    try:
                        try:
                            os.unlink(name, dir_fd=fd)
                        except IsADirectoryError:
                            remove_tree(os.path.join(d.path, name))
                    except FileNotFoundError:
                        continue
                    except OSError as e:
                        self._failed(os.path.join(d.path, name), e)
                        continue
                    removed += 1
            finally:
                os.close(fd)
        with self._cond:
            self.totals.entries_removed += removed
            d.chunks_left -= 1
            last = d.chunks_left == 0
        if last:
            try:
                remove_tree(d.path)
            except OSError as e:
                self._failed(d.path, e)

    def _run_cleanup(self) -> None:
        if self._cleanup is None:
            return
        try:
            removed, freed = self._cleanup()
        except OSError as e:
            self._failed("the unused links", e)
            return
        with self._cond:
            self.totals.links_removed += removed
            self.totals.links_bytes += freed

    def _failed(self, what: str, e: OSError) -> None:
        # Unregistered already: what is left is removed when the store next opens.
        log.warning("could not remove %s: %s", what, e)
        with self._cond:
            self.totals.errors += 1

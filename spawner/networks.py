"""Network namespaces lent to sandboxes, one sandbox at a time, and kept for the next.

A new network namespace costs a spare more than the rest of it together: a spare took
1.6 ms to make with one and 0.9 ms without, 1.4 and 0.9 ms of CPU (`docs/sandbox.md`).
So a root spawner has the spare program make one first (lo up, and no TCP connection
kept in TIME_WAIT, so that a later build finds none of this one's ports taken) and keeps
it; once the spare it went to, then builder, has exited, the next spare joins it.  The
builder was pid 1 of its pid namespace: when it has exited, every process of the build
has, and with them every socket.  The namespace belongs to the host's user namespace,
where no builder has any capability: none can change its interfaces, routes or settings.
A spawner that is not root cannot make or join such a namespace; each of its spares
makes its own, in its user namespace.
"""

import os
import select
from dataclasses import dataclass

# Free namespaces kept beyond those lent: more than builds ever run at once is waste.
MAX_FREE = 64


@dataclass
class _Lent:
    netns: int  # the namespace (an open /proc/<pid>/ns/net)
    holder: int  # a pidfd of the spare it was lent to, then builder


class Networks:
    def __init__(self, shared: bool | None = None) -> None:
        # Whether spares get namespaces from here (else each makes its own).
        self.shared = os.geteuid() == 0 if shared is None else shared
        self._lent: list[_Lent] = []
        self._free: list[int] = []

    def take(self) -> int | None:
        """A namespace no process is in any more, now the caller's (to `lend`, or close);
        None: the spare program must make a new one."""
        self._reclaim()
        return self._free.pop() if self._free else None

    def lend(self, netns: int, pid: int) -> None:
        """`netns` is process `pid`'s until it exits."""
        try:
            holder = os.pidfd_open(pid)
        except ProcessLookupError:
            self._keep(netns)  # gone already: it is free again
            return
        except OSError:
            # No pidfds here: nothing would tell when it is free, so it is never lent again.
            os.close(netns)
            return
        self._lent.append(_Lent(netns, holder))

    def _reclaim(self) -> None:
        if not self._lent:
            return
        poll = select.poll()
        for lent in self._lent:
            poll.register(lent.holder, select.POLLIN)
        gone = {fd for fd, _ in poll.poll(0)}
        if not gone:
            return
        still = []
        for lent in self._lent:
            if lent.holder in gone:
                os.close(lent.holder)
                self._keep(lent.netns)
            else:
                still.append(lent)
        self._lent = still

    def _keep(self, netns: int) -> None:
        if len(self._free) < MAX_FREE:
            self._free.append(netns)
        else:
            os.close(netns)

    def close(self) -> None:
        for lent in self._lent:
            os.close(lent.holder)
            os.close(lent.netns)
        for netns in self._free:
            os.close(netns)
        self._lent.clear()
        self._free.clear()

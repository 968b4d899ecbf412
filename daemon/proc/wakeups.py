"""Quick wake-ups while builds run: the kernel is asked to keep idle CPUs polling.

A build hands work from process to process about a dozen times: the daemon, the locker,
the spawner, its spare, the builder, and back.  Most hand-offs wake a process on another
CPU, often an idle one.  An idle CPU that has halted is slow to wake, above all in a
virtual machine, where the wake-up goes through the hypervisor: on the 2-core VM of
`bench/RESULTS.md` a round trip between two processes on different CPUs took 89-104 µs,
and 9.5 µs while the CPUs polled for work instead of halting.

So, with `quick-wakeups = true` in `weft.toml`, while a request has derivations to
build, the daemon holds a CPU latency request of 0 µs (`/dev/cpu_dma_latency`, the
kernel's PM QoS interface, as latency-bound programs use it): idle CPUs poll rather than
halt.  It is off by default: the request holds for every CPU of the machine, not just the
daemon's, and costs power (on a virtual machine, host CPU time too) for as long as builds
run; it takes no CPU time that anything else could use (a polling CPU runs whatever
becomes runnable at once), and it shortens only the hand-offs, which builds of seconds
or hours never feel (bench/RESULTS.md has what it gains on a chain of trivial builds).
Without the device, or the right to open it (a daemon not run as root), nothing changes.
"""

import contextlib
import logging
import os
import struct
from collections.abc import Iterator

DEVICE = "/dev/cpu_dma_latency"

logger = logging.getLogger(__name__)


class QuickWakeups:
    def __init__(self, enabled: bool, device: str = DEVICE) -> None:
        self.enabled = enabled
        self.device = device
        self._holders = 0
        self._fd = -1

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Held by each request while it builds: the first holder makes the latency
        request, the last one's release withdraws it (the kernel drops it with the fd)."""
        if self._holders == 0 and self.enabled:
            self._fd = _request(self.device)
        self._holders += 1
        try:
            yield
        finally:
            self._holders -= 1
            if self._holders == 0 and self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _request(device: str) -> int:
    try:
        fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        logger.debug("%s: %s; CPUs idle as they will", device, e.strerror)
        return -1
    try:
        os.write(fd, struct.pack("=i", 0))
    except OSError as e:
        os.close(fd)
        logger.debug("%s: %s; CPUs idle as they will", device, e.strerror)
        return -1
    return fd

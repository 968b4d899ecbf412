"""A freezer cgroup per build: pausing a whole sandbox at once.

With cgroup v2 (`cgroup.freeze`, any non-root cgroup) or the v1 freezer hierarchy
(`freezer.state`), the daemon makes `weft-<tag>/` under its own cgroup.  The spawner makes
each spare sandbox in a cgroup of its own there (`spawner/server.py`), so a builder and
everything it starts are in it from their first instruction; the daemon removes it once
the build is over.  Freezing the cgroup stops them all at once, which SIGSTOP of a tree
walked through /proc (`sigstop.py`, the fallback) can only approach.  `Freezer` is one of
the two `Pauser`s (`pauser.py`).

Without a usable hierarchy (no permission, no freezer), `find` returns None; a builder
that did not end up in its cgroup (the join is best effort) is paused with signals.  The
tag names the state dir, which one daemon serves at a time: what a killed predecessor
left in `weft-<tag>/` is removed when the next one finds it (but the cgroups of its
builders still running, which cannot be).
"""

import contextlib
import os
from pathlib import Path

from daemon.proc.processes import Process
from daemon.sched.sigstop import SIGNALS


def _own_cgroup(version: int) -> str | None:
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if version == 2 and controllers == "":
                return path
            if version == 1 and "freezer" in controllers.split(","):
                return path
    return None


def _mount(version: int) -> str | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstype, options = fields[sep + 1], fields[sep + 3]
            if version == 2 and fstype == "cgroup2":
                return fields[4]
            if version == 1 and fstype == "cgroup" and "freezer" in options.split(","):
                return fields[4]
    return None


class Freezer:
    def __init__(self, base: Path, version: int) -> None:
        self.base = base
        self.version = version

    @classmethod
    def find(cls, tag: str) -> "Freezer | None":
        for version in (2, 1):
            try:
                mount, own = _mount(version), _own_cgroup(version)
                if mount is None or own is None:
                    continue
                base = Path(mount) / own.lstrip("/") / f"weft-{tag}"
                base.mkdir(exist_ok=True)
                control = "cgroup.freeze" if version == 2 else "freezer.state"
                probe = base / "probe"
                probe.mkdir(exist_ok=True)
                usable = (probe / control).exists()
                probe.rmdir()
                if usable:
                    freezer = cls(base, version)
                    freezer._remove_empty_cgroups()
                    return freezer
                base.rmdir()
            except OSError:
                continue
        return None

    @property
    def cgroups(self) -> str:
        return str(self.base)

    def pause(self, proc: Process) -> None:
        self._freeze(proc, True)

    def resume(self, proc: Process) -> None:
        self._freeze(proc, False)

    def _freeze(self, proc: Process, frozen: bool) -> None:
        if not proc.cgroup:
            # It did not join a cgroup of its own: signals reach it all the same.
            (SIGNALS.pause if frozen else SIGNALS.resume)(proc)
            return
        path = Path(proc.cgroup)
        if self.version == 2:
            (path / "cgroup.freeze").write_text("1" if frozen else "0")
        else:
            (path / "freezer.state").write_text("FROZEN" if frozen else "THAWED")

    def reaped(self, proc: Process) -> None:
        """A build's cgroup goes once its builder is reaped (else `close` removes it)."""
        if proc.cgroup and proc.returncode is not None:
            with contextlib.suppress(OSError):
                os.rmdir(proc.cgroup)

    def close(self) -> None:
        """Remove the cgroups (they are empty once every builder is reaped)."""
        self._remove_empty_cgroups()
        with contextlib.suppress(OSError):
            self.base.rmdir()

    def _remove_empty_cgroups(self) -> None:
        with contextlib.suppress(OSError), os.scandir(self.base) as entries:
            for entry in entries:
                if entry.is_dir():
                    with contextlib.suppress(OSError):
                        os.rmdir(entry.path)

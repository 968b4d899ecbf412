"""The farm's processes, named by pid and start time so that a later `farm stop` (another
process, maybe much later) signals exactly the processes this farm started and never a
stranger that reused a pid.

A process that has exited but is not reaped yet (a zombie) counts as gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# How often a wait re-reads /proc: short enough that a stop takes no longer than it must.
POLL_SECONDS = 0.02

# The Popen of each running child, held until the keeper reaps it: a Popen dropped while its
# child runs is put on subprocess's own list and waitpid()ed at the next Popen, a second
# reaper that could collect a later child given the same pid.
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass
class Proc:
    """One process the farm started: its pid, its start time (clock ticks since boot, from
    /proc/PID/stat) and its log."""

    pid: int
    start: int
    log: str

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Proc:
        return cls(pid=int(data["pid"]), start=int(data["start"]), log=str(data["log"]))


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of a process, or None when there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: fields follow its last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def spawn(
    argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Proc:
    """Start `argv` in a session of its own (a terminal's signals are not its business), output
    to `log`, stdin from /dev/null."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=cwd,
        )
    _children[child.pid] = child
    stat = _stat(child.pid)
    return Proc(pid=child.pid, start=stat[1] if stat else 0, log=str(log))


def reaped(pid: int) -> None:
    """The keeper has collected `pid`: its Popen (if it was one of ours) is done with."""
    child = _children.pop(pid, None)
    if child is not None:
        child.returncode = 0  # known collected: its __del__ leaves it to nobody


def this_process(log: str) -> Proc:
    stat = _stat(os.getpid())
    assert stat is not None
    return Proc(pid=os.getpid(), start=stat[1], log=log)


def alive(proc: Proc) -> bool:
    stat = _stat(proc.pid)
    return stat is not None and stat[1] == proc.start and stat[0] not in ("Z", "X")


def _group(pgid: int) -> list[int]:
    """The live processes of a process group (a worker and its daemon, its builders)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _kill_group(proc: Proc) -> None:
    """SIGKILL what is left of the process's group, if the group is still the one we made (its
    leader is ours, or gone: a group id is not reused while a member lives)."""
    stat = _stat(proc.pid)
    if stat is not None and stat[1] != proc.start:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def wait_gone(procs: list[Proc], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in procs):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_SECONDS)
    return True


def stop(procs: list[Proc], grace: float) -> None:
    """SIGTERM each process (it stops its own children, as their one owner), SIGKILL after
    `grace` seconds; then whatever its group still holds is killed. Returns once all are gone."""
    for proc in procs:
        if alive(proc):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
    wait_gone(procs, grace)
    for proc in procs:
        if alive(proc) or _group(proc.pid):
            _kill_group(proc)
    _wait_groups_gone(procs, grace)


def kill(proc: Proc) -> None:
    """SIGKILL the process and its group now, as a crash would: no chance to clean up."""
    _kill_group(proc)
    _wait_groups_gone([proc], 10.0)


def _wait_groups_gone(procs: list[Proc], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) or _group(p.pid) for p in procs) and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)


def log_tail(path: str, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""

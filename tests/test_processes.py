"""The daemon's children: one reaper, statuses never lost, never reported as 0; helpers
that load nothing of the daemon but its wire modules."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import trio

from daemon.proc.processes import UNCLAIMED_TTL, ProcessMonitor


def run_script(script: str) -> list[int]:
    """Run `script` in a process of its own (it becomes a subreaper); its printed ints."""
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return [int(x) for x in out.stdout.split()]


async def test_exit_codes_signals_and_late_waiters() -> None:
    monitor = ProcessMonitor(reap_all=False)
    async with trio.open_nursery() as n:
        await n.start(monitor.run)
        ok = monitor.spawn(["/bin/sh", "-c", "exit 0"])
        bad = monitor.spawn(["/bin/sh", "-c", "exit 7"])
        hung = monitor.spawn(["/bin/sleep", "30"])
        # Nobody waits yet: the statuses must be kept until asked for.
        await trio.sleep(0.3)
        assert await bad.wait() == 7
        assert await ok.wait() == 0
        hung.kill()
        assert await hung.wait() == -signal.SIGKILL
        n.cancel_scope.cancel()


async def test_status_arriving_before_registration_is_kept() -> None:
    """As a builder started by the spawner: it may exit before the daemon registers it."""
    script = textwrap.dedent("""
        import os, sys, trio
        sys.path.insert(0, os.getcwd())
        from daemon.proc.processes import ProcessMonitor
        async def main():
            monitor = ProcessMonitor()
            monitor.become_subreaper()
            async with trio.open_nursery() as n:
                await n.start(monitor.run)
                # A child that forks a grandchild and exits: the grandchild comes back to
                # us as a subreaper, exits with 5, and is reaped before we know its pid.
                # (After the child exits: else the child may reap it itself.)
                r, w = os.pipe()
                bg = "sh -c 'sleep 0.1; exit 5' &"
                child = monitor.spawn(["/bin/sh", "-c", f"{bg} echo $! >&{w}; exit 0"],
                                      {w: w})
                os.close(w)
                await child.wait()
                grandchild = int(os.read(r, 100))
                await trio.sleep(0.3)
                print(await monitor.register(grandchild, ["sh"]).wait(), monitor.reaped)
                n.cancel_scope.cancel()
        trio.run(main)
    """)
    code, reaped = run_script(script)
    assert code == 5
    assert reaped == 2


def test_no_zombies_left_by_a_reap_all_monitor() -> None:
    script = textwrap.dedent("""
        import os, sys, trio
        from daemon.proc.processes import ProcessMonitor
        async def main():
            monitor = ProcessMonitor()
            monitor.become_subreaper()
            async with trio.open_nursery() as n:
                await n.start(monitor.run)
                procs = [monitor.spawn(["/bin/sh", "-c", "(sleep 0.05 &) ; exit 0"])
                         for _ in range(200)]
                for p in procs:
                    assert await p.wait() == 0
                await trio.sleep(0.5)
                zombies = 0
                for pid in os.listdir("/proc"):
                    if pid.isdigit():
                        try:
                            stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
                        except OSError:
                            continue
                        if stat[1] == str(os.getpid()) and stat[0] == "Z":
                            zombies += 1
                print(zombies, monitor.reaped)
                n.cancel_scope.cancel()
        trio.run(main)
    """)
    zombies, reaped = run_script(script)
    assert zombies == 0
    assert reaped == 400


def test_the_helpers_load_nothing_of_the_daemon_but_its_wire_modules() -> None:
    """What the locker and the spawner run on: no trio, no store, of the daemon's package
    only `daemon.wire` (each helper starts in a fresh interpreter, and what it imports it
    carries for its whole life)."""
    code = "import json, sys, locker.server, spawner.server; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
        check=True,
    )
    loaded = json.loads(out.stdout)
    assert "locker.server" in loaded and "spawner.server" in loaded
    assert [m for m in loaded if m.split(".")[0] in ("trio", "store")] == []
    daemon = [m for m in loaded if m.split(".")[0] == "daemon"]
    assert "daemon.wire.locker" in daemon and "daemon.wire.spawner" in daemon
    assert [
        m for m in daemon if m not in ("daemon", "daemon.wire") and not m.startswith("daemon.wire.")
    ] == []


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# No process ever has this pid (above PID_MAX_LIMIT, 2**22): no process may hold it.
NO_SUCH_PID = 1 << 30


def test_a_status_nobody_registered_goes_to_a_register_that_comes_soon_after() -> None:
    clock = FakeClock()
    monitor = ProcessMonitor(reap_all=False, clock=clock)
    monitor._collected(NO_SUCH_PID, 7 << 8)
    clock.now += UNCLAIMED_TTL / 2
    assert monitor.register(NO_SUCH_PID, ["builder"]).returncode == 7


def test_a_status_nobody_registered_in_time_is_not_given_to_a_later_process_with_its_pid() -> None:
    clock = FakeClock()
    monitor = ProcessMonitor(reap_all=False, clock=clock)
    monitor._collected(NO_SUCH_PID, 7 << 8)
    clock.now += UNCLAIMED_TTL + 1
    proc = monitor.register(NO_SUCH_PID, ["builder with a reused pid"])
    assert proc.returncode is None
    assert not proc._exited.is_set()


def test_expired_statuses_are_dropped_as_new_ones_come_not_kept_until_the_bound() -> None:
    clock = FakeClock()
    monitor = ProcessMonitor(reap_all=False, clock=clock)
    for i in range(100):
        monitor._collected(NO_SUCH_PID + i, 0)
    clock.now += UNCLAIMED_TTL + 1
    monitor._collected(NO_SUCH_PID - 1, 0)
    assert list(monitor._unclaimed) == [NO_SUCH_PID - 1]


async def test_a_kept_status_of_a_pid_a_running_process_has_now_is_not_given_to_it() -> None:
    """The status was its pid's previous owner's (reaped, so gone): the pid wrapped."""
    monitor = ProcessMonitor(reap_all=False)
    async with trio.open_nursery() as n:
        await n.start(monitor.run)
        pid = os.posix_spawn("/bin/sleep", ["sleep", "30"], dict(os.environ))
        monitor._collected(pid, 0)  # as the reaper kept it for the pid's previous owner
        proc = monitor.register(pid, ["sleep", "30"])
        await trio.sleep(0.1)
        assert proc.returncode is None
        proc.kill()
        with trio.fail_after(10):
            assert await proc.wait() == -signal.SIGKILL
        n.cancel_scope.cancel()

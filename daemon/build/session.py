"""A build with environments, on the daemon's side: the plan of its session, and its end.

A derivation with build environments (`store/buildenv.py`) is built by a session runner in
its sandbox (`spawner/runner.c`), the build's first process, which enters the
environments, runs the builder (or the wrapper's `wrap_build`) and exits them.  The
daemon works the session out (`plan_of`: the steps in the order `session_steps` gives,
with their labels, what hooks wrap, the environments' variables) and the runner only
executes it.

The runner's own exit status says little: it is the builder's parent, and pid 1 of the
pid namespace, which can die of no signal it does not catch.  How the session ended comes
on a pipe only the runner holds (its report, `RunnerReport`), and `session_ending` turns
it into the build's `Ending`: the wrapped builder's own exit code, or the signal that
killed it (so that the retry policy still tells a SIGSEGV or an OOM kill from an exit
code of 139), or which enter or exit step failed, and how.
"""

import errno
import os
import signal
from collections.abc import Mapping

from daemon.build.watch import Ending
from daemon.sched.retry import Cause
from daemon.wire.spawner import Plan, PlanEnvironment, PlanStep, RunnerReport, decode_report
from store.buildenv import Action, Step, session_steps
from store.derivation import Derivation

# The exit codes a shell gives a command it could not run, which the retry policy knows
# as deterministic: not found, and found but not executable (or its exec refused).
NOT_FOUND, NOT_RUNNABLE = 127, 126


def plan_of(
    drv: Derivation, env: Mapping[str, str], defaults: Mapping[str, str], grace: float
) -> Plan | None:
    """The session of a derivation with environments (None without any), for a builder
    environment `env` made of `defaults`, the derivation's `env` and its delta."""
    if not drv.environments:
        return None
    enters, build, exits = session_steps(drv.environments, Action(drv.builder, tuple(drv.args)))
    index = {e.name: i for i, e in enumerate(drv.environments)}
    # What the derivation set (a hook is told of these, never of weft's defaults).
    declared = sorted(k for k, v in env.items() if k in drv.env or defaults.get(k) != v)
    return Plan(
        grace,
        declared,
        [PlanEnvironment(e.name, dict(e.variables)) for e in drv.environments],
        [_planned(s, index) for s in (*enters, build, *exits)],
    )


def _planned(step: Step, index: Mapping[str, int]) -> PlanStep:
    wrapped = step.wrapped
    return PlanStep(
        kind=str(step.kind),
        environment=-1 if step.environment is None else index[step.environment],
        label=step.label,
        command=step.action.command,
        args=list(step.action.args),
        timeout=step.action.timeout,
        hook=step.hook or "",
        wrapped_command=wrapped.command if wrapped else "",
        wrapped_args=list(wrapped.args) if wrapped else [],
        wrapped_timeout=wrapped.timeout if wrapped else None,
    )


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _timeout(step: PlanStep) -> float:
    """The timeout the runner held the step to: the nearer of the hook's and the wrapped
    action's."""
    return min((t for t in (step.timeout, step.wrapped_timeout) if t is not None), default=0)


def _code(report: RunnerReport) -> int:
    """The decisive step's status as an exit code, or minus the signal that killed it."""
    if report.end == "signal":
        return -report.code
    if report.end == "exec":
        return NOT_FOUND if report.code == errno.ENOENT else NOT_RUNNABLE
    return report.code


def _failure(step: PlanStep, report: RunnerReport) -> str:
    """What failed, as the error says it after "failed"."""
    if report.end == "exec":
        what = "hook" if step.hook else "program"
        name = errno.errorcode.get(report.code, str(report.code))
        return (
            f" at {step.label}: the {what} {step.command} could not be started: "
            f"{os.strerror(report.code)} ({name})"
        )
    if report.end == "timeout":
        return f" at {step.label}: timed out after {_timeout(step):g} s"
    if step.kind == "build":
        # The builder's own status, as a build without environments reports it; a signal
        # by name.
        return f": killed by signal {signal_name(report.code)}" if report.end == "signal" else ""
    if report.end == "signal":
        return f" at {step.label}: killed by signal {signal_name(report.code)}"
    return f" at {step.label}: exit code {report.code}"


def session_ending(ending: Ending, plan: Plan, data: bytes) -> Ending:
    """The build's end, from the runner's report (`data`) and the watch's `ending` of the
    runner itself (its exit code, and why weft stopped it if it did)."""
    report = decode_report(data, plan.steps)
    if report is None:
        if ending.why:
            return ending
        if ending.code < 0:
            # Killed without a word: the OOM killer may take a pid namespace's init, and
            # the retry policy is to see that signal as a builder's death by it.
            said = f"killed by signal {signal_name(-ending.code)}"
            return Ending(
                ending.code, "", Cause.EXIT, f": its session runner left no report ({said})"
            )
        said = f"exit code {ending.code}"
        return Ending(
            ending.code or 1, "", Cause.SETUP, f": its session runner left no report ({said})"
        )
    code = _code(report) if report.step >= 0 else ending.code
    if ending.why:
        during = f", during {plan.steps[report.stop_step].label}" if report.stop_step >= 0 else ""
        return Ending(code, ending.why + during, ending.cause)
    if report.stopped:
        # SIGTERM from outside the sandbox, but not weft's: someone on the host.
        during = f" during {plan.steps[report.stop_step].label}" if report.stop_step >= 0 else ""
        return Ending(-signal.SIGTERM, "", Cause.EXIT, f": stopped by SIGTERM{during}")
    if report.end == "ok":
        return Ending(0, "", Cause.EXIT)
    if report.step < 0:
        return Ending(code or 1, "", Cause.SETUP, ": its session runner could not start")
    step = plan.steps[report.step]
    cause = Cause.TIMEOUT if report.end == "timeout" else Cause.EXIT
    return Ending(code, "", cause, _failure(step, report))

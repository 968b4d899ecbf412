"""The spawner's protocol: what the daemon (`daemon/proc/spawner.py`) and the spawner
(`spawner/server.py`) say to each other, written once for both ends.

Each message is one packet (`daemon.wire.packets`): a msgpack map with the request's id.

    daemon -> spawner  the fields of a `SpawnRequest`  + the write end of the build's log pipe
                       (+ the write end of its report pipe, with a `plan`)
    spawner -> daemon  {status: ok, pid, cgroup}
                       {status: error, step, errno, path, message}

A derivation with build environments comes with a `Plan` of its session: the steps
`store.buildenv.session_steps` orders, with everything the spare's session runner
(`spawner/runner.c`) needs to run them and nothing it has to work out.  The runner tells
the daemon how the session ended on the report pipe, in one line (`RunnerReport`); a
request without a plan is the same, field for field and byte for byte, as before plans.

An error reply is also what the spare program writes to its status pipe when a step of
the sandbox fails (`spawner/spare.c`), without an id: the spawner passes it on.

A request larger than a packet travels in a memfd (`daemon.wire.packets`); what no
sandbox could exec, the kernel's limits on execve's arguments and environment
(`exec_refusal`), is refused before anything starts, naming the limit.
"""

import errno
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from daemon.wire.packets import Fields

# execve's limits (fs/exec.c, include/uapi/linux/binfmts.h).  One argument or environment
# string ("k=v"), its NUL included, is at most MAX_ARG_STRLEN: 32 pages.
MAX_ARG_STRLEN = 32 * 4096
# All of them together, with the program's path and a pointer per string, fit in a quarter
# of the stack's soft limit (RLIMIT_STACK; 8 MiB by default: 2 MiB, measured exact to the
# byte on Linux 6.18), never more than three quarters of 8 MiB, never less than 32 pages.
_STACK_SHARE = 4
_MOST = (8 << 20) // 4 * 3
_LEAST = 32 * 4096
_POINTER = 8


@dataclass(frozen=True)
class PlanEnvironment:
    name: str
    variables: dict[str, str]


@dataclass(frozen=True)
class PlanStep:
    """One step of a session: `command` and `args` run (the action, or the hook wrapping
    `wrapped_*`); `label` names it in the log."""

    kind: str  # "enter", "build" or "exit"
    environment: int  # the index of its environment in `Plan.environments`; -1: the build
    label: str
    command: str
    args: list[str]
    timeout: float | None = None
    hook: str = ""  # "" when unwrapped, then no wrapped action either
    wrapped_command: str = ""
    wrapped_args: list[str] = field(default_factory=list)
    wrapped_timeout: float | None = None


@dataclass(frozen=True)
class Plan:
    """A build's session, for the runner: the grace between SIGTERM and SIGKILL, the
    names of the builder's environment that the derivation set (what a hook is told of,
    with the environments' variables and weft_env lines), the environments in entering
    order, and the steps (enters in order, the build, exits in reverse)."""

    grace: float
    declared: list[str]
    environments: list[PlanEnvironment]
    steps: list[PlanStep]


STEP_KINDS = ("enter", "build", "exit")


def encode_plan(plan: Plan) -> Fields:
    return {
        "grace": plan.grace,
        "declared": list(plan.declared),
        "environments": [[e.name, dict(e.variables)] for e in plan.environments],
        "steps": [dict(vars(s)) for s in plan.steps],
    }


def decode_plan(fields: Any) -> Plan:
    """A plan as the spawner reads it; ValueError or TypeError if it is none."""
    grace = fields["grace"]
    if not isinstance(grace, int | float) or not math.isfinite(grace) or grace < 0:
        raise ValueError("a plan's grace is a number of seconds")
    envs = [
        PlanEnvironment(str(name), dict(variables)) for name, variables in fields["environments"]
    ]
    steps = [PlanStep(**s) for s in fields["steps"]]
    for s in steps:
        if s.kind not in STEP_KINDS or not -1 <= s.environment < len(envs):
            raise ValueError(f"a plan's step {s.label!r}: kind or environment out of range")
    return Plan(float(grace), [str(n) for n in fields["declared"]], envs, steps)


@dataclass
class SpawnRequest:
    builder: str
    root: str  # a directory of the build slot's: <root>/<store_dir> is the store dir it sees
    build_dir: str  # bound read-write at /build
    store_dir: str
    host_uid: int  # what the build user maps to outside
    host_gid: int
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)  # store paths, bound read-only
    sandbox_paths: list[str] = field(default_factory=list)  # host paths, bound read-only
    # True (fixed-output builds): the network, through a namespace of the build's own
    # that pasta connects (spawner/pasta.py); never the host's network namespace.
    network: bool = False
    # False: a network namespace made for this build alone, never one a finished build
    # left (spawner/networks.py).  A build with the network always gets a new one.
    reuse_network: bool = True
    # The daemon's freezer directory: the builder's tree runs in a cgroup of its own in
    # it (best effort: the reply names it, or "").
    freezer: str = ""
    # A derivation with build environments: the session its runner runs (None: the
    # builder is exec'd, as ever).
    plan: Plan | None = None
    # A directory of the build slot's, bound read-write at /tmp (nosuid, nodev), so that
    # what the build wrote there outlives it (a `full` snapshot keeps it); "": a tmpfs of
    # the sandbox's own, as before.
    tmp_dir: str = ""
    # Outputs' store paths a restored snapshot put in the slot's store dir before the
    # build: kept there for the builder to go on with, not removed with the rest of what
    # earlier builds left.
    restored: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Spawned:
    """The builder has exec'd: its pid (the daemon's child, by adoption) and its cgroup."""

    pid: int
    cgroup: str  # "" if it runs in none of its own (the daemon pauses it with signals)


@dataclass(frozen=True)
class SetupFailure:
    """A step of the sandbox setup failed: which step, which errno, which path, and what
    the error said.  The spawner raises it as `SetupError`, the daemon as `SpawnError`."""

    step: str
    errno: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.step}: {self.message}" + (f" ({self.path})" if self.path else "")


SpawnReply = Spawned | SetupFailure


def encode_request(request: SpawnRequest) -> Fields:
    fields = dict(vars(request))
    # No `plan` key at all without one: such a request is what it was before plans.
    plan = fields.pop("plan")
    if plan is not None:
        fields["plan"] = encode_plan(plan)
    # Nor a `tmp_dir` key without one: such a request is what it was before it.
    if not fields["tmp_dir"]:
        del fields["tmp_dir"]
    if not fields["restored"]:
        del fields["restored"]
    return fields


def decode_request(fields: Fields) -> SpawnRequest:
    """A field missing or unknown raises TypeError, as the constructor does."""
    plan = fields.pop("plan", None)
    return SpawnRequest(**fields, plan=None if plan is None else decode_plan(plan))


def encode_reply(reply: SpawnReply) -> Fields:
    if isinstance(reply, Spawned):
        return {"status": "ok", "pid": reply.pid, "cgroup": reply.cgroup}
    return {
        "status": "error",
        "step": reply.step,
        "errno": reply.errno,
        "path": reply.path,
        "message": reply.message,
    }


def decode_reply(fields: Fields) -> SpawnReply:
    if fields.get("status") == "ok":
        return Spawned(int(fields["pid"]), str(fields.get("cgroup") or ""))
    return decode_failure(fields)


def decode_failure(fields: Fields) -> SetupFailure:
    """An error reply, or the spare program's report of one."""
    return SetupFailure(
        str(fields.get("step")),
        int(fields.get("errno") or 0),
        str(fields.get("path") or ""),
        str(fields.get("message")),
    )


def exec_room(stack_limit: int) -> int:
    """How many bytes execve takes for a program's path, arguments and environment, with
    `stack_limit` the soft RLIMIT_STACK (resource.RLIM_INFINITY: -1) the builder inherits:
    the kernel's ARG_MAX, which getconf reports as a quarter of the stack limit."""
    if stack_limit < 0:
        return _MOST
    return max(min(stack_limit // _STACK_SHARE, _MOST), _LEAST)


def exec_refusal(request: SpawnRequest, stack_limit: int) -> SetupFailure | None:
    """Why execve would refuse the builder's arguments and environment (E2BIG), naming
    the limit, or None: checked before anything of the sandbox is made."""
    strings = [request.builder, request.builder, *request.args]
    strings.extend(f"{k}={v}" for k, v in request.env.items())
    for i, s in enumerate(strings[1:]):
        size = len(s.encode(errors="surrogateescape")) + 1
        if size > MAX_ARG_STRLEN:
            name = f"variable {s.split('=')[0]}"
            what = f"argument {i}" if i <= len(request.args) else f"environment {name}"
            return SetupFailure(
                "exec",
                errno.E2BIG,
                request.builder,
                f"the builder's {what} is {size:,} bytes; execve takes at most "
                f"{MAX_ARG_STRLEN:,} per string (MAX_ARG_STRLEN)",
            )
    total = sum(len(s.encode(errors="surrogateescape")) + 1 + _POINTER for s in strings)
    room = exec_room(stack_limit)
    if total - _POINTER > room:
        return SetupFailure(
            "exec",
            errno.E2BIG,
            request.builder,
            f"the builder's arguments and environment take {total - _POINTER:,} bytes; "
            f"execve takes at most {room:,} (ARG_MAX: a quarter of the stack limit, "
            f"RLIMIT_STACK, at most 6 MiB)",
        )
    return None


# The first word of the runner's report (spawner/runner.c, which says the format).
REPORT_MAGIC = "weft-runner-1"
REPORT_ENDS = ("none", "ok", "exit", "signal", "timeout", "exec")


@dataclass(frozen=True)
class RunnerReport:
    """How a session ended, as its runner reported it: `step` (an index into the plan's
    steps; -1 for none) decided it, how it `end`ed (one of `REPORT_ENDS`) and its `code`
    (an exit code, a signal, an exit code or minus a signal after a timeout, an errno);
    whether the daemon stopped it, and the step that was running then (-1: none)."""

    step: int
    end: str
    code: int
    stopped: bool
    stop_step: int


def decode_report(data: bytes, steps: Sequence[PlanStep]) -> RunnerReport | None:
    """The runner's report of a plan of `steps`; None if `data` is not one (no report: the
    runner died before it wrote one), or says a step without a timeout timed out."""
    words = data.decode("ascii", "replace").split()
    if len(words) != 6 or words[0] != REPORT_MAGIC or words[2] not in REPORT_ENDS:
        return None
    try:
        step, code, stopped, stop_step = (int(w) for w in (words[1], *words[3:]))
    except ValueError:
        return None
    n = len(steps)
    if not (-1 <= step < n and -1 <= stop_step < n and stopped in (0, 1)):
        return None
    if words[2] == "timeout" and (step < 0 or not _has_timeout(steps[step])):
        return None
    return RunnerReport(step, words[2], code, bool(stopped), stop_step)


def _has_timeout(step: PlanStep) -> bool:
    return step.timeout is not None or step.wrapped_timeout is not None

"""The environment a runtime's command gets, computed as data from what its caller sent and
what the records say of its parent runtime.  No I/O: every rule is tested without a
daemon (tests/test_runtime_env.py), and `runtime-plan` and `runtime-start` share it.

The steps, in order: the base (the caller's environment, its parent's, its outermost
ancestor's, or nothing); `pure` and `keep`; the profiles' deltas, merged and applied with
uenv's semantics (`store.environment.delta`); `unset`; and `WEFT_RUNTIME`, the new
runtime's id.

Environments travel as bytes, as `os.environb` holds them: a value need not be UTF-8.
Deltas work on str, so names and values are decoded with `os.fsdecode` (surrogateescape)
and encoded back with `os.fsencode`, which gives back every byte as it was.
"""

import fnmatch
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from store.environment.delta import Change, Delta, VarType, apply, merge, valid_name
from store.errors import NotValid, StoreError

Env = Sequence[tuple[bytes, bytes]]

# What `pure` keeps of the base, as `nix-shell --pure` does: who and where the user is,
# their terminal, display, locale, time zone and shell.
PURE_KEEP = (
    "HOME",
    "USER",
    "LOGNAME",
    "TERM",
    "DISPLAY",
    "LANG",
    "LC_ALL",
    "TZ",
    "XAUTHORITY",
    "SHELL",
)
RUNTIME_VAR = "WEFT_RUNTIME"
# The most bytes an environment may take (each name, value, '=' and NUL): what execve
# accepts by default (a quarter of the usual 8 MiB stack limit), so a larger one could
# not be run anyway.  A request is already bounded by the frame limit (4 MiB); this bounds
# what a runtime stores, and what profiles' deltas may make an environment grow to.
MAX_ENV_BYTES = 2 << 20
# What of a client's id an error repeats: ids are 16 characters; a garbled
# WEFT_RUNTIME may be anything.
SHOWN_ID = 100


class EnvFrom(StrEnum):
    """Where the command's environment starts from; the values are `env_from` on the wire."""

    CURRENT = "current"
    PARENT = "parent"
    PRISTINE = "pristine"
    EMPTY = "empty"


class PlanError(StoreError):
    """A request whose environment cannot be computed (`bad-request`)."""


class UnknownRuntime(NotValid):
    """An id that is not one of the caller's runtimes: unknown, forgotten, or another
    user's, which must be told apart by nothing, not even the message."""

    def __init__(self, runtime_id: str) -> None:
        super().__init__(f"runtime {runtime_id[:SHOWN_ID]}: no runtime of yours with this id")


@dataclass(frozen=True, slots=True)
class Linked:
    """The caller's parent runtime is one of its user's: the environment its command got,
    and the captured environment of its outermost linked ancestor (itself, if it has no
    linked parent)."""

    id: str
    applied: Env
    pristine: Env


@dataclass(frozen=True, slots=True)
class Dangling:
    """The caller named a parent that is not one of its user's runtimes."""

    id: str


Parent = Linked | Dangling | None


@dataclass(frozen=True, slots=True)
class EnvRequest:
    caller: Env  # the caller's whole environment, before any change
    env_from: EnvFrom = EnvFrom.CURRENT
    pure: bool = False
    keep: tuple[str, ...] = ()
    unset: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EnvPlan:
    env: list[tuple[bytes, bytes]]  # what the command is to be exec'd with
    changes: list[Change]  # one per variable changed, in the order first changed


def compute(
    req: EnvRequest, parent: Parent, deltas: Iterable[Delta], runtime_id: str | None = None
) -> EnvPlan:
    """The environment for `req`: see the module's docstring for the steps."""
    for name in (*req.keep, *req.unset):
        if not valid_name(name, strict=False):
            raise PlanError(f"{name!r} is not an environment variable name")
    check_size(req.caller, "the caller's environment")
    caller = decode(req.caller)
    env = decode(base_env(req.env_from, req.caller, parent))
    if req.pure:
        kept = {*PURE_KEEP, *req.keep}
        env = {name: value for name, value in env.items() if name in kept}
    for name in req.keep:
        if name in caller:
            env[name] = caller[name]
    # Every change is told from the caller's environment, where the command's starts
    # from (`--print-env --format sh` is eval'd there): first what the start took away
    # or set differently.
    changes: dict[str, Change] = {}
    for name, old in caller.items():
        if name not in env:
            _record(changes, _removed(name, old))
    for name, value in env.items():
        if caller.get(name) != value:
            _record(changes, Change(name, VarType.SCALAR, "set", caller.get(name), value, value))
    env, applied = apply(merge(deltas), env)
    for change in applied:
        _record(changes, change)
    for name in req.unset:
        _record(changes, _removed(name, env.pop(name, None)))
    if runtime_id is not None:
        env[RUNTIME_VAR] = runtime_id
    out = encode(env)
    check_size(out, "the computed environment")
    return EnvPlan(out, list(changes.values()))


def base_env(env_from: EnvFrom, caller: Env, parent: Parent) -> Env:
    """What the environment starts from.  With no parent at all, the caller is outermost:
    its own environment is the pristine one."""
    if env_from is EnvFrom.CURRENT:
        return caller
    if env_from is EnvFrom.EMPTY:
        return ()
    if isinstance(parent, Dangling):
        raise UnknownRuntime(parent.id)
    if parent is None:
        if env_from is EnvFrom.PARENT:
            raise PlanError(f"--env-from parent: no parent runtime ({RUNTIME_VAR} is not set)")
        return caller
    return parent.applied if env_from is EnvFrom.PARENT else parent.pristine


def decode(env: Env) -> dict[str, str]:
    """`env` as str, in its order.  A name that is not one even leniently (empty, or with
    `=`), or a value with a NUL, cannot be exec'd and is dropped; of a name given twice
    the first counts, as getenv(3) and os.environ take it."""
    out: dict[str, str] = {}
    for raw_name, raw_value in env:
        name, value = os.fsdecode(raw_name), os.fsdecode(raw_value)
        if valid_name(name, strict=False) and "\0" not in value and name not in out:
            out[name] = value
    return out


def encode(env: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [(os.fsencode(name), os.fsencode(value)) for name, value in env.items()]


def env_size(env: Env) -> int:
    return sum(len(name) + len(value) + 2 for name, value in env)


def check_size(env: Env, what: str) -> None:
    size = env_size(env)
    if size > MAX_ENV_BYTES:
        raise PlanError(f"{what} takes {size} bytes, more than {MAX_ENV_BYTES} (execve's limit)")


def redact(env: Env, globs: Sequence[str]) -> list[tuple[bytes, bytes]]:
    """`env` without the variables whose names match one of `globs`, in any case (a
    `github_token` is as secret as a `GITHUB_TOKEN`): what a runtime may store."""
    patterns = [g.upper() for g in globs]
    return [
        (name, value)
        for name, value in env
        if not any(fnmatch.fnmatchcase(os.fsdecode(name).upper(), p) for p in patterns)
    ]


def _removed(name: str, old: str | None) -> Change:
    """A removal (by `--pure`, `--env-from`, `--unset`) is told as a scalar unset."""
    return Change(name, VarType.SCALAR, "unset", old, None, None)


def _record(changes: dict[str, Change], change: Change) -> None:
    """One change per variable: a later step's change to a variable already changed keeps
    the first's old value and joins the operations, as uenv joins a list's."""
    first = changes.get(change.name)
    if first is None:
        changes[change.name] = change
        return
    changes[change.name] = Change(
        change.name, change.type, f"{first.op},{change.op}", first.old, change.value, change.new
    )

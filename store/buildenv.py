"""Build environments: actions run around a builder, and wrap hooks (OpenJD's RFC 0008).

One build is one OpenJD session.  A derivation names environments in entering order;
each may set variables and have an `enter` and an `exit` action.  They are entered in
order before the builder runs and exited in reverse after it; an exit action runs even
when something failed or the build was stopped, for every environment that was entered
or whose enter was attempted.

One environment may be a wrapper: it defines all three hooks `wrap_env_enter`,
`wrap_build` and `wrap_env_exit`, or none.  The enter and exit actions of environments
after the wrapper are replaced by its env hooks, and the builder by `wrap_build`; the
environments before it, and the wrapper's own actions, run as they are.  Where there is
nothing to replace, no hook runs.  `session_steps` spells that order out, once, for the
runner and for tests.

Everything here is checked when a derivation is made or added (`check_environments`),
before any build starts: a refusal names the environment and what is wrong.
"""

import math
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from store.environment.delta import valid_name
from store.errors import StoreError

# More environments than a session has phases is a mistake, not a design; and each adds
# processes to every build of the derivation.
MAX_ENVIRONMENTS = 16
# An environment's name shows in the build log and in error messages: a label.
MAX_ENV_NAME = 64
# An action's timeout, seconds: a day, longer than any build's enter or exit should take.
MAX_ACTION_TIMEOUT = 86400.0
HOOKS = ("wrap_env_enter", "wrap_build", "wrap_env_exit")


class BuildEnvError(StoreError, ValueError):
    """Environments a derivation cannot have: the message names the environment."""


@dataclass(frozen=True, slots=True)
class Action:
    command: str
    args: tuple[str, ...] = ()
    timeout: float | None = None  # seconds; None: the build's own limits only

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"command": self.command, "args": list(self.args)}
        if self.timeout is not None:
            doc["timeout"] = self.timeout
        return doc


@dataclass(frozen=True, slots=True)
class BuildEnvironment:
    name: str
    variables: Mapping[str, str] = field(default_factory=dict)
    enter: Action | None = None
    exit: Action | None = None
    wrap_env_enter: Action | None = None
    wrap_build: Action | None = None
    wrap_env_exit: Action | None = None

    @property
    def is_wrapper(self) -> bool:
        return self.wrap_build is not None

    def actions(self) -> list[Action]:
        return [
            a
            for a in (
                self.enter,
                self.exit,
                self.wrap_env_enter,
                self.wrap_build,
                self.wrap_env_exit,
            )
            if a is not None
        ]

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name}
        if self.variables:
            doc["variables"] = dict(self.variables)
        for key in ("enter", "exit", *HOOKS):
            action = getattr(self, key)
            if action is not None:
                doc[key] = action.to_json()
        return doc


class StepKind(StrEnum):
    ENTER = "enter"
    BUILD = "build"
    EXIT = "exit"


@dataclass(frozen=True, slots=True)
class Step:
    """One process of a session: `action` as it runs, or the hook that wraps `wrapped`."""

    kind: StepKind
    environment: str | None  # None for the build
    action: Action  # what runs: the action itself, or the hook
    wrapped: Action | None = None  # what the hook wraps, None when unwrapped
    hook: str | None = None  # "wrap_env_enter", "wrap_build", "wrap_env_exit" or None

    @property
    def label(self) -> str:
        """What the build log calls it: `enter tools`, `wrap_build`, `wrap_env_exit inner`."""
        what = self.hook or str(self.kind)
        return what if self.environment is None else f"{what} {self.environment}"


def session_steps(
    envs: Sequence[BuildEnvironment], builder: Action
) -> tuple[list[Step], Step, list[Step]]:
    """The enter steps in order, the build step, and the exit steps in exiting order
    (reverse), each environment's exit step present only if it has an exit action (and,
    after the wrapper, replaced by the hook).  Which of them run is the runner's: an
    enter that fails stops the entering, and then only the exits of environments entered
    or attempted run."""
    wrapper = next((i for i, e in enumerate(envs) if e.is_wrapper), None)
    enters: list[Step] = []
    exits: list[Step] = []
    for i, env in enumerate(envs):
        wrapped_by = envs[wrapper] if wrapper is not None and i > wrapper else None
        for kind, action, hook in (
            (StepKind.ENTER, env.enter, "wrap_env_enter"),
            (StepKind.EXIT, env.exit, "wrap_env_exit"),
        ):
            if action is None:
                continue
            if wrapped_by is None:
                step = Step(kind, env.name, action)
            else:
                step = Step(kind, env.name, getattr(wrapped_by, hook), action, hook)
            (enters if kind is StepKind.ENTER else exits).append(step)
    if wrapper is None:
        build = Step(StepKind.BUILD, None, builder)
    else:
        hook = envs[wrapper].wrap_build
        assert hook is not None
        build = Step(StepKind.BUILD, None, hook, builder, "wrap_build")
    return enters, build, list(reversed(exits))


def check_environments(
    envs: Sequence[BuildEnvironment], inputs: Iterable[str], where: str = ""
) -> None:
    """Refuse what no build could run: names, variables, incomplete or second wrappers,
    bad timeouts, and programs that are not among the derivation's inputs (`inputs`: the
    input store paths, sources and outputs of input derivations)."""
    if len(envs) > MAX_ENVIRONMENTS:
        raise BuildEnvError(f"{where}{len(envs)} environments: at most {MAX_ENVIRONMENTS}")
    names: set[str] = set()
    wrappers: list[str] = []
    inputs = list(inputs)  # read twice: a generator would leave `exact` empty
    prefixes = tuple(p.rstrip("/") + "/" for p in inputs)
    exact = {p.rstrip("/") for p in inputs}
    for env in envs:
        _check_name(env.name, names, where)
        at = f"{where}environment {env.name}: "
        for key, value in env.variables.items():
            if not (isinstance(key, str) and valid_name(key)) or not (
                isinstance(value, str) and "\0" not in value
            ):
                raise BuildEnvError(
                    f"{at}variable {key!r}: a name of letters, digits and '_' "
                    "with a string value without NUL"
                )
        hooks = [h for h in HOOKS if getattr(env, h) is not None]
        if hooks and len(hooks) != len(HOOKS):
            missing = [h for h in HOOKS if h not in hooks]
            raise BuildEnvError(
                f"{at}a wrapper defines all of {', '.join(HOOKS)} or none; "
                f"{', '.join(missing)} missing"
            )
        if hooks:
            wrappers.append(env.name)
        for action in env.actions():
            _check_action(action, at, prefixes, exact)
    if len(wrappers) > 1:
        raise BuildEnvError(f"{where}two wrappers for one build: {', '.join(wrappers)}")


def _check_name(name: object, seen: set[str], where: str) -> None:
    if (
        not isinstance(name, str)
        or not name
        or len(name) > MAX_ENV_NAME
        or not name.isprintable()
        or name != name.strip()
    ):
        raise BuildEnvError(
            f"{where}environment name {name!r}: 1 to {MAX_ENV_NAME} printable characters, "
            "no leading or trailing space"
        )
    if name in seen:
        raise BuildEnvError(f"{where}two environments named {name!r}")
    seen.add(name)


def _check_action(action: Action, at: str, prefixes: tuple[str, ...], exact: set[str]) -> None:
    command = action.command
    # A `..` (or `.`, `//`) would let a program outside the inputs pass as one inside.
    if (
        not isinstance(command, str)
        or posixpath.normpath(command) != command
        or not (command in exact or command.startswith(prefixes))
    ):
        raise BuildEnvError(
            f"{at}the program {command!r} is not in the derivation's inputs: an action runs "
            "a program of an input store path"
        )
    for s in (command, *action.args):
        if not isinstance(s, str) or "\0" in s:
            raise BuildEnvError(f"{at}an action's command and arguments are strings without NUL")
    t = action.timeout
    if t is not None and (
        isinstance(t, bool)
        or not isinstance(t, int | float)
        or not math.isfinite(t)
        or not 0 < t <= MAX_ACTION_TIMEOUT
    ):
        raise BuildEnvError(f"{at}a timeout is a number of seconds in (0, {MAX_ACTION_TIMEOUT:g}]")


def parse_environments(doc: object, where: str = "") -> tuple[BuildEnvironment, ...]:
    """The `environments` of a derivation's JSON, strictly: unknown keys and values of the
    wrong type refused (what the values may be is `check_environments`')."""
    if not isinstance(doc, list) or not doc:
        raise BuildEnvError(f"{where}environments must be a non-empty list")
    return tuple(_parse_environment(e, where) for e in doc)


def _parse_environment(doc: object, where: str) -> BuildEnvironment:
    if not isinstance(doc, dict):
        raise BuildEnvError(f"{where}an environment is an object")
    unknown = sorted(set(doc) - {"name", "variables", "enter", "exit", *HOOKS})
    name = doc.get("name")
    if unknown:
        raise BuildEnvError(f"{where}environment {name!r}: unknown keys {unknown}")
    variables = doc.get("variables", {})
    if not isinstance(name, str):
        raise BuildEnvError(f"{where}an environment's name is a string, not {name!r}")
    if (
        not isinstance(variables, dict)
        or (not variables and "variables" in doc)
        or not all(isinstance(v, str) for v in variables.values())
    ):
        raise BuildEnvError(
            f"{where}environment {name!r}: variables is a non-empty object of strings"
        )
    actions = {
        k: _parse_action(doc[k], f"{where}environment {name!r}: {k}")
        for k in ("enter", "exit", *HOOKS)
        if k in doc
    }
    return BuildEnvironment(name=name, variables=variables, **actions)  # type: ignore[arg-type]


def _parse_action(doc: object, where: str) -> Action:
    if not isinstance(doc, dict) or not set(doc) <= {"command", "args", "timeout"}:
        raise BuildEnvError(f"{where}: an action is {{command, args, timeout}}")
    command, args, timeout = doc.get("command"), doc.get("args", []), doc.get("timeout")
    if not isinstance(command, str):
        raise BuildEnvError(f"{where}: command is a string")
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise BuildEnvError(f"{where}: args is a list of strings")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)):
        raise BuildEnvError(f"{where}: timeout is a number of seconds")
    return Action(command, tuple(args), timeout)


def environments_to_json(envs: Sequence[BuildEnvironment]) -> list[dict[str, Any]]:
    return [e.to_json() for e in envs]

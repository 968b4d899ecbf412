"""How recipes write build environments (`environment(...)`, `derivation(...,
environments=[...])`): each checked as one read from a `.drv` is, naming the environment.
Kept apart from `store.recipe`, and loaded only by recipes that use environments: a
recipe's evaluation starts with that module's imports.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence

from store.buildenv import Action, BuildEnvError, BuildEnvironment, check_environments

# An action as recipes write it: `action(...)`, or `[command, *args]`.
ActionSpec = Action | Sequence[object]
# `store.recipe.action`, which knows the recipe's derivations.
MakeAction = Callable[..., Action]


def make_environment(
    name: str,
    hooks: Mapping[str, ActionSpec | None],
    variables: Mapping[str, object] | None,
    action: MakeAction,
) -> BuildEnvironment:
    """`store.recipe.environment`: checked now, but for what needs the derivation (its
    inputs, the other environments)."""
    actions = {
        k: _action(v, f"environment {name}: {k}", action) for k, v in hooks.items() if v is not None
    }
    if variables is not None and not isinstance(variables, Mapping):
        raise BuildEnvError(f"environment {name}: variables is a mapping of names to strings")
    values = {k: str(v) for k, v in (variables or {}).items()}
    made = BuildEnvironment(name, values, **actions)
    # Each program taken as its own input: whether it is among the derivation's inputs is
    # for `derivation` to say.
    check_environments([made], [a.command for a in made.actions() if isinstance(a.command, str)])
    return made


def _action(spec: ActionSpec, where: str, action: MakeAction) -> Action:
    if isinstance(spec, Action):
        return spec
    # A string would be one program's path, not a command line split as a shell would.
    if isinstance(spec, str) or not isinstance(spec, Sequence) or not spec:
        raise BuildEnvError(f"{where}: an action is action(...) or a list [command, *args]")
    try:
        return action(*spec)
    except BuildEnvError as e:
        raise BuildEnvError(f"{where}: {e}") from None


def checked(given: Iterable[BuildEnvironment], name: str) -> tuple[BuildEnvironment, ...]:
    """A derivation's `environments`, checked but for the programs (which need the
    inputs, found from them)."""
    if isinstance(given, BuildEnvironment):
        raise BuildEnvError(f"{name}: environments must be a list, not one environment")
    envs = tuple(given or ())
    for e in envs:
        if not isinstance(e, BuildEnvironment):
            raise BuildEnvError(f"{name}: environments are made by environment(), not {e!r}")
    commands = [a.command for e in envs for a in e.actions() if isinstance(a.command, str)]
    check_environments(envs, commands, f"{name}: ")
    return envs


def strings(envs: Iterable[BuildEnvironment]) -> list[str]:
    """Where recipes name store paths in environments: programs, arguments, variables."""
    return [
        s
        for e in envs
        for s in (*e.variables.values(), *(t for a in e.actions() for t in (a.command, *a.args)))
    ]

"""Build environments as data (`store.buildenv`, issue 21): the order of a session's steps
and which of them the wrapper's hooks replace, every refusal of `check_environments`, the
JSON form (round trip, strict parsing), the `environments` field of a derivation, and the
recipe API as far as it needs no store.

All pure: no daemon, no sandbox; `tests/test_buildenv_derivations.py` goes through a real
daemon."""

import json
import math

import blake3
import pytest

from store import nar
from store.buildenv import (
    HOOKS,
    MAX_ACTION_TIMEOUT,
    MAX_ENV_NAME,
    MAX_ENVIRONMENTS,
    Action,
    BuildEnvError,
    BuildEnvironment,
    Step,
    StepKind,
    check_environments,
    environments_to_json,
    parse_environments,
    session_steps,
)
from store.derivation import Derivation, DerivationError, Output
from store.hashing import format_hash
from store.paths import PathKind, make_store_path
from store.recipe import action, derivation, environment, using

S = "/weft/store"
TOOLS = f"{S}/{'1' * 32}-tools"
HOOKS_PKG = f"{S}/{'2' * 32}-hooks"
SH = f"{TOOLS}/bin/sh"
HOOK = f"{HOOKS_PKG}/bin/hook"
INPUTS = [TOOLS, HOOKS_PKG]
BUILDER = Action(SH, ("-c", "build"))


def act(what: str, *args: str) -> Action:
    return Action(SH, (what, *args))


def wrapper(name: str = "logging", **actions: Action) -> BuildEnvironment:
    hooks = {h: Action(HOOK, (h,)) for h in HOOKS}
    return BuildEnvironment(name, **{**hooks, **actions})  # type: ignore[arg-type]


def labels(envs: list[BuildEnvironment]) -> tuple[list[str], str, list[str]]:
    enters, build, exits = session_steps(envs, BUILDER)
    return [s.label for s in enters], build.label, [s.label for s in exits]


# -- the order of a session --


def test_without_a_wrapper_enters_run_in_order_and_exits_in_reverse() -> None:
    envs = [
        BuildEnvironment("a", enter=act("enter a"), exit=act("exit a")),
        BuildEnvironment("b", enter=act("enter b")),
        BuildEnvironment("c", exit=act("exit c")),
    ]
    assert labels(envs) == (["enter a", "enter b"], "build", ["exit c", "exit a"])
    enters, build, exits = session_steps(envs, BUILDER)
    assert build == Step(StepKind.BUILD, None, BUILDER)
    # Unwrapped: each step runs its own action.
    assert [s.action for s in enters] == [act("enter a"), act("enter b")]
    assert all(s.wrapped is None and s.hook is None for s in [*enters, *exits])
    assert [s.kind for s in exits] == [StepKind.EXIT, StepKind.EXIT]


def test_no_environments_is_the_builder_alone() -> None:
    assert session_steps([], BUILDER) == ([], Step(StepKind.BUILD, None, BUILDER), [])


def test_environments_without_enter_or_exit_actions_add_no_steps() -> None:
    envs = [BuildEnvironment("vars", variables={"A": "1"}), BuildEnvironment("empty")]
    assert labels(envs) == ([], "build", [])


def test_a_wrapper_first_wraps_every_later_environment_and_the_builder() -> None:
    envs = [
        wrapper(enter=act("start"), exit=act("stop")),
        BuildEnvironment("inner", enter=act("enter inner"), exit=act("exit inner")),
    ]
    assert labels(envs) == (
        ["enter logging", "wrap_env_enter inner"],
        "wrap_build",
        ["wrap_env_exit inner", "exit logging"],
    )
    enters, build, exits = session_steps(envs, BUILDER)
    # The wrapper's own actions run as they are.
    assert enters[0] == Step(StepKind.ENTER, "logging", act("start"))
    assert exits[1] == Step(StepKind.EXIT, "logging", act("stop"))
    # The hook runs, with what it wraps beside it.
    assert enters[1] == Step(
        StepKind.ENTER,
        "inner",
        Action(HOOK, ("wrap_env_enter",)),
        act("enter inner"),
        "wrap_env_enter",
    )
    assert build == Step(StepKind.BUILD, None, Action(HOOK, ("wrap_build",)), BUILDER, "wrap_build")
    assert exits[0] == Step(
        StepKind.EXIT, "inner", Action(HOOK, ("wrap_env_exit",)), act("exit inner"), "wrap_env_exit"
    )


def test_a_wrapper_in_the_middle_leaves_the_environments_before_it_unwrapped() -> None:
    envs = [
        BuildEnvironment("outer", enter=act("enter outer"), exit=act("exit outer")),
        wrapper(enter=act("start"), exit=act("stop")),
        BuildEnvironment("inner", enter=act("enter inner"), exit=act("exit inner")),
        BuildEnvironment("innermost", exit=act("exit innermost")),
    ]
    assert labels(envs) == (
        ["enter outer", "enter logging", "wrap_env_enter inner"],
        "wrap_build",
        ["wrap_env_exit innermost", "wrap_env_exit inner", "exit logging", "exit outer"],
    )
    enters, _, exits = session_steps(envs, BUILDER)
    assert enters[0].action == act("enter outer") and enters[0].hook is None
    assert exits[-1].action == act("exit outer") and exits[-1].hook is None
    assert exits[0].wrapped == act("exit innermost")


def test_a_wrapper_last_wraps_only_the_builder() -> None:
    envs = [
        BuildEnvironment("outer", enter=act("enter outer"), exit=act("exit outer")),
        wrapper(),
    ]
    assert labels(envs) == (["enter outer"], "wrap_build", ["exit outer"])


def test_the_issues_example_a_logging_wrapper_around_an_inner_env_without_exit() -> None:
    # Where there is nothing to replace, no hook runs: no wrap_env_exit.
    envs = [wrapper(), BuildEnvironment("inner", enter=act("enter inner"))]
    assert labels(envs) == (["wrap_env_enter inner"], "wrap_build", [])
    enters, build, _ = session_steps(envs, BUILDER)
    assert enters[0].wrapped == act("enter inner")
    assert build.wrapped == BUILDER and build.action == Action(HOOK, ("wrap_build",))


# -- check_environments: what is accepted --


def test_a_valid_session_passes_the_checks() -> None:
    envs = [
        BuildEnvironment("outer", {"LANG": "C"}, enter=Action(SH, ("-c", "x"), timeout=0.5)),
        wrapper(exit=Action(SH, timeout=MAX_ACTION_TIMEOUT)),
        BuildEnvironment("inner", {"_A1": ""}, exit=Action(HOOK)),
    ]
    check_environments(envs, INPUTS)
    check_environments([], [])


def test_a_program_that_is_an_input_itself_or_in_one_is_accepted() -> None:
    script = f"{S}/{'3' * 32}-script.sh"
    env = BuildEnvironment("e", enter=Action(script), exit=Action(SH))
    check_environments([env], [script, TOOLS])
    # Inputs given once, as an iterator, are read whole (both checks see them).
    check_environments([env], iter([script, TOOLS]))


# -- check_environments: every refusal --


def refused(envs: list[BuildEnvironment], says: str, inputs: list[str] = INPUTS) -> None:
    with pytest.raises(BuildEnvError) as e:
        check_environments(envs, inputs, "app: ")
    assert e.value.args[0].startswith("app: ")
    assert says in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "name", ["", " lead", "trail ", "a\nb", "tab\t", "x" * (MAX_ENV_NAME + 1), None, 5]
)
def test_an_environment_name_that_is_no_label_is_refused(name: object) -> None:
    refused([BuildEnvironment(name)], f"environment name {name!r}")  # type: ignore[arg-type]


def test_names_of_up_to_the_limit_are_accepted() -> None:
    check_environments([BuildEnvironment("x" * MAX_ENV_NAME), BuildEnvironment("a b-c.d")], [])


def test_two_environments_of_one_name_are_refused() -> None:
    refused(
        [BuildEnvironment("tools"), BuildEnvironment("tools")], "two environments named 'tools'"
    )


def test_more_environments_than_the_limit_are_refused() -> None:
    envs = [BuildEnvironment(f"e{i}") for i in range(MAX_ENVIRONMENTS + 1)]
    refused(envs, f"{MAX_ENVIRONMENTS + 1} environments: at most {MAX_ENVIRONMENTS}")
    check_environments(envs[:MAX_ENVIRONMENTS], [])


@pytest.mark.parametrize(
    ("variables", "says"),
    [
        ({"1A": "x"}, "variable '1A'"),
        ({"A-B": "x"}, "variable 'A-B'"),
        ({"A=B": "x"}, "variable 'A=B'"),
        ({"": "x"}, "variable ''"),
        ({"A": 5}, "variable 'A'"),
        ({"A": None}, "variable 'A'"),
        ({"A": "a\0b"}, "variable 'A'"),
        ({5: "x"}, "variable 5"),
    ],
)
def test_a_bad_variable_is_refused_by_name(variables: dict[object, object], says: str) -> None:
    refused([BuildEnvironment("tools", variables)], f"environment tools: {says}")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "present",
    [("wrap_build",), ("wrap_env_enter",), ("wrap_env_exit",), ("wrap_env_enter", "wrap_build")],
)
def test_a_wrapper_defining_some_hooks_but_not_all_is_refused(present: tuple[str, ...]) -> None:
    env = BuildEnvironment("logging", **{h: Action(HOOK) for h in present})  # type: ignore[arg-type]
    missing = ", ".join(h for h in HOOKS if h not in present)
    refused([env], f"environment logging: a wrapper defines all of {', '.join(HOOKS)} or none")
    refused([env], f"{missing} missing")


def test_two_wrappers_for_one_build_are_refused_naming_both() -> None:
    refused(
        [wrapper("one"), BuildEnvironment("mid"), wrapper("two")],
        "two wrappers for one build: one, two",
    )


@pytest.mark.parametrize(
    "command",
    [
        "/bin/sh",  # the host's: not in the sandbox
        "sh",  # relative: found nowhere
        f"{TOOLS}-extra/bin/sh",  # a prefix of the name is not the path
        f"{TOOLS}/../{'9' * 32}-other/bin/sh",  # climbing out of an input
        f"{TOOLS}/bin/../../{'9' * 32}-other",
        f"{TOOLS}//bin/sh",
        f"{TOOLS}/./bin/sh",
        f"{TOOLS}/",
        S,
    ],
)
def test_a_program_outside_the_inputs_is_refused(command: str) -> None:
    env = BuildEnvironment("tools", enter=Action(command))
    refused([env], f"environment tools: the program {command!r} is not in the derivation's inputs")


@pytest.mark.parametrize("hook", HOOKS)
def test_a_hook_outside_the_inputs_is_refused_too(hook: str) -> None:
    env = wrapper(**{hook: Action("/usr/bin/env")})
    refused([env], "the program '/usr/bin/env' is not in the derivation's inputs")


def test_a_program_of_an_input_not_given_is_refused() -> None:
    env = BuildEnvironment("tools", exit=Action(HOOK))
    refused([env], f"the program {HOOK!r}", inputs=[TOOLS])


@pytest.mark.parametrize(
    "action",
    [
        Action(SH, ("a\0b",)),
        Action(SH, (5,)),  # type: ignore[arg-type]
        Action(SH, (None,)),  # type: ignore[arg-type]
        Action(f"{TOOLS}/bin/s\0h"),
    ],
)
def test_arguments_that_cannot_reach_a_program_are_refused(action: Action) -> None:
    refused([BuildEnvironment("tools", enter=action)], "strings without NUL")


@pytest.mark.parametrize("command", [5, None, [SH]])
def test_a_command_that_is_no_path_is_refused(command: object) -> None:
    refused([BuildEnvironment("tools", enter=Action(command))], "environment tools: the program")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "timeout",
    [0, -1, 0.0, MAX_ACTION_TIMEOUT + 1, math.nan, math.inf, True, "5", [5]],
)
def test_a_timeout_out_of_range_or_not_a_number_is_refused(timeout: object) -> None:
    env = BuildEnvironment("tools", exit=Action(SH, timeout=timeout))  # type: ignore[arg-type]
    refused(
        [env], f"environment tools: a timeout is a number of seconds in (0, {MAX_ACTION_TIMEOUT:g}]"
    )


# -- the JSON form --

FULL = (
    BuildEnvironment("outer", {"LANG": "C", "TZ": "UTC"}, enter=act("in"), exit=act("out")),
    wrapper(enter=Action(SH, (), 2.5), exit=Action(SH, ("x",), 30)),
    BuildEnvironment("inner", enter=act("in")),
    BuildEnvironment("bare"),
)


def test_environments_round_trip_through_their_json() -> None:
    text = json.dumps(environments_to_json(FULL), sort_keys=True)
    assert parse_environments(json.loads(text)) == FULL
    doc = environments_to_json(FULL)
    # Only what is set is written; args always, timeout only when there is one.
    assert doc[3] == {"name": "bare"}
    assert doc[0]["enter"] == {"command": SH, "args": ["in"]}
    assert doc[1]["enter"] == {"command": SH, "args": [], "timeout": 2.5}
    assert set(doc[1]) == {"name", "enter", "exit", *HOOKS}


def env_doc(**changes: object) -> dict[str, object]:
    doc: dict[str, object] = {"name": "tools", "enter": {"command": SH, "args": []}}
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not DROP}


DROP = object()


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ({"name": "tools"}, "environments must be a non-empty list"),
        ([], "environments must be a non-empty list"),
        (None, "environments must be a non-empty list"),
        (["tools"], "an environment is an object"),
        ([env_doc(onEnter={"command": SH})], "environment 'tools': unknown keys ['onEnter']"),
        ([env_doc(name=DROP)], "an environment's name is a string, not None"),
        ([env_doc(name=["tools"])], "an environment's name is a string"),
        ([env_doc(variables=[])], "environment 'tools': variables is a non-empty object"),
        ([env_doc(variables={})], "variables is a non-empty object"),
        ([env_doc(variables={"A": 1})], "variables is a non-empty object of strings"),
        ([env_doc(variables={"A": None})], "variables is a non-empty object of strings"),
        ([env_doc(enter=[SH])], "environment 'tools': enter: an action is"),
        ([env_doc(exit={"command": SH, "env": {}})], "environment 'tools': exit: an action is"),
        ([env_doc(enter={"args": []})], "enter: command is a string"),
        ([env_doc(enter={"command": 5})], "enter: command is a string"),
        ([env_doc(enter={"command": SH, "args": "-c"})], "enter: args is a list of strings"),
        ([env_doc(enter={"command": SH, "args": [1]})], "enter: args is a list of strings"),
        ([env_doc(enter={"command": SH, "timeout": "5"})], "enter: timeout is a number"),
        ([env_doc(enter={"command": SH, "timeout": True})], "enter: timeout is a number"),
        ([env_doc(wrap_build={"command": SH, "timeout": {}})], "wrap_build: timeout is a number"),
    ],
)
def test_parsing_refuses_unknown_keys_and_wrong_types_by_name(doc: object, says: str) -> None:
    with pytest.raises(BuildEnvError) as e:
        parse_environments(doc, "environments: ")
    assert str(e.value).startswith("environments: ")
    assert says in str(e.value), str(e.value)


# -- the derivation's field --


def drv(**changes: object) -> Derivation:
    return Derivation("x", SH, {"out": Output("/s/x")}, env={"out": "/s/x"}, **changes)  # type: ignore[arg-type]


def test_a_derivation_without_environments_writes_no_environments_key() -> None:
    plain = drv()
    assert "environments" not in json.loads(plain.to_json())
    assert Derivation.from_json(plain.to_json()).environments == ()
    assert drv(environments=()).to_json() == plain.to_json()


def test_environments_are_written_in_the_derivations_json_and_parsed_back() -> None:
    with_envs = drv(environments=FULL)
    doc = json.loads(with_envs.to_json())
    assert doc["environments"] == environments_to_json(FULL)
    assert [e["name"] for e in doc["environments"]] == ["outer", "logging", "inner", "bare"]
    assert Derivation.from_json(with_envs.to_json()) == with_envs


def with_doc(**changes: object) -> str:
    doc = json.loads(drv().to_json())
    doc.update(changes)
    return json.dumps(doc)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (with_doc(environments=[]), "environments: environments must be a non-empty list"),
        (
            with_doc(environments=[{"name": "tools", "frob": 1}]),
            "environment 'tools': unknown keys",
        ),
        (with_doc(environments=[env_doc(enter={"command": 5})]), "environment 'tools': enter"),
        # Not the text `to_json` writes for it: args are always written.
        (with_doc(environments=[env_doc(enter={"command": SH})]), "not as weft writes them"),
        (with_doc(environment=[env_doc()]), "unknown fields ['environment']"),
    ],
)
def test_malformed_environments_in_a_derivation_are_a_derivation_error(
    text: str, says: str
) -> None:
    with pytest.raises(DerivationError) as e:
        Derivation.from_json(text)
    assert str(e.value).startswith("malformed derivation: ")
    assert says in str(e.value), str(e.value)


# -- the recipe API, against a store of no files --


class PathsOnly:
    """A recipe store that writes nothing: the paths a store at /weft/store would give."""

    store_dir = S

    def __init__(self) -> None:
        self.added: list[str] = []

    def add_source(self, path: str, name: str) -> str:
        raise AssertionError("no sources here")

    def add_text(self, name: str, text: str, references: list[str]) -> str:
        data = text.encode()
        archive = nar.HEADER + nar.file_header(False, len(data)) + data
        archive += nar.file_trailer(len(data))
        content = format_hash(blake3.blake3(archive).digest())
        self.added.append(name)
        return str(make_store_path(PathKind.TEXT, content, S, name, references))


def test_a_recipe_environment_names_store_paths_as_inputs_and_enters_the_hash() -> None:
    store = PathsOnly()
    with using(store):
        tools = derivation("tools", "/bin/sh", ["-c", "mkdir -p $out/bin"], outputs=("out", "dev"))
        plain = derivation("app", "/bin/sh", ["-c", "echo > $out"])
        again = derivation("app", "/bin/sh", ["-c", "echo > $out"], environments=[])
        env = environment(
            "tools",
            enter=[f"{tools}/bin/sh", "-c", "setup"],
            exit=action(f"{tools}/bin/sh", tools.outputs["dev"], timeout=5),
            variables={"TOOLS": tools, "N": 3},
        )
        app = derivation("app", "/bin/sh", ["-c", "echo > $out"], environments=[env])
    assert again.path == plain.path and again.out == plain.out
    assert app.out != plain.out and app.path != plain.path
    assert dict(app.drv.input_drvs) == {tools.path: ("dev", "out")}
    assert app.drv.environments == (env,)
    assert env.variables == {"TOOLS": tools.out, "N": "3"}
    assert env.exit == Action(f"{tools}/bin/sh", (tools.outputs["dev"],), 5)
    assert Derivation.from_json(app.drv.to_json()) == app.drv


def test_recipe_mistakes_are_refused_when_called_naming_the_environment() -> None:
    store = PathsOnly()
    with using(store):
        with pytest.raises(BuildEnvError, match="environment logging: a wrapper defines all"):
            environment("logging", wrap_build=["/bin/true"])
        with pytest.raises(BuildEnvError, match="environment tools: enter: an action is"):
            environment("tools", enter="/bin/sh -c setup")  # type: ignore[arg-type]
        with pytest.raises(BuildEnvError, match="environment tools: exit: an action is"):
            environment("tools", exit=[])
        with pytest.raises(BuildEnvError, match="environment tools: enter: an action's command"):
            environment("tools", enter=[["/bin/sh"]])
        with pytest.raises(BuildEnvError, match="environment tools: a timeout"):
            environment("tools", enter=action("/bin/sh", timeout=0))
        with pytest.raises(BuildEnvError, match="environment tools: variables is a mapping"):
            environment("tools", variables=["A"])  # type: ignore[arg-type]
        with pytest.raises(BuildEnvError, match="environment tools: variable 'A-B'"):
            environment("tools", variables={"A-B": "x"})
        hosted = environment("tools", enter=["/bin/sh", "-c", "setup"])
        with pytest.raises(BuildEnvError, match="app: environment tools: the program '/bin/sh'"):
            derivation("app", "/bin/sh", ["-c", "true"], environments=[hosted])
        w1 = environment("w1", **{h: ["/bin/true"] for h in HOOKS})  # type: ignore[arg-type]
        w2 = environment("w2", **{h: ["/bin/true"] for h in HOOKS})  # type: ignore[arg-type]
        with pytest.raises(BuildEnvError, match="app: two wrappers for one build: w1, w2"):
            derivation("app", "/bin/sh", ["-c", "true"], environments=[w1, w2])
        with pytest.raises(BuildEnvError, match="app: two environments named 'w1'"):
            derivation("app", "/bin/sh", ["-c", "true"], environments=[w1, w1])
        with pytest.raises(BuildEnvError, match="app: environments must be a list"):
            derivation("app", "/bin/sh", ["-c", "true"], environments=w1)  # type: ignore[arg-type]
        with pytest.raises(BuildEnvError, match="app: environments are made by environment"):
            derivation("app", "/bin/sh", ["-c", "true"], environments=[{"name": "x"}])  # type: ignore[list-item]
    assert store.added == []

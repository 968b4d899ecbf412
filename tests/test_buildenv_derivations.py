"""Derivations with build environments through a real daemon (issue 21, item 1): what a
recipe writes and the store reads back, what `add-text` refuses before anything is
registered (the error naming the environment), a recipe file whose mistake stops
`store-build` before anything is built, and derivations without environments as they
were.  How builds run the environments is tests/test_runner.py's and
tests/test_environments.py's."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.daemons import DaemonProc
from daemon.cli.blocking import DaemonError
from store import Store
from store.buildenv import HOOKS, Action, BuildEnvError, BuildEnvironment
from store.derivation import Derivation, DerivationError, HashModulo, Output, with_output_paths
from store.recipe import Derivation as Made
from store.recipe import LocalStore, action, derivation, environment, using
from tests.daemon_fixtures import Graph

BIN = Path(sys.executable).parent


def _store_entries(store_dir: str) -> list[str]:
    return sorted(e for e in os.listdir(store_dir) if not e.startswith("."))


def _read(path: str) -> Derivation:
    return Derivation.from_json(Path(path).read_text())


def _tools(graph: Graph) -> Made:
    """A derivation with two outputs, each with a `bin/setup` (never run here)."""
    return graph.sh(
        "tools",
        "mkdir -p $out/bin $dev/bin && echo > $out/bin/setup && echo > $dev/bin/setup",
        outputs=("out", "dev"),
    )


def test_a_recipes_environments_are_written_to_the_store_and_read_back(graph: Graph) -> None:
    tools = _tools(graph)
    sh = f"{graph.bb}/bin/sh"
    hook = [sh, "-c", 'exec "$@"', "hook"]
    logging = environment("logging", **{h: hook for h in HOOKS})  # type: ignore[arg-type]
    setup = environment(
        "tools",
        variables={"TOOLS": tools, "LANG": "C"},
        enter=action(f"{tools}/bin/setup", "--prefix", tools.outputs["dev"], timeout=30),
        exit=[sh, "-c", "echo bye"],
    )
    app = graph.sh("app", "echo > $out", environments=[logging, setup])
    stored = _read(app.path)
    assert stored == app.drv
    assert stored.environments == (logging, setup)
    assert stored.environments[1].enter == Action(
        f"{tools.out}/bin/setup", ("--prefix", tools.outputs["dev"]), 30
    )
    # The store paths in actions and variables are inputs, with the outputs used.
    assert dict(stored.input_drvs) == {tools.path: ("dev", "out")}
    assert sorted(graph.client.call("references", path=app.path)) == sorted([tools.path, graph.bb])
    assert json.loads(Path(app.path).read_text())["environments"][0]["name"] == "logging"


def test_a_derivation_without_environments_keeps_its_text_and_builds_as_before(
    graph: Graph,
) -> None:
    plain = graph.sh("plain", "echo plain > $out")
    again = graph.sh("plain", "echo plain > $out", environments=[])
    assert (again.path, again.out) == (plain.path, plain.out)
    assert "environments" not in json.loads(Path(plain.path).read_text())
    assert _read(plain.path).environments == ()
    # Declared environments enter the hash: the same builder in one is another derivation.
    inner = environment("inner", variables={"A": "1"})
    wrapped = graph.sh("plain", "echo plain > $out", environments=[inner])
    other = graph.sh(
        "plain", "echo plain > $out", environments=[environment("inner", variables={"A": "2"})]
    )
    assert len({plain.out, wrapped.out, other.out}) == 3
    (result,) = graph.build(plain)
    assert result["status"] == "built", result
    assert Path(plain.out).read_text() == "plain\n"


def _hand_written(graph: Graph, envs: tuple[BuildEnvironment, ...], **changes: object) -> str:
    """A `.drv` with `envs` as someone might write it by hand, with the output paths its
    inputs give (so what the daemon refuses, if anything, is the environments)."""
    sh = f"{graph.bb}/bin/busybox"
    draft = Derivation(
        "hand",
        sh,
        {"out": Output()},
        args=("sh", "-c", "echo > $out"),
        input_srcs=(graph.bb,),
        environments=envs,
    )
    draft = dataclasses.replace(draft, **changes)  # type: ignore[arg-type]
    return with_output_paths(draft, graph.daemon.store_dir, HashModulo(_read)).to_json()


def _add(graph: Graph, text: str) -> str:
    refs = Derivation.from_json(text).references()
    return graph.client.call("add-text", name="hand.drv", text=text, references=refs)["path"]


HOOK = ("sh", "-c", 'exec "$@"', "hook")


def _wrapper(bb: str, name: str, hooks: tuple[str, ...] = HOOKS) -> BuildEnvironment:
    return BuildEnvironment(name, **{h: Action(f"{bb}/bin/sh", HOOK) for h in hooks})  # type: ignore[arg-type]


REFUSED = {
    "only wrap_build": (
        lambda bb: (_wrapper(bb, "logging", ("wrap_build",)),),
        "environment logging: a wrapper defines all of wrap_env_enter, wrap_build, "
        "wrap_env_exit or none; wrap_env_enter, wrap_env_exit missing",
    ),
    "two wrappers": (
        lambda bb: (_wrapper(bb, "one"), BuildEnvironment("mid"), _wrapper(bb, "two")),
        "two wrappers for one build: one, two",
    ),
    "a host program": (
        lambda bb: (BuildEnvironment("tools", enter=Action("/bin/sh", ("-c", "true"))),),
        "environment tools: the program '/bin/sh' is not in the derivation's inputs",
    ),
    "a program climbing out of an input": (
        lambda bb: (BuildEnvironment("tools", exit=Action(f"{bb}/../../../bin/sh")),),
        "environment tools: the program",
    ),
    "a bad timeout": (
        lambda bb: (BuildEnvironment("tools", exit=Action(f"{bb}/bin/sh", (), 0)),),
        "environment tools: a timeout is a number of seconds",
    ),
    "a bad variable": (
        lambda bb: (BuildEnvironment("tools", {"A-B": "x"}),),
        "environment tools: variable 'A-B'",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_add_text_refuses_environments_no_build_could_run_naming_the_environment(
    graph: Graph, case: str
) -> None:
    make, says = REFUSED[case]
    text = _hand_written(graph, make(graph.bb))
    before = _store_entries(graph.daemon.store_dir)
    with pytest.raises(DaemonError) as refused:
        _add(graph, text)
    assert refused.value.code == "bad-request"
    assert says in refused.value.message, refused.value.message
    assert "-hand.drv: " in refused.value.message
    assert _store_entries(graph.daemon.store_dir) == before
    assert graph.daemon.alive()


def test_add_text_accepts_the_same_derivation_with_valid_environments(graph: Graph) -> None:
    envs = (
        BuildEnvironment("outer", {"A": "1"}, enter=Action(f"{graph.bb}/bin/sh", ("-c", "true"))),
        _wrapper(graph.bb, "logging"),
        BuildEnvironment("inner", exit=Action(f"{graph.bb}/bin/busybox", ("true",), 2.5)),
    )
    text = _hand_written(graph, envs)
    path = _add(graph, text)
    assert Path(path).read_text() == text
    assert _read(path).environments == envs


def test_a_program_must_be_in_an_output_the_derivation_uses(graph: Graph) -> None:
    tools = _tools(graph)
    inputs = {"input_drvs": {tools.path: ("out",)}}

    def setup_in(output: str) -> tuple[BuildEnvironment, ...]:
        return (BuildEnvironment("tools", enter=Action(f"{tools.outputs[output]}/bin/setup")),)

    with pytest.raises(DaemonError) as refused:
        _add(graph, _hand_written(graph, setup_in("dev"), **inputs))
    assert f"environment tools: the program '{tools.outputs['dev']}/bin/setup'" in str(
        refused.value
    )
    # The output it uses is in its sandbox, so its programs may run.
    path = _add(graph, _hand_written(graph, setup_in("out"), **inputs))
    assert _read(path).environments == setup_in("out")


def test_a_store_reading_its_inputs_from_disk_checks_programs_the_same_way(
    store: Store,
) -> None:
    # A fresh store remembers no output paths: it reads the input derivation's.
    with using(LocalStore(store)):
        tools = derivation("tools", "/bin/sh", ["-c", "true"], outputs=("out", "dev"))
    with Store.open(store.state.root) as fresh:
        for output, accepted in (("dev", False), ("out", True)):
            env = BuildEnvironment("tools", enter=Action(f"{tools.outputs[output]}/bin/setup"))
            draft = Derivation(
                "hand",
                "/bin/sh",
                {"out": Output()},
                input_drvs={tools.path: ("out",)},
                environments=(env,),
            )
            drv = with_output_paths(draft, fresh.store_dir, HashModulo(_read))
            if accepted:
                assert fresh.add_text("hand.drv", drv.to_json(), drv.references()).path
            else:
                with pytest.raises(DerivationError, match="environment tools: the program"):
                    fresh.add_text("hand.drv", drv.to_json(), drv.references())


def test_the_recipe_api_refuses_mistakes_before_anything_is_added(graph: Graph) -> None:
    before = _store_entries(graph.daemon.store_dir)
    hosted = environment("tools", enter=["/bin/sh", "-c", "true"])
    w1 = environment("one", **{h: [f"{graph.bb}/bin/sh"] for h in HOOKS})  # type: ignore[arg-type]
    w2 = environment("two", **{h: [f"{graph.bb}/bin/sh"] for h in HOOKS})  # type: ignore[arg-type]
    for envs, says in (
        ([hosted], "app: environment tools: the program '/bin/sh' is not in"),
        ([w1, w2], "app: two wrappers for one build: one, two"),
    ):
        with pytest.raises(BuildEnvError) as refused:
            graph.sh("app", "echo > $out", environments=envs)
        assert str(refused.value).startswith(says)
    with pytest.raises(BuildEnvError, match="environment half: a wrapper defines all"):
        environment("half", wrap_build=[f"{graph.bb}/bin/sh"])
    assert _store_entries(graph.daemon.store_dir) == before


RECIPE = """\
from store.recipe import action, busybox, derivation, environment

bb = busybox()
sh = f"{bb}/bin/busybox"
env = {"PATH": f"{bb}/bin"}
sibling = derivation("sibling", sh, ["sh", "-c", "echo built > $out"], env=env)
hook = [f"{bb}/bin/sh", "-c", 'exec "$@"', "hook"]
"""
BAD = {
    "only wrap_build": (
        'bad = derivation("bad", sh, ["sh", "-c", "echo > $out"], env=env,\n'
        '                 environments=[environment("logging", wrap_build=hook)])\n',
        ":9: BuildEnvError: environment logging: a wrapper defines all of wrap_env_enter, "
        "wrap_build, wrap_env_exit or none; wrap_env_enter, wrap_env_exit missing",
    ),
    "two wrappers": (
        "hooks = dict(wrap_env_enter=hook, wrap_build=hook, wrap_env_exit=hook)\n"
        'one, two = environment("one", **hooks), environment("two", **hooks)\n'
        'bad = derivation("bad", sh, ["sh", "-c", "echo > $out"], env=env,\n'
        "                 environments=[one, two])\n",
        ":10: BuildEnvError: bad: two wrappers for one build: one, two",
    ),
}


def _store_build(daemon: DaemonProc, recipe: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WEFT_STATE_DIR": str(daemon.state)}
    return subprocess.run(
        [BIN / "store-build", str(recipe)],
        capture_output=True,
        text=True,
        env=env,
        cwd=recipe.parent,
        timeout=120,
    )


@pytest.mark.parametrize("case", list(BAD))
def test_a_recipe_with_a_bad_environment_and_a_valid_sibling_builds_nothing(
    graph: Graph, tmp_path: Path, case: str
) -> None:
    body, says = BAD[case]
    recipe = tmp_path / "recipe.py"
    recipe.write_text(RECIPE + body)
    out = _store_build(graph.daemon, recipe)
    assert out.returncode == 1, out
    assert f"{recipe}{says}" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    sibling = graph.sh("sibling", "echo built > $out")
    assert graph.client.call("is-valid", paths=[sibling.out]) == []
    # Without the mistake the same recipe builds the sibling.
    recipe.write_text(RECIPE)
    out = _store_build(graph.daemon, recipe)
    assert out.returncode == 0, out
    assert graph.client.call("is-valid", paths=[sibling.out]) == [sibling.out]

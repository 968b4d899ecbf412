"""Environment deltas in builds and profiles made by recipes, through a real daemon
(issue 20): what a builder sees, what a profile's output says and references, and that a
bad delta is refused before anything is added."""

import os
from pathlib import Path

import pytest

from store.environment.delta import Delta, DeltaError, ListOp, ListUpdate, apply
from store.environment.profile import DEFAULT_SEARCH_PATHS, Profile, read_profile
from store.environment.view import from_mapping
from store.recipe import MAX_PROFILE_TEXT, Derivation, profile
from tests.daemon_fixtures import Graph


def _env_of(output: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in Path(output).read_text().splitlines())


def _tool(graph: Graph, name: str, says: str) -> Derivation:
    """A member with a `bin/<name>` the builder's busybox sh runs."""
    script = f"#!{graph.bb}/bin/sh\\necho {says}\\n"
    return graph.sh(
        name,
        f'mkdir -p $out/bin && printf "{script}" > $out/bin/{name} && chmod +x $out/bin/{name}',
    )


def _store_entries(graph: Graph) -> list[str]:
    return sorted(e for e in os.listdir(graph.daemon.store_dir) if not e.startswith("."))


def test_a_builder_sees_exactly_the_values_its_env_delta_gives(graph: Graph) -> None:
    tools = _tool(graph, "greet", "from-tools")
    drv = graph.sh(
        "delta-env",
        "env > $out",
        env_delta={
            "PATH": [("prepend", [f"{tools}/bin"])],
            "GREETING": "hello",
            # Scalars come first, and see the derivation's own PATH.
            "OLD_PATH": "${@PATH@}",
            "HOME": None,
        },
    )
    assert dict(drv.drv.input_drvs)[tools.path] == ("out",)
    (result,) = graph.build(drv)
    assert result["status"] == "built", result
    env = _env_of(drv.out)
    assert env["PATH"] == f"{tools}/bin:{graph.bb}/bin"
    assert env["GREETING"] == "hello"
    assert env["OLD_PATH"] == f"{graph.bb}/bin"
    assert "HOME" not in env
    # The rest is what a builder without a delta gets.
    assert env["TMPDIR"] == "/build" and env["out"] == drv.out


def test_a_prepended_tool_is_found_on_the_builders_path(graph: Graph) -> None:
    tools = _tool(graph, "greet", "from-tools")
    drv = graph.sh(
        "uses-greet", "greet > $out", env_delta={"PATH": [("prepend", [f"{tools}/bin"])]}
    )
    assert [r["status"] for r in graph.build(drv)] == ["built"]
    assert Path(drv.out).read_text() == "from-tools\n"


def test_a_profile_of_two_members_lists_them_in_order_and_references_only_them(
    graph: Graph,
) -> None:
    app = _tool(graph, "app", "app")
    tools = _tool(graph, "tools", "tools")
    env = {"EDITOR": "vi", "PATH": [("append", ["/opt/bin"])]}
    p = profile("devenv", [tools, app], env=env)
    (result,) = graph.build(p)
    assert result["status"] == "built", result
    got = read_profile(p.out)
    assert got == Profile("devenv", (tools.out, app.out), from_mapping(env))
    assert Path(p.out).read_text() == got.to_json()
    assert sorted(graph.client.call("references", path=p.out)) == sorted([tools.out, app.out])
    new, _ = apply(got.delta(DEFAULT_SEARCH_PATHS), {"PATH": "/usr/bin"})
    assert new["PATH"] == f"{tools}/bin:{app}/bin:/usr/bin:/opt/bin"
    assert new["EDITOR"] == "vi"


def test_a_profile_takes_store_paths_and_a_view_as_well(graph: Graph) -> None:
    app = _tool(graph, "app", "app")
    view = {"version": 1, "values": {"list": {"PATH": [{"op": "unset", "value": []}]}}}
    p = profile("mixed", [graph.bb, app], env=view)
    assert [r["status"] for r in graph.build(p)] == ["built"]
    got = read_profile(p.out)
    assert got.members == (graph.bb, app.out)
    assert got.env == Delta({}, {"PATH": (ListUpdate(ListOp.UNSET),)})
    assert sorted(graph.client.call("references", path=p.out)) == sorted([graph.bb, app.out])


BAD_ENVS = [
    ("unknown op", "PATH", {"PATH": [("frobnicate", ["/a"])]}),
    ("name 1A", "1A", {"1A": "x"}),
    ("name A-B", "A-B", {"A-B": "x"}),
    ("name A=B", "A=B", {"A=B": [("set", [])]}),
    ("non-string scalar", "N", {"N": 5}),
    (
        "unknown op in a view",
        "PATH",
        {"version": 1, "values": {"list": {"PATH": [{"op": "add", "value": ["/a"]}]}}},
    ),
    ("non-string scalar in a view", "N", {"version": 1, "values": {"scalar": {"N": 5}}}),
    ("bad name in a Delta", "1A", Delta({"1A": "x"})),
]


@pytest.mark.parametrize(("why", "name", "env"), BAD_ENVS, ids=[b[0] for b in BAD_ENVS])
def test_a_profile_with_a_bad_delta_is_refused_by_name_and_adds_nothing(
    graph: Graph, why: str, name: str, env: object
) -> None:
    app = _tool(graph, "app", "app")
    before = _store_entries(graph)
    with pytest.raises(DeltaError) as caught:
        profile("bad", [app], env=env)  # type: ignore[arg-type]
    assert name in str(caught.value), why
    assert "profile bad" in str(caught.value)
    assert _store_entries(graph) == before


def test_a_profile_member_that_is_not_a_store_path_is_refused(graph: Graph) -> None:
    before = _store_entries(graph)
    with pytest.raises(ValueError, match="not a store path"):
        profile("bad", ["/usr/bin"])
    assert _store_entries(graph) == before


def test_a_profile_too_large_for_its_builders_environment_is_refused_before_adding(
    graph: Graph,
) -> None:
    before = _store_entries(graph)
    with pytest.raises(ValueError, match="MAX_PROFILE_TEXT"):
        profile("huge", [], env={"BIG": "x" * MAX_PROFILE_TEXT})
    assert _store_entries(graph) == before
    # Just under the limit, it builds: the limit is the kernel's, not a guess.
    room = MAX_PROFILE_TEXT - len(Profile("fits", (), from_mapping({"BIG": ""})).to_json())
    p = profile("fits", [], env={"BIG": "x" * room})
    assert [r["status"] for r in graph.build(p)] == ["built"]
    assert read_profile(p.out).env.scalars["BIG"] == "x" * room

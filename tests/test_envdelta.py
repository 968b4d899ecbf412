"""The environment delta engine (`store.environment`): uenv's own unit cases
(`test/unit/envvars.cpp`) ported, issue 20's edge cases, the JSON views, and profiles.

The engine is pure; only the profile readers and the search paths look at files."""

import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from store.environment.delta import (
    Change,
    Delta,
    DeltaError,
    Expand,
    ListOp,
    ListUpdate,
    VarType,
    apply,
    check_name,
    evaluate_list,
    expand,
    merge,
    simplify,
    valid_name,
)
from store.environment.profile import (
    DEFAULT_SEARCH_PATHS,
    Profile,
    parse_profile,
    read_profile,
    search_path_delta,
)
from store.environment.view import from_mapping, parse_values, parse_view, to_values, to_view
from store.errors import StoreError

SET, UNSET, PREPEND, APPEND = ListOp.SET, ListOp.UNSET, ListOp.PREPEND, ListOp.APPEND


def u(op: ListOp, *values: str) -> ListUpdate:
    return ListUpdate(op, values)


# -- uenv: "prefix_path update" --

PR_EMPTY, PR_2 = u(PREPEND), u(PREPEND, "a", "b")
SET_EMPTY, SET_2 = u(SET), u(SET, "c", "d")
AP_EMPTY, AP_2 = u(APPEND), u(APPEND, "e", "f")
UNSET_ = u(UNSET)


@pytest.mark.parametrize(
    ("updates", "value"),
    [
        ([SET_2], "c:d"),
        ([SET_2, UNSET_], None),
        # setting an unset variable sets it again
        ([SET_2, UNSET_, SET_2], "c:d"),
        ([SET_2, UNSET_, SET_2, SET_EMPTY], ""),
        ([SET_2, UNSET_, SET_2, SET_EMPTY, UNSET_], None),
        ([SET_2, PR_2], "a:b:c:d"),
        ([SET_2, PR_2, PR_EMPTY], "a:b:c:d"),
        ([SET_2, PR_2, PR_EMPTY, AP_EMPTY], "a:b:c:d"),
        ([SET_2, PR_2, PR_EMPTY, AP_EMPTY, AP_2], "a:b:c:d:e:f"),
    ],
)
def test_list_updates_apply_in_order_as_uenv_applies_them(
    updates: list[ListUpdate], value: str | None
) -> None:
    assert evaluate_list(None, updates) == value


# -- uenv: "prefix_path simplify" --


@pytest.mark.parametrize(
    ("entries", "simplified"),
    [
        ([], []),
        (["a"], ["a"]),
        (["a", "a"], ["a"]),
        (["a", "b", "a"], ["a", "b"]),
        (["c", "d"], ["c", "d"]),
        (
            ["z", "hello", "apple", "cat", "apple", "z", "wombat"],
            ["z", "hello", "apple", "cat", "wombat"],
        ),
        (
            ["/opt/cray/libfabric/1.15.2.0", "/usr/lib64", "/opt/cray/libfabric/1.15.2.0"],
            ["/opt/cray/libfabric/1.15.2.0", "/usr/lib64"],
        ),
        (["", "/usr/bin", "", "/opt/cuda/bin"], ["/usr/bin", "/opt/cuda/bin"]),
    ],
)
def test_simplify_drops_empty_entries_and_later_duplicates(
    entries: list[str], simplified: list[str]
) -> None:
    assert simplify(entries) == simplified


# -- uenv: "patch validate" (uenv flags the conflict; weft refuses it by name) --


def test_a_scalar_then_a_list_of_the_same_name_is_a_conflict_named() -> None:
    with pytest.raises(DeltaError, match="FOO"):
        merge([Delta({"FOO": "wombat"}), Delta({}, {"FOO": (u(SET, "wombat"),)})])


def test_a_list_then_a_scalar_of_the_same_name_is_a_conflict_named() -> None:
    with pytest.raises(DeltaError, match="apple"):
        merge([Delta({}, {"apple": (u(PREPEND),)}), Delta({"apple": ""})])


def test_a_view_naming_one_variable_as_scalar_and_list_is_refused_by_name() -> None:
    with pytest.raises(DeltaError, match="FOO"):
        parse_values({"scalar": {"FOO": "x"}, "list": {"FOO": [{"op": "set", "value": ["y"]}]}})


def test_merging_deltas_without_conflicts_is_not_an_error() -> None:
    merged = merge([Delta({"FOO": "wombat"}), Delta({}, {"apple": (u(SET, "x"),)})])
    assert merged == Delta({"FOO": "wombat"}, {"apple": (u(SET, "x"),)})


# -- uenv: "patch expand" --


def test_a_scalar_expands_other_variables_in_view_syntax() -> None:
    env = {"SCRATCH": "/scratch/cscs/wombat", "CLUSTER_NAME": "daint"}
    delta = Delta({"JULIA_HOME": "${@SCRATCH@}/julia-up/${@CLUSTER_NAME@}"})
    new, _ = apply(delta, env, Expand.VIEW)
    assert new["JULIA_HOME"] == "/scratch/cscs/wombat/julia-up/daint"


# -- uenv: "patch get final values" --

FINAL = Delta(
    {"ANIMAL": "wombat", "VEHICLE": "car", "ABODE": "tent"},
    {"A": (u(SET, "c", "d"),), "B": (u(PREPEND, "a", "b"),), "C": (u(APPEND, "c", "d"),)},
)


@pytest.mark.parametrize(
    ("env", "final"),
    [
        ({}, {"A": "c:d", "B": "a:b", "C": "c:d"}),
        (
            {"A": "hello", "B": "c:d", "C": "a:b:b:a:c:a"},
            {"A": "c:d", "B": "a:b:c:d", "C": "a:b:c:d"},
        ),
    ],
)
def test_final_values_from_an_empty_and_an_inherited_environment(
    env: dict[str, str], final: dict[str, str]
) -> None:
    new, _ = apply(FINAL, env)
    assert new == {"ABODE": "tent", "VEHICLE": "car", "ANIMAL": "wombat", **final}


# -- uenv: "validate envvar names" --


VALID = ["wombat", "_", "__", "_WOMBAT", "a", "A", "ab", "AB", "PATH", "CUDA_HOME", "P1", "_1"]


@pytest.mark.parametrize("name", [*VALID, "a123_4"])
def test_shell_style_names_are_valid(name: str) -> None:
    assert valid_name(name)
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["a-b", "b?", "-", "!", "wombat soup", "", "1A", "A-B", "A=B", "caf\u00e9", "A\0"]
)
def test_other_names_are_invalid_when_set(name: str) -> None:
    assert not valid_name(name)
    with pytest.raises(DeltaError, match="invalid environment variable name"):
        check_name(name)


@pytest.mark.parametrize(
    ("name", "lenient"),
    [
        ("A-B", True),
        ("1A", True),
        ("and it was always thus", True),
        ("wombat soup", True),
        ("PATH", True),
        ("A=B", False),
        ("", False),
        ("=", False),
    ],
)
def test_names_are_checked_leniently_on_capture(name: str, lenient: bool) -> None:
    assert valid_name(name, strict=False) is lenient


# -- uenv: "state::expand-curly" and "state::expand-view" --

COMMON = [
    ("", ""),
    ("_", "_"),
    ("hello", "hello"),
    ("{} aa", "{} aa"),
    ("$$", "$$"),
    ("$UNSET", "$UNSET"),
    ("$", "$"),
    ("a-$", "a-$"),
]
CURLY = [
    *COMMON,
    ("${USER}", "wombat"),
    ("${USER}s", "wombats"),
    ("${USER}-soup", "wombat-soup"),
    ("${USER}${USER}", "wombatwombat"),
    ("hello ${USER}", "hello wombat"),
    ("${greeting} world", "hello world"),
    ('I say "${greeting}"', 'I say "hello"'),
    # bash calls this an error; uenv (and weft) drop the rest of the text
    ("${USER", ""),
    ("${USER NAME}", ""),
    ("${$happy}-there", "-there"),
    ("${UNSET_HERE}x", "x"),
    ("/usr/lib:${CUDA_HOME}/lib:${CUDA_HOME}/lib64", "/usr/lib:/opt/cuda/lib:/opt/cuda/lib64"),
]
VIEW = [
    *COMMON,
    ("${USER}", "${USER}"),
    ("${@USER@}", "wombat"),
    ("${@USER@}s", "wombats"),
    ("${@USER@}-soup", "wombat-soup"),
    ("${@USER@}${@USER@}", "wombatwombat"),
    ("hello ${@USER@}", "hello wombat"),
    ("hello ${@USER@} and welcome", "hello wombat and welcome"),
    ("${@greeting@} world", "hello world"),
    ('I say "${@greeting@}"', 'I say "hello"'),
    ("${@USER", ""),
    ("${@USER}", ""),
    ("${@USER NAME@}", ""),
    ("${@$happy@}-there", "-there"),
    (
        "/usr/lib:${@CUDA_HOME@}/lib:${@CUDA_HOME@}/lib64",
        "/usr/lib:/opt/cuda/lib:/opt/cuda/lib64",
    ),
]
STATE = {"USER": "wombat", "greeting": "hello", "CUDA_HOME": "/opt/cuda"}


@pytest.mark.parametrize(("text", "expanded"), CURLY)
def test_curly_expansion_as_uenv_expands(text: str, expanded: str) -> None:
    assert expand(text, STATE, Expand.CURLY) == expanded


@pytest.mark.parametrize(("text", "expanded"), VIEW)
def test_view_expansion_as_uenv_expands(text: str, expanded: str) -> None:
    assert expand(text, STATE, Expand.VIEW) == expanded
    assert expand(text, STATE) == expanded


# -- uenv: "state::set-get-unset" and "state::clear", what applies to a delta --


def test_setting_overwrites_and_unsetting_removes_without_touching_the_old_environment() -> None:
    env = {"hello": "world", "another": "variable", "wombat": "soup"}
    new, _ = apply(Delta({"hello": "there", "and": "another", "wombat": None}), env)
    assert new == {"hello": "there", "another": "variable", "and": "another"}
    assert env == {"hello": "world", "another": "variable", "wombat": "soup"}


def test_an_empty_delta_on_an_empty_environment_gives_an_empty_environment() -> None:
    assert apply(Delta(), {}) == ({}, [])
    assert not Delta()


def test_an_invalid_name_is_refused_where_uenv_would_drop_it() -> None:
    with pytest.raises(DeltaError, match="and it was always thus"):
        from_mapping({"and it was always thus": "antechinus"})
    with pytest.raises(DeltaError, match="and it was always thus"):
        parse_values({"scalar": {"and it was always thus": "antechinus"}})


def test_an_invalid_name_in_an_expansion_expands_to_nothing() -> None:
    assert expand("<${@and it was always thus@}>", {"and it was always thus": "x"}) == "<>"


# -- issue 20's cases --


def test_set_of_nothing_gives_the_empty_string_not_unset() -> None:
    assert evaluate_list("a:b", [u(SET)]) == ""
    new, _ = apply(Delta({}, {"V": (u(SET),)}), {"V": "a:b"})
    assert new["V"] == ""


def test_unset_then_prepend_gives_just_the_prepended_entry() -> None:
    assert evaluate_list("a:b", [u(UNSET), u(PREPEND, "x")]) == "x"


def test_unset_alone_removes_the_variable() -> None:
    new, changes = apply(Delta({}, {"V": (u(UNSET),)}), {"V": "a", "W": "b"})
    assert new == {"W": "b"}
    assert changes[0].new is None


def test_append_removes_duplicates_keeping_the_first_inherited_occurrence() -> None:
    assert evaluate_list("a:b:b:a:c:a", [u(APPEND, "c", "d")]) == "a:b:c:d"


def test_prepending_an_inherited_entry_moves_it_to_the_front() -> None:
    assert evaluate_list("/usr/bin:/bin:/opt/bin", [u(PREPEND, "/opt/bin")]) == (
        "/opt/bin:/usr/bin:/bin"
    )


def test_scalars_are_applied_before_lists_whatever_the_order() -> None:
    delta = parse_values(
        {
            "list": {"PATH": [{"op": "prepend", "value": ["${@TOOLS@}/bin"]}]},
            "scalar": {"TOOLS": "/t"},
        }
    )
    new, changes = apply(delta, {"PATH": "/usr/bin"})
    assert new["PATH"] == "/t/bin:/usr/bin"
    assert [c.name for c in changes] == ["TOOLS", "PATH"]


def test_a_list_expands_the_environment_it_had_before() -> None:
    new, _ = apply(Delta({}, {"PATH": (u(APPEND, "${@HOME@}/bin"),)}), {"HOME": "/h"})
    assert new["PATH"] == "/h/bin"


def test_merging_keeps_the_last_scalar_and_concatenates_list_updates() -> None:
    first = Delta({"CC": "gcc", "GONE": "x"}, {"PATH": (u(PREPEND, "/a"),)})
    second = Delta({"CC": "clang", "GONE": None}, {"PATH": (u(PREPEND, "/b"),)})
    merged = merge([first, second])
    assert merged.scalars == {"CC": "clang", "GONE": None}
    assert merged.lists == {"PATH": (u(PREPEND, "/a"), u(PREPEND, "/b"))}
    new, _ = apply(merged, {"PATH": "/usr/bin", "GONE": "y"})
    assert new == {"CC": "clang", "PATH": "/b:/a:/usr/bin"}


def test_every_change_is_reported_with_name_type_op_old_value_and_new() -> None:
    delta = Delta(
        {"CC": "gcc", "OLD": None},
        {"PATH": (u(UNSET), u(PREPEND, "/a", "/b")), "MANPATH": (u(APPEND, "/m"),)},
    )
    _, changes = apply(delta, {"OLD": "o", "PATH": "/usr/bin"})
    assert [c.as_dict() for c in changes] == [
        {"name": "CC", "type": "scalar", "op": "set", "old": None, "value": "gcc", "new": "gcc"},
        {"name": "OLD", "type": "scalar", "op": "unset", "old": "o", "value": None, "new": None},
        {
            "name": "MANPATH",
            "type": "list",
            "op": "append",
            "old": None,
            "value": "/m",
            "new": "/m",
        },
        {
            "name": "PATH",
            "type": "list",
            "op": "unset,prepend",
            "old": "/usr/bin",
            "value": "/a:/b",
            "new": "/a:/b",
        },
    ]
    assert all(isinstance(c, Change) for c in changes)
    assert {c.type for c in changes} == {VarType.SCALAR, VarType.LIST}


def test_a_delta_error_is_a_store_error_and_a_value_error() -> None:
    assert issubclass(DeltaError, StoreError) and issubclass(DeltaError, ValueError)


# -- the views: what parse_view, parse_values and from_mapping refuse --

# (what is wrong, the name the error must give, as view values, as the shorthand)
BAD = [
    (
        "unknown op",
        "PATH",
        {"list": {"PATH": [{"op": "frobnicate", "value": ["/a"]}]}},
        {"PATH": [("frobnicate", ["/a"])]},
    ),
    ("non-string scalar", "N", {"scalar": {"N": 5}}, {"N": 5}),
    ("name 1A", "1A", {"scalar": {"1A": "x"}}, {"1A": "x"}),
    ("name A-B", "A-B", {"scalar": {"A-B": "x"}}, {"A-B": "x"}),
    ("name A=B", "A=B", {"list": {"A=B": [{"op": "set", "value": []}]}}, {"A=B": [("set", [])]}),
    (
        "list value not strings",
        "PATH",
        {"list": {"PATH": [{"op": "append", "value": [1]}]}},
        {"PATH": [("append", [1])]},
    ),
    ("a NUL in a value", "V", {"scalar": {"V": "a\0b"}}, {"V": "a\0b"}),
]
PARSERS: dict[str, Callable[[dict, dict], Delta]] = {
    "parse_view": lambda values, _: parse_view({"version": 1, "values": values}),
    "parse_values": lambda values, _: parse_values(values),
    "from_mapping": lambda _, shorthand: from_mapping(shorthand),
}


@pytest.mark.parametrize("parser", sorted(PARSERS))
@pytest.mark.parametrize(("why", "name", "values", "shorthand"), BAD, ids=[b[0] for b in BAD])
def test_bad_deltas_are_refused_naming_the_variable(
    parser: str, why: str, name: str, values: dict, shorthand: dict
) -> None:
    with pytest.raises(DeltaError) as caught:
        PARSERS[parser](values, shorthand)
    assert name in str(caught.value), why


@pytest.mark.parametrize(
    "doc",
    [
        {"values": {}},
        {"version": 2, "values": {}},
        {"version": "1", "values": {}},
        {"version": True, "values": {}},
        {"version": 1, "values": {}, "extra": 1},
        {"version": 1, "values": {"path": {}}},
        {"version": 1, "values": []},
        [],
    ],
)
def test_views_that_are_not_version_1_views_are_refused(doc: object) -> None:
    with pytest.raises(DeltaError):
        parse_view(doc)


def test_a_view_round_trips_and_keeps_update_order() -> None:
    values = {
        "list": {
            "PATH": [
                {"op": "unset", "value": []},
                {"op": "prepend", "value": ["/a", "/b"]},
                {"op": "append", "value": ["/z"]},
            ]
        },
        "scalar": {"CC": "gcc", "OLD": None},
    }
    delta = parse_view({"version": 1, "values": values})
    assert delta.lists["PATH"] == (u(UNSET), u(PREPEND, "/a", "/b"), u(APPEND, "/z"))
    assert to_values(delta) == values
    assert to_view(delta) == {"version": 1, "values": values}
    assert to_values(Delta()) == {}


def test_the_shorthand_means_what_the_view_means() -> None:
    shorthand = from_mapping({"CC": "gcc", "OLD": None, "PATH": [("prepend", ["/a/bin"])]})
    view = parse_values(
        {
            "scalar": {"CC": "gcc", "OLD": None},
            "list": {"PATH": [{"op": "prepend", "value": ["/a/bin"]}]},
        }
    )
    assert shorthand == view


# -- profiles --

MEMBERS = ("/s/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-hello", "/s/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-tools")


def test_a_profile_round_trips_through_its_canonical_json() -> None:
    env = from_mapping({"EDITOR": "vi", "PATH": [("append", ["/opt/bin"])]})
    p = Profile("tools", MEMBERS, env)
    text = p.to_json()
    assert json.dumps(json.loads(text), sort_keys=True, separators=(",", ":")) == text
    assert json.loads(text)["weft-profile"] == 1
    assert parse_profile(text) == p
    assert parse_profile(Profile("bare", ()).to_json()) == Profile("bare", ())


def _profile_doc(**changes: object) -> str:
    doc = json.loads(Profile("tools", MEMBERS).to_json())
    doc.update(changes)
    return json.dumps(doc)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (_profile_doc(extra=1), "unknown fields"),
        (_profile_doc(members=["relative/path"]), "members"),
        (_profile_doc(members=[5]), "members"),
        (_profile_doc(members="/s/x"), "members"),
        (_profile_doc(name=""), "name"),
        (_profile_doc(env={"version": 1, "values": {"scalar": {"1A": "x"}}}), "1A"),
        (
            _profile_doc(env={"version": 1, "values": {"list": {"P": [{"op": "add"}]}}}),
            "unknown operation",
        ),
        (_profile_doc(env={"version": 3}), "version"),
        (_profile_doc(**{"weft-profile": 2}), "not a weft profile"),
        ("{not json", "malformed"),
        ("[]", "not a weft profile"),
    ],
)
def test_parse_profile_refuses_what_is_not_a_profile(text: str, says: str) -> None:
    with pytest.raises(DeltaError, match=says):
        parse_profile(text)


@pytest.fixture(params=["/tmp", "/var/tmp"])
def scratch(request: pytest.FixtureRequest) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="weft-envdelta-", dir=request.param) as d:
        yield Path(d)


def test_read_profile_of_a_plain_file_or_a_directory_is_a_profile_of_that_path(
    scratch: Path,
) -> None:
    plain = scratch / "cccccccccccccccccccccccccccccccc-notes.txt"
    plain.write_text('{"just": "json"}')
    tree = scratch / "dddddddddddddddddddddddddddddddd-hello"
    (tree / "bin").mkdir(parents=True)
    assert read_profile(str(plain)) == Profile("notes.txt", (str(plain),))
    assert read_profile(str(tree)) == Profile("hello", (str(tree),))


def test_read_profile_of_a_profile_file_reads_it(scratch: Path) -> None:
    p = Profile("tools", MEMBERS, from_mapping({"EDITOR": "vi"}))
    f = scratch / "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-tools"
    f.write_text(p.to_json())
    assert read_profile(str(f)) == p


def test_read_profile_refuses_a_file_that_claims_to_be_a_malformed_profile(
    scratch: Path,
) -> None:
    f = scratch / "ffffffffffffffffffffffffffffffff-broken"
    f.write_text(_profile_doc(env={"version": 1, "values": {"scalar": {"A-B": "x"}}}))
    with pytest.raises(DeltaError, match="A-B") as caught:
        read_profile(str(f))
    assert str(f) in str(caught.value)


def test_search_paths_follow_member_order_and_skip_missing_directories(scratch: Path) -> None:
    a, b, gone = scratch / "a", scratch / "b", scratch / "gone"
    for d in (a / "bin", b / "bin", b / "sbin", b / "lib" / "pkgconfig", a / "share" / "man"):
        d.mkdir(parents=True)
    (b / "include").write_text("a file, not a directory")
    delta = search_path_delta([str(gone), str(b), str(a)], DEFAULT_SEARCH_PATHS)
    assert delta.scalars == {}
    assert delta.lists == {
        "PATH": (u(PREPEND, f"{b}/bin", f"{b}/sbin", f"{a}/bin"),),
        "MANPATH": (u(PREPEND, f"{a}/share/man"),),
        "PKG_CONFIG_PATH": (u(PREPEND, f"{b}/lib/pkgconfig"),),
        "LIBRARY_PATH": (u(PREPEND, f"{b}/lib"),),
        "XDG_DATA_DIRS": (u(PREPEND, f"{a}/share"),),
    }


def test_a_profile_applies_its_members_search_paths_then_its_delta(scratch: Path) -> None:
    app, tools = scratch / "app", scratch / "tools"
    for d in (app / "bin", tools / "bin", tools / "share" / "man"):
        d.mkdir(parents=True)
    p = Profile(
        "p",
        (str(tools), str(app)),
        from_mapping({"MANPATH": "/only/man", "PATH": [("append", ["/opt/bin"])]}),
    )
    new, _ = apply(p.delta(DEFAULT_SEARCH_PATHS), {"PATH": f"/usr/bin:{app}/bin"})
    # An explicit scalar wins over the search path of the same variable.
    assert new["MANPATH"] == "/only/man"
    assert new["PATH"] == f"{tools}/bin:{app}/bin:/usr/bin:/opt/bin"


def test_a_custom_search_path_table_replaces_the_default(scratch: Path) -> None:
    (scratch / "m" / "lib" / "python3").mkdir(parents=True)
    (scratch / "m" / "bin").mkdir()
    table = {"PYTHONPATH": ["lib/python3"]}
    delta = Profile("p", (str(scratch / "m"),)).delta(table)
    # bin is there, but PATH is not in the table.
    assert delta.lists == {"PYTHONPATH": (u(PREPEND, f"{scratch}/m/lib/python3"),)}


def test_variables_of_one_delta_apply_in_name_order_however_they_were_declared() -> None:
    # A stored delta is canonical JSON (sorted keys): in memory it must mean the same.
    declared = Delta({"B": "x", "A": "${@B@}"}, {})
    reread = Delta({"A": "${@B@}", "B": "x"}, {})
    assert apply(declared, {})[0] == apply(reread, {})[0] == {"A": "", "B": "x"}


def test_an_entry_expanding_to_nothing_leaves_no_empty_entry_in_the_list() -> None:
    # uenv expands the joined value, which would leave ":/a:/usr/bin": the working
    # directory on PATH.  Each entry is expanded before empty ones are dropped.
    delta = Delta({}, {"PATH": (u(PREPEND, "${@NOPE@}", "/a"),)})
    assert apply(delta, {"PATH": "/usr/bin"})[0]["PATH"] == "/a:/usr/bin"


def test_an_entry_expanding_to_a_list_adds_each_of_its_entries_once() -> None:
    delta = Delta({}, {"PATH": (u(PREPEND, "${@EXTRA@}", "/a"),)})
    new, _ = apply(delta, {"PATH": "/usr/bin", "EXTRA": "/x:/a:/usr/bin"})
    assert new["PATH"] == "/x:/a:/usr/bin"

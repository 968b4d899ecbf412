"""The environment a runtime's command gets (`daemon/runtime/envplan.py`), computed without
a daemon: where it starts from, `pure` and `keep`, the profiles' deltas, `unset`, and
`WEFT_RUNTIME`; bytes that are not UTF-8 come back as they went; and the settings that
feed it (`search-paths`, `runtime-redact`)."""

import os

import pytest

from daemon.runtime.envplan import (
    MAX_ENV_BYTES,
    PURE_KEEP,
    Dangling,
    EnvFrom,
    EnvRequest,
    Linked,
    PlanError,
    UnknownRuntime,
    compute,
    decode,
    redact,
)
from daemon.settings import DEFAULT_RUNTIME_REDACT, Settings
from store.environment.delta import DeltaError, ListOp, ListUpdate
from store.environment.view import from_mapping
from store.layout import ConfigError

CALLER = [
    (b"HOME", b"/home/ann"),
    (b"PATH", b"/usr/bin:/bin"),
    (b"FOO", b"dirty"),
    (b"TERM", b"xterm"),
]
PARENT_APPLIED = [(b"PATH", b"/p/bin:/usr/bin"), (b"A_VAR", b"from-a"), (b"HOME", b"/home/ann")]
PRISTINE = [(b"PATH", b"/usr/bin"), (b"HOME", b"/home/old")]
LINKED = Linked("0123456789abcdef", PARENT_APPLIED, PRISTINE)


def env_of(pairs: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    return dict(pairs)


def test_current_starts_from_the_callers_environment_and_applies_the_profiles() -> None:
    delta = from_mapping({"PATH": [("prepend", ["/tools/bin"])], "CC": "gcc"})
    plan = compute(EnvRequest(CALLER), None, [delta])
    assert env_of(plan.env) == {
        b"HOME": b"/home/ann",
        b"PATH": b"/tools/bin:/usr/bin:/bin",
        b"FOO": b"dirty",
        b"TERM": b"xterm",
        b"CC": b"gcc",
    }
    assert [c.as_dict() for c in plan.changes] == [
        {"name": "CC", "type": "scalar", "op": "set", "old": None, "value": "gcc", "new": "gcc"},
        {
            "name": "PATH",
            "type": "list",
            "op": "prepend",
            "old": "/usr/bin:/bin",
            "value": "/tools/bin",
            "new": "/tools/bin:/usr/bin:/bin",
        },
    ]


def test_empty_starts_from_nothing_and_keep_takes_the_callers_value() -> None:
    delta = from_mapping({"PATH": [("prepend", ["/tools/bin"])]})
    plan = compute(EnvRequest(CALLER, EnvFrom.EMPTY, keep=("HOME", "NOT_SET")), None, [delta])
    assert plan.env == [(b"HOME", b"/home/ann"), (b"PATH", b"/tools/bin")]


def test_parent_starts_from_what_the_parents_command_got() -> None:
    plan = compute(EnvRequest(CALLER, EnvFrom.PARENT), LINKED, [])
    assert plan.env == PARENT_APPLIED
    # Told from the caller's environment, so that `--print-env --format sh` is right
    # where it is eval'd: what the parent's lacks, then what it has differently.
    assert [(c.name, c.op, c.old, c.new) for c in plan.changes] == [
        ("FOO", "unset", "dirty", None),
        ("TERM", "unset", "xterm", None),
        ("PATH", "set", "/usr/bin:/bin", "/p/bin:/usr/bin"),
        ("A_VAR", "set", None, "from-a"),
    ]


def test_pristine_starts_from_the_outermost_ancestors_captured_environment() -> None:
    plan = compute(EnvRequest(CALLER, EnvFrom.PRISTINE), LINKED, [])
    assert plan.env == PRISTINE


def test_pristine_without_a_parent_is_the_callers_own_environment() -> None:
    assert compute(EnvRequest(CALLER, EnvFrom.PRISTINE), None, []).env == CALLER


def test_parent_without_a_parent_runtime_is_a_bad_request() -> None:
    with pytest.raises(PlanError, match="no parent runtime"):
        compute(EnvRequest(CALLER, EnvFrom.PARENT), None, [])


@pytest.mark.parametrize("env_from", [EnvFrom.PARENT, EnvFrom.PRISTINE])
def test_a_dangling_parent_is_refused_as_an_unknown_runtime(env_from: EnvFrom) -> None:
    with pytest.raises(UnknownRuntime) as caught:
        compute(EnvRequest(CALLER, env_from), Dangling("feedfacefeedface"), [])
    assert str(caught.value) == "runtime feedfacefeedface: no runtime of yours with this id"


def test_current_with_a_dangling_parent_starts_from_the_caller() -> None:
    assert compute(EnvRequest(CALLER), Dangling("feedfacefeedface"), []).env == CALLER


def test_pure_keeps_only_the_users_basics_and_kept_names_and_reports_the_rest_unset() -> None:
    caller = [*CALLER, (b"LANG", b"C.UTF-8"), (b"EDITOR", b"vi")]
    plan = compute(EnvRequest(caller, pure=True, keep=("EDITOR",)), None, [])
    assert env_of(plan.env) == {
        b"HOME": b"/home/ann",
        b"TERM": b"xterm",
        b"LANG": b"C.UTF-8",
        b"EDITOR": b"vi",
    }
    assert [(c.name, c.type, c.op, c.old, c.new) for c in plan.changes] == [
        ("PATH", "scalar", "unset", "/usr/bin:/bin", None),
        ("FOO", "scalar", "unset", "dirty", None),
    ]
    assert "SHELL" in PURE_KEEP and "PATH" not in PURE_KEEP


def test_pure_then_a_prepend_reports_one_change_with_the_old_value() -> None:
    delta = from_mapping({"PATH": [("prepend", ["/tools/bin"])]})
    plan = compute(EnvRequest(CALLER, pure=True), None, [delta])
    assert env_of(plan.env)[b"PATH"] == b"/tools/bin"
    (change,) = [c for c in plan.changes if c.name == "PATH"]
    assert (change.op, change.old, change.new) == ("unset,prepend", "/usr/bin:/bin", "/tools/bin")


def test_unset_comes_last_even_after_a_profile_set_the_variable() -> None:
    delta = from_mapping({"CC": "gcc"})
    plan = compute(EnvRequest(CALLER, unset=("CC", "FOO", "ABSENT")), None, [delta])
    names = [n for n, _ in plan.env]
    assert b"CC" not in names and b"FOO" not in names
    ops = {c.name: (c.type, c.op, c.old, c.new) for c in plan.changes}
    assert ops == {
        "CC": ("scalar", "set,unset", None, None),
        "FOO": ("scalar", "unset", "dirty", None),
        "ABSENT": ("scalar", "unset", None, None),
    }


def test_weft_runtime_is_set_to_the_new_id_whatever_the_caller_had() -> None:
    caller = [*CALLER, (b"WEFT_RUNTIME", b"0000000000000000")]
    plan = compute(EnvRequest(caller), None, [], runtime_id="0123456789abcdef")
    assert env_of(plan.env)[b"WEFT_RUNTIME"] == b"0123456789abcdef"
    planned = compute(EnvRequest(caller), None, [])
    assert env_of(planned.env)[b"WEFT_RUNTIME"] == b"0000000000000000"


def test_bytes_that_are_not_utf8_round_trip_through_the_deltas() -> None:
    odd = b"/opt/caf\xe9/bin"
    caller = [(b"PATH", odd + b":/usr/bin"), (b"NAME\xff", b"\xfe\xfd"), (b"PLAIN", b"x")]
    delta = from_mapping({"PATH": [("append", [os.fsdecode(odd), "/extra"])]})
    plan = compute(EnvRequest(caller), None, [delta])
    assert env_of(plan.env) == {
        b"PATH": odd + b":/usr/bin:/extra",
        b"NAME\xff": b"\xfe\xfd",
        b"PLAIN": b"x",
    }


def test_names_that_are_not_names_even_leniently_are_dropped_from_the_capture() -> None:
    caller = [
        (b"", b"empty name"),
        (b"A=B", b"equals"),
        (b"WITH NUL", b"a\0b"),
        (b"1A", b"lenient is fine"),
        (b"A-B", b"lenient is fine"),
        (b"FIRST", b"one"),
        (b"FIRST", b"two"),
    ]
    assert decode(caller) == {"1A": "lenient is fine", "A-B": "lenient is fine", "FIRST": "one"}
    assert compute(EnvRequest(caller), None, []).env == [
        (b"1A", b"lenient is fine"),
        (b"A-B", b"lenient is fine"),
        (b"FIRST", b"one"),
    ]


@pytest.mark.parametrize("bad", ["", "A=B"])
def test_keep_and_unset_names_are_checked_leniently(bad: str) -> None:
    with pytest.raises(PlanError, match="not an environment variable name"):
        compute(EnvRequest(CALLER, unset=(bad,)), None, [])
    with pytest.raises(PlanError, match="not an environment variable name"):
        compute(EnvRequest(CALLER, keep=(bad,)), None, [])


def test_a_scalar_in_one_profile_and_a_list_in_another_is_a_conflict_by_name() -> None:
    one = from_mapping({"CC": "gcc"})
    other = from_mapping({"CC": [("append", ["clang"])]})
    with pytest.raises(DeltaError, match="environment variable CC is a scalar in one"):
        compute(EnvRequest(CALLER), None, [one, other])


def test_profiles_merge_in_order_last_scalar_winning_and_lists_concatenated() -> None:
    first = from_mapping({"CC": "gcc", "PATH": [("prepend", ["/app/bin"])]})
    second = from_mapping({"CC": "clang", "PATH": [("prepend", ["/tools/bin"])]})
    plan = compute(EnvRequest(CALLER), None, [first, second])
    env = env_of(plan.env)
    assert env[b"CC"] == b"clang"
    assert env[b"PATH"] == b"/tools/bin:/app/bin:/usr/bin:/bin"


def test_an_environment_past_execves_limit_is_refused() -> None:
    huge = [(b"BIG", b"x" * MAX_ENV_BYTES)]
    with pytest.raises(PlanError, match="the caller's environment takes"):
        compute(EnvRequest(huge), None, [])
    grows = from_mapping({"BIG": "x" * (MAX_ENV_BYTES // 2), "BIGGER": "y" * (MAX_ENV_BYTES // 2)})
    with pytest.raises(PlanError, match="the computed environment takes"):
        compute(EnvRequest(CALLER), None, [grows])


def test_redaction_drops_matching_names_in_any_case_and_keeps_the_rest() -> None:
    env = [
        (b"GITHUB_TOKEN", b"t"),
        (b"github_token", b"t"),
        (b"DB_PASSWORD", b"p"),
        (b"SSH_KEY", b"k"),
        (b"KEYBOARD", b"us"),
        (b"PATH", b"/bin"),
    ]
    assert redact(env, DEFAULT_RUNTIME_REDACT) == [(b"KEYBOARD", b"us"), (b"PATH", b"/bin")]
    assert redact(env, []) == env


def test_list_updates_apply_in_the_order_the_profiles_give_them() -> None:
    unset_then = from_mapping({"MANPATH": [("unset", []), ("prepend", ["/m"])]})
    assert unset_then.lists["MANPATH"] == (
        ListUpdate(ListOp.UNSET),
        ListUpdate(ListOp.PREPEND, ("/m",)),
    )
    caller = [(b"MANPATH", b"/usr/share/man")]
    assert compute(EnvRequest(caller), None, [unset_then]).env == [(b"MANPATH", b"/m")]


def test_search_paths_in_weft_toml_are_a_checked_table() -> None:
    s = Settings.from_toml('[search-paths]\nPATH = ["bin", "libexec/bin"]\nGUILE_LOAD_PATH = []\n')
    assert s.search_paths == {"PATH": ["bin", "libexec/bin"], "GUILE_LOAD_PATH": []}
    assert Settings().search_paths["PATH"] == ["bin", "sbin"]
    for text, message in [
        ("search-paths = 3", "search-paths must be a table"),
        ('[search-paths]\n"1A" = ["bin"]', "'1A' is not a variable name"),
        ('[search-paths]\n"A-B" = ["bin"]', "'A-B' is not a variable name"),
        ('[search-paths]\nPATH = "bin"', "search-paths.PATH must be a list"),
        ('[search-paths]\nPATH = ["../etc"]', "'../etc' must be a directory relative"),
        ('[search-paths]\nPATH = ["/usr/bin"]', "'/usr/bin' must be a directory relative"),
        ('[search-paths]\nPATH = ["a:b"]', "'a:b' must be a directory relative"),
    ]:
        with pytest.raises(ConfigError, match=message):
            Settings.from_toml(text)


def test_runtime_redact_in_weft_toml_replaces_the_default_globs() -> None:
    assert Settings.from_toml('runtime-redact = ["MY_*"]').runtime_redact == ["MY_*"]
    assert "*TOKEN*" in Settings().runtime_redact
    with pytest.raises(ConfigError, match="runtime-redact must be a list of non-empty strings"):
        Settings.from_toml('runtime-redact = [""]')

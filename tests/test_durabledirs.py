"""Durable directories and snapshot scopes, the declaration and its rules (issue 22, first
step): the tables of the issue, the `durableDirs` field of a `.drv` (its JSON round trip,
derivations without it unchanged, a recipe's mistakes refused before anything is added),
and a hand-written `.drv` with a bad declaration refused by a real daemon's `add-text`.
What pause and commit do with them is issue 22's next step."""

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.daemons import DaemonProc
from daemon.cli.blocking import BlockingClient, DaemonError
from store import Store
from store.derivation import Derivation, DerivationError, HashModulo, Output, with_output_paths
from store.durabledirs import (
    MAX_DURABLE_DIRS,
    MAX_NAME_LENGTH,
    MAX_PATH_LENGTH,
    DurableDirError,
    Scope,
    ScopeError,
    check_durable_dirs,
    check_scopes,
    parse_scope,
)
from store.recipe import LocalStore, derivation, using

VALID_NAMES = ["a", "ccache", "test-db", "0", "9lives", "a-b-c", "x" * MAX_NAME_LENGTH]
INVALID_NAMES = [
    "",
    "-a",
    "a-",
    "-",
    "CCache",
    "c_cache",
    "c.cache",
    "c cache",
    "caché",
    "x" * (MAX_NAME_LENGTH + 1),
]
VALID_PATHS = [
    "/build/ccache",
    "/build/my home directory",
    "/build/.config",
    "/build/..config",
    "/build/x..y",
    "/build/a/b/c",
    "/build/...",
    "/build/x.",
    "/build/" + "x" * (MAX_PATH_LENGTH - len("/build/")),
]
INVALID_PATHS = {
    "/build": "not a directory under /build/",
    "/build/": "not a directory under /build/",
    "/tmp/x": "not a directory under /build/",
    "build/x": "not a directory under /build/",
    "/buildx/y": "not a directory under /build/",
    "/build/x/": "ends in '/'",
    "/build//x": "empty component",
    "/build/x//y": "empty component",
    "/build/a:b": "has a ':'",
    "/build/a\tb": "control character",
    "/build/a\nb": "control character",
    "/build/a\x00b": "control character",
    "/build/a\x1fb": "control character",
    "/build/a\x7fb": "control character",
    "/build/.": "'.' or '..' component",
    "/build/..": "'.' or '..' component",
    "/build/x/../y": "'.' or '..' component",
    "/build/x/./y": "'.' or '..' component",
    "/build/" + "x" * (MAX_PATH_LENGTH - len("/build/") + 1): "over 4,096",
}


@pytest.mark.parametrize("name", VALID_NAMES)
def test_a_dns_label_names_a_durable_directory(name: str) -> None:
    assert check_durable_dirs({name: "/build/d"}) == {name: "/build/d"}


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_a_name_that_is_not_a_dns_label_is_refused_by_name(name: str) -> None:
    with pytest.raises(DurableDirError, match="is not a DNS label") as refused:
        check_durable_dirs({name: "/build/d"}, "app: ")
    assert str(refused.value).startswith(f"app: durable directory name {name!r}")


@pytest.mark.parametrize("path", VALID_PATHS)
def test_a_path_under_build_is_accepted_spaces_and_dots_in_names_included(path: str) -> None:
    assert check_durable_dirs({"d": path}) == {"d": path}


@pytest.mark.parametrize("path", list(INVALID_PATHS))
def test_a_bad_path_is_refused_naming_the_directory_and_why(path: str) -> None:
    with pytest.raises(DurableDirError) as refused:
        check_durable_dirs({"cache": path}, "app: ")
    message = str(refused.value)
    assert message.startswith("app: durable directory 'cache': "), message
    assert INVALID_PATHS[path] in message, message


def test_eight_directories_are_allowed_and_nine_refused() -> None:
    eight = {f"d{i}": f"/build/d{i}" for i in range(MAX_DURABLE_DIRS)}
    assert check_durable_dirs(eight) == eight
    with pytest.raises(DurableDirError, match=r"9 durable directories, over the 8"):
        check_durable_dirs({**eight, "d8": "/build/d8"})


def test_no_directories_is_valid() -> None:
    assert check_durable_dirs({}) == {}


def test_two_names_for_one_path_are_refused_naming_both() -> None:
    with pytest.raises(DurableDirError, match="'a' and 'b' are both '/build/x'"):
        check_durable_dirs({"a": "/build/x", "b": "/build/x"})


@pytest.mark.parametrize(
    "dirs",
    [
        {"outer": "/build/x", "inner": "/build/x/y"},
        {"inner": "/build/x/y", "outer": "/build/x"},
        # Names sorting between them (' ' and '!' sort before '/') do not hide the nesting.
        {"outer": "/build/x", "a": "/build/x y", "b": "/build/x!", "inner": "/build/x/y/z"},
    ],
)
def test_nested_directories_are_refused_naming_inner_and_outer(dirs: dict[str, str]) -> None:
    with pytest.raises(DurableDirError, match=r"'inner' .* is inside 'outer' .*may not nest"):
        check_durable_dirs(dirs)


def test_siblings_sharing_a_prefix_do_not_nest() -> None:
    dirs = {"a": "/build/x", "b": "/build/xy", "c": "/build/x y", "d": "/build/y/x"}
    assert check_durable_dirs(dirs) == dirs


def test_a_mapping_of_the_wrong_types_is_refused() -> None:
    with pytest.raises(DurableDirError, match="mapping of name to path"):
        check_durable_dirs(["/build/x"])  # type: ignore[arg-type]
    with pytest.raises(DurableDirError, match="its path 3 is not a string"):
        check_durable_dirs({"a": 3})  # type: ignore[dict-item]
    with pytest.raises(DurableDirError, match="name 3 is not a string"):
        check_durable_dirs({3: "/build/x"})  # type: ignore[dict-item]


# (on-pause, on-commit) -> valid; None is unset.
SCOPE_RULE = {
    (None, None): True,
    (None, "full"): True,
    (None, "data"): True,
    ("full", None): True,
    ("full", "full"): True,
    ("full", "data"): True,
    ("data", "data"): True,
    ("data", None): False,
    ("data", "full"): False,
}


@pytest.mark.parametrize(("on_pause", "on_commit"), list(SCOPE_RULE))
def test_on_commit_must_be_a_subset_of_on_pause(
    on_pause: str | None, on_commit: str | None
) -> None:
    if SCOPE_RULE[on_pause, on_commit]:
        check_scopes(on_pause, on_commit)
        check_scopes(*(None if s is None else Scope(s) for s in (on_pause, on_commit)))
    else:
        with pytest.raises(ScopeError, match="must be a subset of on-pause"):
            check_scopes(on_pause, on_commit)


@pytest.mark.parametrize("value", ["memory", "Full", "DATA", "", "process", None, 1])
def test_an_unknown_scope_is_refused_not_turned_into_full(value: object) -> None:
    with pytest.raises(ScopeError, match="unknown snapshot scope"):
        parse_scope(value)
    if value is not None:
        with pytest.raises(ScopeError, match="on-commit: unknown snapshot scope"):
            check_scopes("full", value)  # type: ignore[arg-type]
        with pytest.raises(ScopeError, match="on-pause: unknown snapshot scope"):
            check_scopes(value, None)  # type: ignore[arg-type]


def test_known_scopes_parse_to_the_enum() -> None:
    assert parse_scope("full") is Scope.FULL
    assert parse_scope("data") is Scope.DATA
    assert parse_scope(Scope.DATA) is Scope.DATA


def _drv(**changes: object) -> Derivation:
    return Derivation(
        "app",
        "/bin/sh",
        {"out": Output()},
        args=("-c", "echo > $out"),
        **changes,  # type: ignore[arg-type]
    )


def _with_paths(drv: Derivation, store_dir: str = "/weft/store") -> Derivation:
    return with_output_paths(drv, store_dir, HashModulo(lambda p: pytest.fail(p)))


def test_durable_dirs_round_trip_through_the_drv_json() -> None:
    dirs = {"ccache": "/build/ccache", "db": "/build/my home directory/db"}
    drv = _with_paths(_drv(durable_dirs=dirs))
    text = drv.to_json()
    assert json.loads(text)["durableDirs"] == dirs
    assert Derivation.from_json(text) == drv
    assert Derivation.from_json(text).to_json() == text


def test_a_derivation_without_durable_dirs_keeps_its_text_and_output_path() -> None:
    plain = _with_paths(_drv())
    assert "durableDirs" not in json.loads(plain.to_json())
    assert _with_paths(_drv(durable_dirs={})) == plain
    assert Derivation.from_json(plain.to_json()).durable_dirs == {}
    # The declaration enters the hash: keeping a directory makes another derivation.
    kept = _with_paths(_drv(durable_dirs={"ccache": "/build/ccache"}))
    assert kept.output_path() != plain.output_path()


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ({}, "durableDirs is empty (leave it out)"),
        (["/build/x"], "durableDirs is not a dict"),
        ({"a": 1}, "the values of durableDirs are not strs"),
        ({"A": "/build/x"}, "durableDirs: durable directory name 'A'"),
        ({"a": "/tmp/x"}, "durableDirs: durable directory 'a': '/tmp/x' is not a directory"),
    ],
)
def test_a_drv_with_a_bad_durable_dirs_field_does_not_parse(value: object, says: str) -> None:
    doc = json.loads(_with_paths(_drv()).to_json())
    doc["durableDirs"] = value
    with pytest.raises(DerivationError, match="malformed derivation") as refused:
        Derivation.from_json(json.dumps(doc))
    assert says in str(refused.value)


def test_validate_refuses_a_bad_declaration_made_in_python() -> None:
    with pytest.raises(DerivationError, match=r"app: durable directory 'a': .* has a ':'"):
        _with_paths(_drv(durable_dirs={"a": "/build/a:b"}))


@pytest.fixture
def var_store() -> Iterator[Store]:
    # Under /var/tmp, as the daemon tests run under /tmp.
    root = Path(tempfile.mkdtemp(prefix="weft-durable-", dir="/var/tmp"))
    s = Store.open(root / "state")
    yield s
    s.close()
    shutil.rmtree(root)


def _entries(store_dir: str) -> list[str]:
    return sorted(e for e in os.listdir(store_dir) if not e.startswith("."))


def test_a_recipe_declares_durable_dirs_and_they_are_written(var_store: Store) -> None:
    with using(LocalStore(var_store)):
        app = derivation(
            "app", "/bin/sh", ["-c", "echo > $out"], durable_dirs={"ccache": "/build/ccache"}
        )
    stored = Derivation.from_json(Path(app.path).read_text())
    assert stored.durable_dirs == {"ccache": "/build/ccache"}
    assert json.loads(Path(app.path).read_text())["durableDirs"] == {"ccache": "/build/ccache"}


def test_a_recipe_with_a_bad_declaration_adds_nothing(var_store: Store) -> None:
    before = _entries(var_store.store_dir)
    with using(LocalStore(var_store)):
        with pytest.raises(
            DurableDirError, match=r"app: durable directory 'inner' .* is inside 'cache'"
        ):
            derivation(
                "app",
                "/bin/sh",
                ["-c", "echo > $out"],
                durable_dirs={"cache": "/build/c", "inner": "/build/c/d"},
            )
        with pytest.raises(DurableDirError, match="app: durable directory name 'Cache'"):
            derivation("app", "/bin/sh", ["-c", "true"], durable_dirs={"Cache": "/build/c"})
    assert _entries(var_store.store_dir) == before


def test_add_text_refuses_a_hand_written_drv_with_bad_durable_dirs(daemon: DaemonProc) -> None:
    client = BlockingClient(daemon.socket)
    try:
        good = _with_paths(_drv(durable_dirs={"ccache": "/build/ccache"}), daemon.store_dir)
        doc = json.loads(good.to_json())
        doc["durableDirs"] = {"ccache": "/build/ccache", "db": "/build/ccache/db"}
        bad = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        before = _entries(daemon.store_dir)
        with pytest.raises(DaemonError) as refused:
            client.call("add-text", name="app.drv", text=bad, references=[])
        assert refused.value.code == "bad-request"
        message = refused.value.message
        assert "durable directory 'db' ('/build/ccache/db') is inside 'ccache'" in message
        assert _entries(daemon.store_dir) == before
        assert daemon.alive()
        # The same derivation with its declaration as written is accepted, text unchanged.
        text = good.to_json()
        path = client.call("add-text", name="app.drv", text=text, references=[])["path"]
        assert Path(path).read_text() == text
    finally:
        client.close()

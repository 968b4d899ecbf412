"""What the store refuses before it adds anything: derivations that could never be built,
hashes weft does not compute, sources that hold the store itself.  Over a real daemon
where a client would meet them, and against the library where recipes do."""

import dataclasses
import os
import re
from pathlib import Path

import blake3
import pytest

from bench.daemons import DaemonProc
from daemon.cli.blocking import BlockingClient, DaemonError
from store import Store, nar
from store.derivation import DUMMY_HASH, Derivation, DerivationError, Output
from store.errors import NotValid, StoreError
from store.hashing import format_hash, hash_path
from store.ingest import SourceHoldsDestination, copy_tree
from store.nar import UnsupportedFileType
from store.paths import InvalidPath, PathKind, make_store_path
from store.recipe import LocalStore, derivation, using
from tests.daemon_fixtures import Graph

H1 = "blake3:" + "11" * 32


def text_path(store_dir: str, name: str, text: str, refs: list[str]) -> str:
    """The store path `add-text` gives a text (as `store.adds` computes it)."""
    data = text.encode()
    archive = nar.HEADER + nar.file_header(False, len(data)) + data + nar.file_trailer(len(data))
    content = format_hash(blake3.blake3(archive).digest())
    return str(make_store_path(PathKind.TEXT, content, store_dir, name, sorted(refs)))


def hand_written(store_dir: str, name: str = "x", **changes: object) -> str:
    """A `.drv` as someone might write it by hand: plausible, with `changes` made."""
    drv = Derivation(
        name=name,
        builder="/bin/sh",
        outputs={"out": Output(f"{store_dir}/{'1' * 32}-{name}")},
        args=("-c", "echo hi > $out"),
        env={"out": f"{store_dir}/{'1' * 32}-{name}"},
    )
    return dataclasses.replace(drv, **changes).to_json()  # type: ignore[arg-type]


BAD_DERIVATIONS = {
    "a name climbing out": ({"name": "../x"}, "invalid-path", "starts with a period"),
    "a name with a slash": ({"name": "x/y"}, "invalid-path", "forbidden character '/'"),
    "a name with a newline": ({"name": "a\nb"}, "invalid-path", "forbidden character '\\n'"),
    "a name with a semicolon": ({"name": "a;b"}, "invalid-path", "forbidden character ';'"),
    "a name ending in .drv": ({"name": "thing.drv"}, "invalid-path", "may not end in '.drv'"),
    "an output name with a semicolon": (
        {"outputs": {"a;b": Output("/x")}},
        "invalid-path",
        "invalid output name",
    ),
    "an output name ending in .drv": (
        {"outputs": {"lib.drv": Output("/x")}},
        "invalid-path",
        "may not end in '.drv'",
    ),
    "a sha256 hash": (
        {"outputs": {"out": Output("/x", "sha256:" + "0" * 64)}},
        "bad-request",
        "not a blake3 hash",
    ),
    "a short hash": (
        {"outputs": {"out": Output("/x", "blake3:abc")}},
        "bad-request",
        "64 lowercase hex digits",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DERIVATIONS))
def test_a_hand_written_derivation_that_cannot_be_built_gets_a_clear_error_and_is_not_registered(
    daemon: DaemonProc, case: str
) -> None:
    changes, code, words = BAD_DERIVATIONS[case]
    text = hand_written(daemon.store_dir, **changes)
    # The file's name is fine: what is wrong is inside.
    path = text_path(daemon.store_dir, "x.drv", text, [])
    with BlockingClient(daemon.socket) as c:
        with pytest.raises(DaemonError) as refused:
            c.call("add-text", name="x.drv", text=text, references=[])
        assert refused.value.code == code
        assert words in refused.value.message
        assert c.call("is-valid", paths=[path]) == []
    assert not os.path.lexists(path)
    assert daemon.alive()


def test_a_derivation_is_checked_whole_before_it_is_registered(store: Store) -> None:
    sd = store.store_dir
    with using(LocalStore(store)):
        good = derivation("good", "/bin/sh", ["-c", "echo > $out"])
    text = Path(good.path).read_text()
    # Anything named *.drv must be a derivation, named as its file is, whose references
    # are its inputs and whose outputs are the ones its inputs give.
    refused = {
        "not a derivation": ("thing.drv", "{}", []),
        "named otherwise": ("other.drv", text, []),
        "with a reference it does not use": ("good.drv", text, [good.path]),
        "with forged outputs": ("x.drv", hand_written(sd), []),
    }
    for name, body, refs in refused.values():
        with pytest.raises(DerivationError):
            store.add_text(name, body, refs)
        assert not store.is_valid(text_path(sd, name, body, refs))
    # An input must be a derivation that is valid, with the outputs asked for.
    source = store.add_text("source", "not a derivation").path
    uses = Derivation.from_json(text)
    for inputs, words in (
        ({source: ("out",)}, "is not a derivation"),
        ({f"{sd}/{'2' * 32}-gone.drv": ("out",)}, "is not valid"),
        ({good.path: ("dev",)}, "has no output 'dev'"),
    ):
        drv = dataclasses.replace(uses, input_drvs=inputs)
        with pytest.raises(DerivationError, match=re.escape(words)):
            store.add_text("good.drv", drv.to_json(), drv.references())
    assert sorted(n for n in os.listdir(sd) if n.endswith(".drv")) == [os.path.basename(good.path)]


RECIPE_MISTAKES = {
    "a name climbing out": ({"name": "../x"}, InvalidPath, "starts with a period"),
    "a name with a slash": ({"name": "x/y"}, InvalidPath, "forbidden character '/'"),
    "a name with a newline": ({"name": "a\nb"}, InvalidPath, "forbidden character '\\n'"),
    "a name with a semicolon": ({"name": "a;b"}, InvalidPath, "forbidden character ';'"),
    "a name ending in .drv": ({"name": "thing.drv"}, InvalidPath, "may not end in '.drv'"),
    "a bad output name": ({"outputs": ("out", "a;b")}, InvalidPath, "invalid output name"),
    "an output ending in .drv": ({"outputs": ("x.drv",)}, InvalidPath, "may not end in"),
    "outputs as one string": ({"outputs": "dev"}, DerivationError, "a list of names"),
    "an SRI sha256 hash": ({"output_hash": "sha256-" + "A" * 43 + "="}, DerivationError, "blake3"),
    "a sha256 hash": ({"output_hash": "sha256:" + "0" * 64}, DerivationError, "not a blake3"),
    "a short hash": ({"output_hash": "blake3:abc"}, DerivationError, "64 lowercase hex"),
    "an upper-case hash": ({"output_hash": "blake3:" + "A" * 64}, DerivationError, "lowercase"),
    "a hash on two outputs": (
        {"output_hash": H1, "outputs": ("out", "doc")},
        DerivationError,
        "only a single 'out' output",
    ),
    "a hash on an output not called out": (
        {"output_hash": H1, "outputs": ("bin",)},
        DerivationError,
        "only a single 'out' output",
    ),
    "a NUL in an argument": ({"args": ["a\0b"]}, DerivationError, "NUL"),
    "a bad variable name": ({"env": {"A=B": "x"}}, DerivationError, "variable name"),
}


@pytest.mark.parametrize("case", list(RECIPE_MISTAKES))
def test_the_recipe_api_refuses_a_derivation_that_cannot_be_built_before_writing_it(
    store: Store, case: str
) -> None:
    changes, error, words = RECIPE_MISTAKES[case]
    args = {"name": "x", "builder": "/bin/sh", **changes}
    with using(LocalStore(store)), pytest.raises(error, match=re.escape(words)):
        derivation(**args)  # type: ignore[arg-type]
    assert [n for n in os.listdir(store.store_dir) if not n.startswith(".")] == []


def test_an_empty_output_hash_builds_and_reports_the_hash_it_got(
    graph: Graph, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fetched = graph.sh("fetched", "echo downloaded > $out", output_hash="")
    assert f"found empty hash, assuming '{DUMMY_HASH}'" in capsys.readouterr().err
    assert fetched.drv.outputs["out"].hash == DUMMY_HASH
    (r,) = graph.build(fetched)
    (tmp_path / "same").write_text("downloaded\n")
    got, _ = hash_path(tmp_path / "same")
    assert r["status"] == "failed"
    assert f"hash mismatch in fixed-output derivation '{fetched.path}'" in r["message"]
    assert f"specified: {DUMMY_HASH}" in r["message"]
    assert f"got:    {got}" in r["message"]
    assert graph.client.call("is-valid", paths=[fetched.out]) == []
    # The hash it reported is the one to write.
    fixed = graph.sh("fetched", "echo downloaded > $out", output_hash=got)
    (r,) = graph.build(fixed)
    assert r["status"] == "built", r
    assert Path(fixed.out).read_text() == "downloaded\n"


def test_adding_the_store_or_what_holds_it_is_refused_clearly(daemon: DaemonProc) -> None:
    with BlockingClient(daemon.socket) as c:
        for src in (daemon.store_dir, str(daemon.state), daemon.store_dir + "/.tmp"):
            with pytest.raises(DaemonError) as refused:
                c.call("add-from-path", path=src)
            assert refused.value.code == "bad-request", (src, refused.value.message)
            assert "store" in refused.value.message
        assert [n for n in os.listdir(daemon.store_dir) if not n.startswith(".")] == []
        assert os.listdir(Path(daemon.store_dir) / ".tmp") == []
    assert daemon.alive()


def test_adding_a_valid_store_path_is_that_path_and_a_file_inside_one_is_its_content(
    store: Store, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "tool").write_text("#!/bin/sh\n")
    info = store.add_path(tree)
    assert store.add_path(info.path) == info
    assert store.add_path(info.path + "/") == info
    inner = store.add_path(info.path + "/bin")
    assert inner.path != info.path and inner.path.endswith("-bin")
    assert inner.nar_hash == hash_path(tree / "bin")[0]
    # Asked under another name, it is a new path with the same content.
    renamed = store.add_path(info.path, name="again")
    assert renamed.path.endswith("-again") and renamed.nar_hash == info.nar_hash
    with pytest.raises(NotValid):
        store.add_path(f"{store.store_dir}/{'3' * 32}-not-there")
    with pytest.raises(StoreError, match="empty string"):
        store.add_path("")


def test_a_copy_never_walks_into_a_directory_that_holds_its_destination(tmp_path: Path) -> None:
    # What the store's path check cannot see (a bind mount, a rename mid-walk) the copy
    # itself refuses: it would copy itself without end.
    src = tmp_path / "src"
    (src / "inner").mkdir(parents=True)
    with pytest.raises(SourceHoldsDestination):
        copy_tree(src, src / "inner" / "copy")
    assert os.listdir(src / "inner") == []
    got = copy_tree(src / "inner", tmp_path / "beside")
    assert got.nar_hash == hash_path(src / "inner")[0]


def test_a_tree_nested_deeper_than_an_archive_may_be_is_refused_not_a_crash(
    store: Store, tmp_path: Path
) -> None:
    deep = tmp_path / "deep"
    (deep / "/".join(["d"] * (nar.MAX_DEPTH + 1))).mkdir(parents=True)
    with pytest.raises(UnsupportedFileType, match="nested deeper than"):
        store.add_path(deep)
    assert os.listdir(store.tmp.path) == []
    (deep / "/".join(["d"] * nar.MAX_DEPTH) / "d").rmdir()
    assert store.add_path(deep).nar_hash == hash_path(deep)[0]

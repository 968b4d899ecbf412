"""The worker's inputs, without an engine: what it believes of a path already valid in its
store, the content address it declares for a path it imports, and the order it imports
them in (tests/test_remote_worker.py runs all of it against a real farm)."""

import dataclasses
from pathlib import Path

import blake3
import pytest

from remote.digests import node_of
from store import nar
from store.hashing import format_hash
from store.paths import PathKind, make_store_path
from worker.inputs import InputError, Materialiser, _address, _Meta, _references_first


def test_a_valid_input_with_other_contents_than_the_input_roots_fails_the_lease(
    tmp_path: Path,
) -> None:
    tool = tmp_path / "tool"
    tool.mkdir()
    (tool / "run").write_text("#!/bin/sh\n")
    (tool / "run").chmod(0o755)
    (tool / "link").symlink_to("run")
    want = dataclasses.replace(node_of(str(tool)), tree=b"")
    inputs = Materialiser(None, str(tmp_path / "scratch"))  # type: ignore[arg-type]
    inputs._check_valid(str(tool), want)
    other = tmp_path / "other"
    other.mkdir()
    (other / "run").write_text("#!/bin/sh\n")  # not executable: another node
    (other / "link").symlink_to("run")
    with pytest.raises(InputError, match="with other contents"):
        inputs._check_valid(str(other), want)


def test_an_imported_path_declares_the_content_address_its_name_proves(tmp_path: Path) -> None:
    store_dir = "/var/tmp/some/store"
    data = tmp_path / "data"
    data.write_text("text\n")
    nar_hash = format_hash(blake3.blake3(b"".join(nar.dump(data))).digest())
    ref = f"{store_dir}/{'a' * 32}-ref"

    def path(kind: PathKind, fp: str, refs: list[str]) -> str:
        return str(make_store_path(kind, fp, store_dir, "data", refs))

    text = path(PathKind.TEXT, nar_hash, [ref])
    assert _address(store_dir, text, nar_hash, [ref]) == f"text:{nar_hash}"
    source = path(PathKind.SOURCE, nar_hash, [])
    assert _address(store_dir, source, nar_hash, []) == f"source:{nar_hash}"
    fixed = path(PathKind.OUTPUT, f"fixed:out:{nar_hash}", [])
    assert _address(store_dir, fixed, nar_hash, []) == f"fixed:out:{nar_hash}"
    built = f"{store_dir}/{'b' * 32}-data"  # addressed by its derivation: nothing to prove
    assert _address(store_dir, built, nar_hash, []) is None


def test_imported_paths_come_references_first_and_a_cycle_is_refused() -> None:
    chain = {f"/s/{i:05}": _Meta(f"/s/{i:05}", "", 0, [], None) for i in range(3000)}
    for i in range(1, 3000):
        chain[f"/s/{i:05}"].references.append(f"/s/{i - 1:05}")
    chain["/s/self"] = _Meta("/s/self", "", 0, ["/s/self", "/s/00007", "/elsewhere"], None)
    order = [m.path for m in _references_first(chain)]
    at = {p: i for i, p in enumerate(order)}
    assert sorted(order) == sorted(chain)
    for meta in chain.values():
        assert all(at[r] < at[meta.path] for r in meta.references if r in chain and r != meta.path)
    cycle = {"/a": _Meta("/a", "", 0, ["/b"], None), "/b": _Meta("/b", "", 0, ["/a"], None)}
    with pytest.raises(InputError, match="cycle"):
        _references_first(cycle)

import json
import os
from pathlib import Path

import pytest

from store import Store
from store.derivation import (
    Derivation,
    DerivationError,
    HashModulo,
    Output,
    check_output_paths,
    closure_order,
    with_output_paths,
)
from store.recipe import LocalStore, busybox, derivation, source, using

H1 = "blake3:" + "11" * 32
H2 = "blake3:" + "22" * 32


def build_graph(store: Store, fetch_script: str, fixed_hash: str = H1) -> dict[str, object]:
    with using(LocalStore(store)):
        bb = busybox()
        sh = f"{bb}/bin/busybox"
        fetched = derivation("src.tar", sh, ["sh", "-c", fetch_script], output_hash=fixed_hash)
        lib = derivation("lib", sh, ["sh", "-c", f"cat {fetched} > $out"])
        app = derivation(
            "app", sh, ["sh", "-c", f"cat {lib} {fetched} > $out"], outputs=("out", "doc")
        )
    return {"bb": bb, "fetched": fetched, "lib": lib, "app": app}


def test_canonical_json_round_trip_and_stored_drv(store: Store) -> None:
    g = build_graph(store, "fetch one way")
    app = g["app"]
    text = Path(app.path).read_text()
    assert text == app.drv.to_json()
    assert (
        json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        == text
    )
    assert Derivation.from_json(text) == app.drv
    assert app.path.endswith("-app.drv")
    assert sorted(store.references(app.path)) == sorted([g["lib"].path, g["fetched"].path, g["bb"]])
    assert str(app) == app.out == app.outputs["out"]
    assert app.outputs["doc"].endswith("-app-doc")
    assert app.drv.env["out"] == app.out and app.drv.env["doc"] == app.outputs["doc"]
    assert app.drv.input_drvs[g["lib"].path] == ("out",)


def test_output_paths_depend_on_inputs_modulo_fixed_outputs(store: Store) -> None:
    a = build_graph(store, "fetch one way")
    b = build_graph(store, "fetch another way")
    # How a fixed-output input is fetched changes its derivation, not its output, and
    # not the outputs of anything built from it.
    assert a["fetched"].path != b["fetched"].path
    assert a["fetched"].out == b["fetched"].out
    assert a["lib"].out == b["lib"].out
    assert a["app"].outputs == b["app"].outputs
    c = build_graph(store, "fetch one way", fixed_hash=H2)
    assert c["fetched"].out != a["fetched"].out
    assert c["lib"].out != a["lib"].out


def test_recipes_pick_up_inputs_from_strings(store: Store, tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("payload")
    with using(LocalStore(store)):
        bb = busybox()
        data = source(tmp_path / "data.txt")
        one = derivation("one", f"{bb}/bin/busybox", ["sh", "-c", "echo 1 > $out"])
        two = derivation(
            "two", f"{bb}/bin/busybox", ["sh", "-c", f"cat {data} > $out"], env={"DEP": one.out}
        )
    assert set(two.drv.input_srcs) == {bb, data}
    assert dict(two.drv.input_drvs) == {one.path: ("out",)}
    assert os.path.isfile(f"{bb}/bin/busybox") and os.path.islink(f"{bb}/bin/sh")


def test_tampered_output_paths_are_refused(store: Store) -> None:
    g = build_graph(store, "fetch")
    lib = g["lib"].drv
    drvs = {g["fetched"].path: g["fetched"].drv}
    hashes = HashModulo(drvs.__getitem__)
    check_output_paths(lib, store.store_dir, hashes)
    forged = Derivation(**{**lib.__dict__, "outputs": {"out": Output(g["app"].out)}})
    with pytest.raises(DerivationError, match="do not match"):
        check_output_paths(forged, store.store_dir, hashes)
    with pytest.raises(DerivationError, match="only a single 'out'"):
        with_output_paths(
            Derivation("x", "/b", {"out": Output(), "bin": Output(hash=H1)}),
            store.store_dir,
            hashes,
        )


def test_closure_order_of_a_diamond() -> None:
    graph = {"d": [], "b": ["d"], "c": ["d"], "a": ["b", "c"]}
    resolve = {
        k: Derivation(k, "/b", {"out": Output()}, input_drvs={v: ("out",) for v in vs})
        for k, vs in graph.items()
    }.__getitem__
    order = closure_order(["a"], resolve)
    assert order[0] == "d" and order[-1] == "a" and set(order) == {"a", "b", "c", "d"}
    cyclic = {"x": ["y"], "y": ["x"]}
    resolve2 = {
        k: Derivation(k, "/b", {"out": Output()}, input_drvs={v: ("out",) for v in vs})
        for k, vs in cyclic.items()
    }.__getitem__
    with pytest.raises(DerivationError, match="cycle"):
        closure_order(["x"], resolve2)


def test_malformed_derivations_are_refused() -> None:
    for text in ["{", "[]", '{"format": 2}', '{"format": 1, "name": "x"}']:
        with pytest.raises(DerivationError):
            Derivation.from_json(text)


def test_a_chain_of_derivations_hundreds_deep_is_checked_without_running_out_of_stack(
    store: Store,
) -> None:
    depth = 500  # each level cost the recursive walk three frames: ~330 levels fit
    with using(LocalStore(store)):
        prev = derivation("link0", "/bin/sh", ["-c", "echo > $out"])
        for i in range(1, depth):
            prev = derivation(f"link{i}", "/bin/sh", ["-c", f"cat {prev} > $out"])
    assert len(closure_order([prev.path], lambda p: Derivation.from_json(Path(p).read_text()))) == (
        depth
    )
    # Another process knows none of their hashes: both the store's check and a build's
    # read the whole chain back from disk.
    with Store.open(store.state.root) as fresh:
        draft = Derivation("top", "/bin/sh", {"out": Output()}, input_drvs={prev.path: ("out",)})
        cold = HashModulo(lambda p: Derivation.from_json(Path(p).read_text()))
        top = with_output_paths(draft, fresh.store_dir, cold)
        added = fresh.add_text("top.drv", top.to_json(), top.references())
        assert fresh.is_valid(added.path)
    rebuilt = HashModulo(lambda p: Derivation.from_json(Path(p).read_text()))
    check_output_paths(top, store.store_dir, rebuilt)

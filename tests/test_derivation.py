import json
import os
from pathlib import Path

import blake3
import pytest

from bench.daemons import DaemonProc
from daemon.cli.blocking import BlockingClient, DaemonError
from store import Store, nar
from store.derivation import (
    Derivation,
    DerivationError,
    HashModulo,
    Output,
    check_output_paths,
    closure_order,
    with_output_paths,
)
from store.environment.delta import Delta, DeltaError, ListOp, ListUpdate
from store.environment.view import from_mapping
from store.hashing import format_hash
from store.paths import PathKind, make_store_path
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


def test_texts_are_checked_from_the_bytes_written_and_their_derivations_handed_on(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`add_texts` checks a `.drv` from the bytes it wrote, reading nothing back, and
    keeps what it parsed for the builder (`Store.checked_derivation`); a text over the
    size any `.drv` may be is refused as a file of that size is."""
    g = build_graph(store, "fetch")
    lib = g["lib"]

    def no_reading(where: object) -> bytes:
        raise AssertionError(f"read back {where}")

    monkeypatch.setattr("store.drvcheck.read_drv_file", no_reading)
    other = Derivation(**{**lib.drv.__dict__, "name": "lib2", "env": {**lib.drv.env, "x": "1"}})
    other = with_output_paths(
        other, store.store_dir, HashModulo(lambda p: Derivation.from_json(Path(p).read_text()))
    )
    (info,) = store.add_texts([("lib2.drv", other.to_json(), other.references())])
    assert store.checked_derivation(info.path) == other
    assert store.checked_derivation(lib.path.replace("-lib.drv", "-nope.drv")) is None

    monkeypatch.setattr("store.drvcheck.MAX_DRV_SIZE", len(other.to_json()) - 1)
    bigger = with_output_paths(
        Derivation(**{**other.__dict__, "env": {**other.env, "y": "2"}}),
        store.store_dir,
        HashModulo(lambda p: Derivation.from_json(Path(p).read_text())),
    )
    with pytest.raises(DerivationError, match=r"over the .* bytes allowed"):
        store.add_texts([("lib2.drv", bigger.to_json(), bigger.references())])


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


class PinnedStore:
    """A recipe store whose paths are what a store at /weft/store would give, whatever
    the test's state dir: what pins a derivation's paths to constants."""

    store_dir = "/weft/store"

    def add_source(self, path: str, name: str) -> str:
        raise AssertionError("the pinned derivations have no sources")

    def add_text(self, name: str, text: str, references: list[str]) -> str:
        data = text.encode()
        archive = nar.HEADER + nar.file_header(False, len(data)) + data
        archive += nar.file_trailer(len(data))
        content = format_hash(blake3.blake3(archive).digest())
        return str(make_store_path(PathKind.TEXT, content, self.store_dir, name, references))


def test_derivations_without_an_env_delta_keep_the_paths_they_had_before_it_existed() -> None:
    # Computed by the code before `envDelta` existed (commit b16fd31).
    with using(PinnedStore()):
        lib = derivation("lib", "/bin/sh", ["-c", "echo lib > $out"], env={"GREETING": "hi"})
        app = derivation(
            "app", "/bin/sh", ["-c", f"cat {lib} > $out; echo > $doc"], outputs=("out", "doc")
        )
        src = derivation("src.tar", "/bin/sh", ["-c", "fetch"], output_hash=H1)
        use = derivation("use", "/bin/sh", ["-c", f"cat {src} > $out"], env_delta={})
    s = "/weft/store/"
    assert lib.path == s + "m6fvh9q343si5pfgkjxi0pcb8w4y9spb-lib.drv"
    assert lib.out == s + "ahm3mravddsafb2iwpaakcqj64ixdklh-lib"
    assert app.path == s + "ydfw3i9pfzfcbsdn7413970xdx29phms-app.drv"
    assert app.out == s + "pv6l6kr2b19jhd3qmn9yin9z6ylvv5ks-app"
    assert app.outputs["doc"] == s + "6frq78dsxmkxdgkxk3hwdh9lpzqcfyi5-app-doc"
    assert src.path == s + "xzwn7r5l8ndwb3d4pb5ii4wvy4hb7bl5-src.tar.drv"
    assert src.out == s + "8hgifg792jp6kqp2grdfnqybkm25hmv1-src.tar"
    assert use.path == s + "smas4na700v0caaa8g6cr1k2vczq43n4-use.drv"
    assert use.out == s + "wqiqain568vpfq5id2aix28pm9igibwg-use"
    assert "envDelta" not in json.loads(use.drv.to_json())


def test_an_env_delta_is_written_parsed_back_and_enters_the_hash() -> None:
    delta = {"CC": "gcc", "OLD": None, "PATH": [("prepend", ["/opt/bin"]), ("append", ["/z"])]}
    with using(PinnedStore()):
        plain = derivation("d", "/bin/sh", ["-c", "env > $out"])
        with_delta = derivation("d", "/bin/sh", ["-c", "env > $out"], env_delta=delta)
        other = derivation("d", "/bin/sh", ["-c", "env > $out"], env_delta={"CC": "clang"})
    doc = json.loads(with_delta.drv.to_json())
    assert doc["envDelta"] == {
        "list": {
            "PATH": [{"op": "prepend", "value": ["/opt/bin"]}, {"op": "append", "value": ["/z"]}]
        },
        "scalar": {"CC": "gcc", "OLD": None},
    }
    assert Derivation.from_json(with_delta.drv.to_json()) == with_delta.drv
    assert with_delta.drv.env_delta == from_mapping(delta)
    assert len({plain.out, with_delta.out, other.out}) == 3
    assert len({plain.path, with_delta.path, other.path}) == 3


def _drv_doc(**changes: object) -> str:
    drv = Derivation("x", "/b", {"out": Output("/s/x")}, env={"out": "/s/x"})
    doc = json.loads(drv.to_json())
    doc.update(changes)
    return json.dumps(doc)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (_drv_doc(envDelta={"scalar": {"1A": "x"}}), "1A"),
        (_drv_doc(envDelta={"scalar": {"A-B": "x"}}), "A-B"),
        (_drv_doc(envDelta={"scalar": {"N": 5}}), "scalar N"),
        (_drv_doc(envDelta={"list": {"PATH": [{"op": "add", "value": ["/a"]}]}}), "list PATH"),
        (_drv_doc(envDelta={"list": {"PATH": "/a"}}), "list PATH"),
        (_drv_doc(envDelta={"scalars": {}}), "unknown keys"),
        (_drv_doc(envDelta=[]), "must be an object"),
        (_drv_doc(envDelta={}), "envDelta is empty"),
        (_drv_doc(envDeltas={"scalar": {"A": "x"}}), "unknown fields \\['envDeltas'\\]"),
    ],
)
def test_a_malformed_env_delta_is_a_derivation_error_naming_what_is_wrong(
    text: str, says: str
) -> None:
    with pytest.raises(DerivationError, match=says):
        Derivation.from_json(text)


def test_a_bad_delta_made_in_python_is_refused_before_anything_is_written(store: Store) -> None:
    bad = Delta({}, {"A-B": (ListUpdate(ListOp.SET, ("x",)),)})
    before = sorted(os.listdir(store.store_dir))
    with using(LocalStore(store)):
        with pytest.raises(DeltaError, match="A-B"):
            derivation("d", "/bin/sh", ["-c", "true"], env_delta=bad)
        with pytest.raises(DeltaError, match="OOPS"):
            derivation("d", "/bin/sh", ["-c", "true"], env_delta={"OOPS": [("frob", ["x"])]})
    with pytest.raises(DerivationError, match="A-B"):
        with_output_paths(
            Derivation("d", "/b", {"out": Output()}, env_delta=bad),
            store.store_dir,
            HashModulo({}.__getitem__),
        )
    assert sorted(os.listdir(store.store_dir)) == before


def test_store_paths_in_an_env_delta_are_inputs(store: Store) -> None:
    with using(LocalStore(store)):
        tools = derivation("tools", "/bin/sh", ["-c", "mkdir -p $out/bin"])
        text = store.add_text("note", "n").path
        app = derivation(
            "app",
            "/bin/sh",
            ["-c", "env > $out"],
            env_delta={"NOTE": text, "PATH": [("prepend", [f"{tools}/bin"])]},
        )
    assert dict(app.drv.input_drvs) == {tools.path: ("out",)}
    assert app.drv.input_srcs == (text,)
    assert sorted(store.references(app.path)) == sorted([tools.path, text])


def _store_entries(d: DaemonProc) -> list[str]:
    return sorted(e for e in os.listdir(d.store_dir) if not e.startswith("."))


def test_the_daemon_refuses_a_hand_written_drv_with_a_malformed_env_delta(
    daemon: DaemonProc,
) -> None:
    with BlockingClient(daemon.socket) as client:
        store_dir = str(client.call("store-dir"))
        good = Derivation("hand", "/bin/sh", {"out": Output()}, args=("-c", "env > $out"))
        good = with_output_paths(good, store_dir, HashModulo({}.__getitem__))
        doc = json.loads(good.to_json())
        doc["envDelta"] = {"list": {"PATH": [{"op": "frobnicate", "value": ["/a"]}]}}
        before = _store_entries(daemon)
        with pytest.raises(DaemonError, match="list PATH: unknown operation 'frobnicate'"):
            client.call("add-text", name="hand.drv", text=json.dumps(doc), references=[])
        doc["envDelta"] = {"scalar": {"1A": "x"}}
        with pytest.raises(DaemonError, match="'1A'"):
            client.call("add-text", name="hand.drv", text=json.dumps(doc), references=[])
        assert _store_entries(daemon) == before
        # The same derivation with a good delta is added (its output paths recomputed).
        fixed = with_output_paths(
            Derivation(
                "hand",
                "/bin/sh",
                {"out": Output()},
                args=("-c", "env > $out"),
                env_delta=from_mapping({"PATH": [("prepend", ["/a"])]}),
            ),
            store_dir,
            HashModulo({}.__getitem__),
        )
        path = client.call("add-text", name="hand.drv", text=fixed.to_json(), references=[])
        assert client.call("is-valid", paths=[path["path"]]) == [path["path"]]
        assert _store_entries(daemon) == sorted([*before, os.path.basename(path["path"])])

"""A recipe's `.drv`s added in one batch (`daemon/cli/recipestore.py`, the `add-texts`
operation), the busybox tree remembered between evaluations (`store/recipebusybox.py`), and
a build with nothing to do settled without a task per derivation: through real daemons,
real `store-build` processes and real collections."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench.daemons import DaemonProc
from daemon.cli.blocking import BlockingClient, DaemonError
from daemon.cli.recipestore import DaemonRecipeStore
from store import recipebusybox
from store.hashing import text_path
from store.recipe import Derivation, LocalStore, busybox, derivation, using
from store.store import Store
from tests.daemon_fixtures import Graph

BIN = Path(sys.executable).parent


class CountingClient(BlockingClient):
    """A client that counts the requests it sends, by operation."""

    def __init__(self, sock: str) -> None:
        super().__init__(sock)
        self.sent: list[str] = []

    def call(self, op: str, **args: object) -> object:
        self.sent.append(op)
        return super().call(op, **args)


def _graph_of_three() -> list[Derivation]:
    script = "echo lib > $out; echo doc > $doc"
    lib = derivation("lib", "/bin/sh", ["-c", script], outputs=["out", "doc"])
    app = derivation("app", "/bin/sh", ["-c", f"cat {lib} {lib.outputs['doc']} > $out"])
    return [lib, app, derivation("all", "/bin/sh", ["-c", f"cat {app} > $out"])]


def test_a_batch_adds_every_derivation_in_one_request_at_the_paths_computed_here(
    daemon: DaemonProc,
) -> None:
    with CountingClient(daemon.socket) as client:
        batch = DaemonRecipeStore(client, daemon.store_dir, batch=True)
        with using(batch):
            made = _graph_of_three()
        paths = [d.path for d in made]
        # Nothing is in the store before the flush...
        assert client.call("is-valid", paths=paths) == []
        client.sent.clear()
        batch.flush()
        # ... and everything after it, from one request.
        assert client.sent == ["add-texts"]
        assert client.call("is-valid", paths=paths) == paths
        for d in made:
            assert Path(d.path).read_text() == d.drv.to_json()
        # Added one at a time, as before batches, the paths are the same.
        with using(DaemonRecipeStore(client, daemon.store_dir)):
            again = _graph_of_three()
        assert [d.path for d in again] == paths


def test_a_text_path_computed_here_is_the_one_the_store_gives(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "state")
    dep = store.add_text("dep", "a dependency").path
    for name, text, refs in (
        ("plain.txt", "hello\n", []),
        ("empty", "", []),
        ("unicode.drv.txt", "héllo wörld ✓", [dep]),
        ("padded", "x" * 8, [dep, dep]),
    ):
        added = store.add_text(name, text, refs).path
        assert text_path(store.store_dir, name, text.encode(), refs) == added


def test_a_refused_derivation_is_reported_at_the_recipe_line_that_made_it(
    daemon: DaemonProc, tmp_path: Path
) -> None:
    recipe = tmp_path / "bad.py"
    recipe.write_text(
        textwrap.dedent(
            """\
            from store.recipe import derivation
            first = derivation("first", "/bin/sh", ["-c", "echo > $out"])
            gone = first.out.rsplit("/", 1)[0] + "/" + "0" * 32 + "-gone"

            default = derivation("uses-gone", "/bin/sh", ["-c", f"cat {gone} > $out"])
            """
        )
    )
    env = {**os.environ, "WEFT_STATE_DIR": str(daemon.state)}
    out = subprocess.run(
        [BIN / "store-build", str(recipe)], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 1, out
    assert out.stderr.startswith(f"{recipe}:5: uses-gone.drv: "), out.stderr
    assert "0" * 32 + "-gone" in out.stderr and "is not a valid path" in out.stderr
    assert "Traceback" not in out.stderr
    # The derivations made before the refused one are added, as they were one by one.
    firsts = [p for p in os.listdir(daemon.store_dir) if p.endswith("-first.drv")]
    assert len(firsts) == 1
    # A mistake of the recipe after it: the refusal, made first, is the one reported.
    with recipe.open("a") as f:
        f.write("\n\nraise ValueError('later')\n")
    later = subprocess.run(
        [BIN / "store-build", str(recipe)], capture_output=True, text=True, env=env, timeout=120
    )
    assert later.returncode == 1 and later.stderr.startswith(f"{recipe}:5: uses-gone.drv: ")


def test_the_derivations_made_before_a_recipe_mistake_are_in_the_store(
    daemon: DaemonProc, tmp_path: Path
) -> None:
    recipe = tmp_path / "mistake.py"
    recipe.write_text(
        textwrap.dedent(
            """            from store.recipe import derivation
            made = derivation("made-first", "/bin/sh", ["-c", "echo > $out"])
            {}["missing"]
            """
        )
    )
    env = {**os.environ, "WEFT_STATE_DIR": str(daemon.state)}
    out = subprocess.run(
        [BIN / "store-build", str(recipe)], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 1 and out.stderr.startswith(f"{recipe}:3: KeyError: 'missing'")
    assert [p for p in os.listdir(daemon.store_dir) if p.endswith("-made-first.drv")]


def test_a_batch_with_a_bad_derivation_adds_nothing_of_it(daemon: DaemonProc) -> None:
    with BlockingClient(daemon.socket) as client:
        with using(DaemonRecipeStore(client, daemon.store_dir, batch=True)):
            good = derivation("good", "/bin/sh", ["-c", "echo > $out"])
        doc = json.loads(good.drv.to_json())
        doc["name"] = "forged"
        texts = [
            {"name": "good.drv", "text": good.drv.to_json(), "references": []},
            {"name": "forged.drv", "text": json.dumps(doc), "references": []},
        ]
        with pytest.raises(DaemonError) as refused:
            client.call("add-texts", texts=texts)
        assert "forged: output paths do not match" in refused.value.message
        assert client.call("is-valid", paths=[good.path]) == []


def test_a_required_path_that_is_not_valid_is_named_and_nothing_is_added(
    daemon: DaemonProc,
) -> None:
    gone = f"{daemon.store_dir}/{'0' * 32}-gone"
    with BlockingClient(daemon.socket) as client:
        reply = client.call(
            "add-texts", texts=[{"name": "t", "text": "x", "references": []}], require=[gone]
        )
        assert reply == {"not_valid": [gone]}
        assert client.call("is-valid", paths=[text_path(daemon.store_dir, "t", b"x", [])]) == []
        kept = client.call("add-texts", texts=[], require=[])
        assert kept == {"paths": []}


@pytest.mark.parametrize(
    "args",
    [
        {"texts": "not a list"},
        {"texts": [{"name": "t"}]},
        {"texts": [{"name": "t", "text": "x", "references": "not a list"}]},
        {"texts": [{"name": "", "text": "x"}]},
        {"texts": [], "require": "/nowhere"},
        {"texts": [{"name": "t", "text": "x"}] * 4097},
    ],
)
def test_add_texts_refuses_a_malformed_request(daemon: DaemonProc, args: dict) -> None:
    with BlockingClient(daemon.socket) as client:
        with pytest.raises(DaemonError) as refused:
            client.call("add-texts", **args)
        assert refused.value.code == "bad-request"


def test_a_required_path_outside_the_store_is_refused(daemon: DaemonProc) -> None:
    with BlockingClient(daemon.socket) as client:
        with pytest.raises(DaemonError) as refused:
            client.call("add-texts", texts=[], require=["/etc/passwd"])
        assert refused.value.code in ("bad-request", "invalid-path")


def test_the_busybox_tree_is_made_once_and_made_again_only_when_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    made: list[str] = []

    class Counting(LocalStore):
        def add_source(self, path: str, name: str) -> str:
            made.append(name)
            return super().add_source(path, name)

    def busybox_in(state: Path) -> str:
        store = Store.open(state)
        try:
            with using(Counting(store)):
                return busybox()
        finally:
            store.close()

    first = busybox_in(tmp_path / "state")
    assert made == ["busybox"] and os.path.isfile(f"{first}/bin/sh")
    assert busybox_in(tmp_path / "state") == first
    assert made == ["busybox"]  # remembered, and valid: not made again
    # A new store where the old one was: the remembered path is not valid there.
    shutil.rmtree(tmp_path / "state")
    assert busybox_in(tmp_path / "state") == first
    assert made == ["busybox", "busybox"] and os.path.isfile(f"{first}/bin/sh")
    # Another store has its own entry.
    other = busybox_in(tmp_path / "other")
    assert other.startswith(f"{tmp_path}/other/") and made == ["busybox"] * 3
    remembered = json.loads((tmp_path / "cache" / "weft" / recipebusybox.CACHE_FILE).read_text())
    assert sorted(remembered.values()) == sorted([first, other])
    # The tree was made once, in the cache, and added from there to both stores.
    (tree,) = (tmp_path / "cache" / "weft").glob(f"{recipebusybox.TREE_PREFIX}*")
    assert os.readlink(tree / "bin" / "sh") == "busybox"
    assert (tree / "bin" / "busybox").read_bytes() == Path("/bin/busybox").read_bytes()


def test_without_a_usable_cache_the_tree_is_made_each_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    first = busybox_of(tmp_path / "state")
    assert os.path.isfile(f"{first}/bin/busybox") and busybox_of(tmp_path / "state") == first
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert busybox_of(tmp_path / "state") == first


def busybox_of(state: Path) -> str:
    store = Store.open(state)
    try:
        with using(LocalStore(store)):
            return busybox()
    finally:
        store.close()


def test_a_remembered_path_that_is_not_a_store_path_is_not_believed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real = busybox_of(tmp_path / "state")
    cache = tmp_path / "cache" / "weft" / recipebusybox.CACHE_FILE
    forged = {k: "/etc" for k in json.loads(cache.read_text())}
    cache.write_text(json.dumps(forged))
    assert busybox_of(tmp_path / "state") == real
    cache.write_text("not json")
    assert busybox_of(tmp_path / "state") == real
    assert list(json.loads(cache.read_text()).values()) == [real]


def test_a_collected_busybox_and_derivations_are_added_again_and_built_again(
    builder_daemon: DaemonProc, tmp_path: Path
) -> None:
    d = builder_daemon
    recipe = tmp_path / "two.py"
    recipe.write_text(
        textwrap.dedent(
            """\
            from store.recipe import busybox, derivation
            bb = busybox()
            sh = f"{bb}/bin/busybox"
            base = derivation("base", sh, ["sh", "-c", "echo base > $out"])
            default = derivation("top", sh, ["sh", "-c", f"cat {base} > $out"])
            """
        )
    )
    env = {**os.environ, "WEFT_STATE_DIR": str(d.state), "XDG_CACHE_HOME": str(tmp_path)}

    def build() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [BIN / "store-build", str(recipe)], capture_output=True, text=True, env=env, timeout=120
        )

    first = build()
    assert first.returncode == 0, first.stderr
    (bb,) = json.loads((tmp_path / "weft" / recipebusybox.CACHE_FILE).read_text()).values()
    top = first.stdout.strip()
    assert Path(top).read_text() == "base\n"
    # Nothing roots any of it: a collection takes the outputs, the .drvs and the busybox.
    gc = subprocess.run([BIN / "store-gc"], capture_output=True, text=True, env=env, timeout=120)
    assert gc.returncode == 0, gc.stderr
    assert not os.path.exists(bb) and not os.path.exists(top)
    again = build()
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == top and Path(top).read_text() == "base\n"
    assert os.path.isfile(f"{bb}/bin/busybox")
    assert "2 derivations to build, 0 present" in again.stderr


def test_a_build_settles_what_is_present_and_builds_what_is_missing_below_it(
    graph: Graph, builder_daemon: DaemonProc
) -> None:
    base = graph.sh("base", "echo base > $out")
    middle = graph.sh("middle", f"cat {base} > $out; echo middle >> $out")
    side = graph.sh("side", "echo side > $out")
    top = graph.sh("top", f"cat {middle} {side} > $out")
    results = graph.build(top)
    assert [r["status"] for r in results] == ["built"]
    graph.close()  # its connection pinned what it added
    env = {**os.environ, "WEFT_STATE_DIR": str(builder_daemon.state)}
    gone = subprocess.run(
        [BIN / "store-gc", "--delete", middle.out], capture_output=True, text=True, env=env
    )
    assert gone.returncode == 0, gone.stderr
    with BlockingClient(builder_daemon.socket) as client:
        notes: list[str] = []
        client.on_log = lambda e: notes.append(e.message)
        drvs = [base, middle, side, top]
        results = client.call("build", drvs=[d.path for d in drvs])
        status = {r["drv"]: r["status"] for r in results}
        assert status == {
            base.path: "valid",
            middle.path: "built",
            side.path: "valid",
            top.path: "valid",
        }
        assert "1 derivations to build, 3 present" in notes
        assert Path(top.out).read_text() == "base\nmiddle\nside\n"
        # Nothing missing: every one valid, and the check still asks the store.
        again = client.call("build", drvs=[d.path for d in drvs])
        assert [r["status"] for r in again] == ["valid"] * 4

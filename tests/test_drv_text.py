"""The fast ways a recipe's derivations and the daemon's `add-texts` are written, hashed and
named give, byte for byte, what the general ones give: `.drv` texts as `json` writes their
documents, output paths as hashing those texts gives, hash parts as base 32 defines them,
text paths as an archive of the text names them, and remembered text paths as computed ones.
"""

import json
import os
import random
import tempfile
from pathlib import Path

import blake3
import pytest

from bench.daemons import DaemonProc
from daemon.cli.blocking import BlockingClient, DaemonError
from daemon.cli.recipestore import DaemonRecipeStore
from store import base32, nar
from store.buildenv import Action, BuildEnvironment
from store.derivation import Derivation, HashModulo, Output, finish, with_output_paths
from store.drvjson import document
from store.environment.view import from_mapping
from store.hashing import TextPaths, format_hash, hash_text, text_path
from store.paths import PathKind, make_store_path, store_path
from store.recipe import derivation, using
from store.store import Store

STORE = "/var/lib/weft/store"
# Strings JSON escapes, or writes as they are although they are not ASCII.
AWKWARD = ['say "hi"', "back\\slash", "tab\tnew\nline", "\x01\x1f", "é ü ☃ 𝄞", "", "</script>"]


def _path(rng: random.Random, name: str) -> str:
    return f"{STORE}/{''.join(rng.choices(base32.ALPHABET, k=32))}-{name}"


def _word(rng: random.Random) -> str:
    return rng.choice(AWKWARD) + "".join(rng.choices("abcXYZ019_-", k=rng.randrange(0, 12)))


def _derivation(rng: random.Random) -> Derivation:
    """A derivation with fields of every kind, in no order, optional fields or not."""
    names = rng.sample(["out", "dev", "lib", "doc", "bin"], rng.randrange(1, 4))
    fixed = names == ["out"] and rng.random() < 0.3
    outputs = {
        n: Output(_path(rng, f"x-{n}"), "blake3:" + "ab" * 32 if fixed else None) for n in names
    }
    inputs = {
        _path(rng, f"i{i}.drv"): tuple(rng.sample(["out", "dev", "lib"], 2)) for i in range(3)
    }
    extra = rng.random() < 0.5
    env_delta = from_mapping(
        {"CC": _word(rng), "OLD": None, "PATH": [("prepend", ["/a", _word(rng)])]}
    )
    action = Action("/bin/sh", ("-c", _word(rng)), 5.5 if rng.random() < 0.5 else None)
    return Derivation(
        name="thing",
        builder=_word(rng),
        outputs=outputs,
        args=tuple(_word(rng) for _ in range(rng.randrange(0, 5))),
        env={_word(rng) + str(i): _word(rng) for i in range(rng.randrange(0, 6))},
        input_drvs=dict(rng.sample(list(inputs.items()), rng.randrange(0, 4))),
        input_srcs=tuple(_path(rng, f"s{i}") for i in range(rng.randrange(0, 4))),
        system=rng.choice(["x86_64-linux", "aarch64-linux ☃"]),
        env_delta=env_delta if extra else from_mapping({}),
        environments=(BuildEnvironment("tools", {"A": _word(rng)}, enter=action),) if extra else (),
        durable_dirs={"cache": "/build/c", "ccache": "/build/cc"} if extra else {},
    )


def _encoded(drv: Derivation) -> str:
    """What `json` writes for the derivation's document: sorted keys, no spaces, UTF-8."""
    doc = document(drv, drv.outputs, drv.env, drv.input_drvs)
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def test_a_derivation_of_any_shape_is_written_as_json_writes_its_document() -> None:
    rng = random.Random(24)
    for _ in range(300):
        drv = _derivation(rng)
        assert drv.to_json() == _encoded(drv)
        assert Derivation.from_json(drv.to_json()).to_json() == drv.to_json()


def test_a_field_of_another_type_is_written_or_refused_as_json_does_it() -> None:
    out = {"out": Output("/s/x")}
    numbers = Derivation("odd", "/bin/sh", out, input_srcs=(5, 3), system=64)  # type: ignore[arg-type]
    assert numbers.to_json() == _encoded(numbers)
    assert '"inputSrcs":[3,5]' in numbers.to_json() and '"system":64' in numbers.to_json()
    numeric_key = Derivation("odd", "/bin/sh", out, env={1: "one"})  # type: ignore[dict-item]
    assert numeric_key.to_json() == _encoded(numeric_key)
    mixed = Derivation("odd", "/bin/sh", out, env={1: "a", "b": "c"})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        _encoded(mixed)
    with pytest.raises(TypeError):
        mixed.to_json()


def _reference_output_paths(drv: Derivation) -> dict[str, str]:
    """Output paths as they were first computed: the blank document through `json`."""
    blank = Derivation(
        drv.name, drv.builder, {k: Output() for k in drv.outputs}, drv.args,
        {**drv.env, **{k: "" for k in drv.outputs}}, {}, drv.input_srcs,
    )  # fmt: skip
    digest = blake3.blake3(_encoded(blank).encode()).hexdigest()
    names = {k: drv.name if k == "out" else f"{drv.name}-{k}" for k in drv.outputs}
    return {
        k: str(make_store_path(PathKind.OUTPUT, f"blake3:{digest}", STORE, name))
        for k, name in names.items()
    }


def test_output_paths_and_the_text_finish_writes_are_those_of_the_document() -> None:
    rng = random.Random(7)
    no_inputs = HashModulo(lambda path: pytest.fail(f"{path} looked up"))
    for i in range(100):
        args = tuple(_word(rng) for _ in range(3))
        env = {"B": _word(rng), "A": _word(rng)}
        outputs = {n: Output() for n in rng.sample(["out", "dev", "lib"], rng.randrange(1, 4))}
        srcs = (_path(rng, "src"),)
        drv = Derivation(f"d{i}", "/bin/sh", outputs, args, env, input_srcs=srcs)
        made, text = finish(drv, STORE, no_inputs)
        assert made == with_output_paths(drv, STORE, no_inputs)
        assert {k: o.path for k, o in made.outputs.items()} == _reference_output_paths(drv)
        assert text == made.to_json() == _encoded(made)


def _bitwise(digest: bytes) -> str:
    """Nix's base 32 by its definition: the digest as one little-endian number, printed
    5 bits at a time, most significant first."""
    value = int.from_bytes(digest, "little")
    n = base32.encoded_length(len(digest))
    return "".join(base32.ALPHABET[(value >> (5 * i)) & 31] for i in range(n - 1, -1, -1))


def test_hash_parts_and_digests_of_every_length_are_encoded_as_base_32_defines_them() -> None:
    for n in [*range(0, 41), 64]:
        for digest in (b"\0" * n, b"\xff" * n, *(os.urandom(n) for _ in range(40))):
            encoded = base32.encode(digest)
            assert encoded == _bitwise(digest)
            assert base32.decode(encoded, n) == digest


def test_a_text_is_hashed_and_named_as_its_archive_and_the_store_name_it(tmp_path: Path) -> None:
    for size in [*range(0, 20), 4095, 4096, 70_000]:
        data = os.urandom(size)
        file = tmp_path / f"f{size}"
        file.write_bytes(data)
        archive = b"".join(nar.dump(file))
        assert hash_text(data) == (format_hash(blake3.blake3(archive).digest()), len(archive))
        refs = [f"{STORE}/{'b' * 32}-y", f"{STORE}/{'a' * 32}-x", f"{STORE}/{'a' * 32}-x"]
        expected = make_store_path(PathKind.TEXT, hash_text(data)[0], STORE + "/", "t.drv", refs)
        assert text_path(STORE + "/", "t.drv", data, refs) == str(expected)
        assert store_path(PathKind.TEXT, hash_text(data)[0], STORE, "t.drv", refs) == str(expected)


def test_remembered_text_paths_are_the_computed_ones_and_the_oldest_are_forgotten() -> None:
    rng = random.Random(3)
    texts = [
        (f"t{i}.drv", _word(rng) * rng.randrange(1, 50), [_path(rng, "r")]) for i in range(300)
    ]
    known = TextPaths(STORE, max_bytes=20_000)
    for _ in range(2):
        for name, text, refs in texts:
            assert known.path(name, text, refs) == text_path(STORE, name, text.encode(), refs)
        # Copies, as a request decodes them anew: found by value.
        for name, text, refs in json.loads(json.dumps(texts)):
            assert known.path(name, text, refs) == text_path(STORE, name, text.encode(), refs)
    kept = known._paths
    assert 0 < known._bytes <= 20_000
    assert sum(len(n) + len(t) + sum(map(len, r)) for n, t, r in kept) == known._bytes
    assert list(kept)[-1][0] == "t299.drv"
    huge = "x" * 30_000
    assert known.path("huge.drv", huge, []) == text_path(STORE, "huge.drv", huge.encode(), [])
    assert ("huge.drv", huge, ()) not in kept


@pytest.mark.parametrize("parent", ["/tmp", "/var/tmp"])
def test_a_store_names_a_text_as_adding_it_does_and_remembers_the_name_itself(
    parent: str,
) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="weft-textpath-", dir=parent) as tmp,
        Store.open(Path(tmp) / "state") as store,
        Store.open(Path(tmp) / "other") as other,
    ):
        first = store.add_text("first.txt", "first", []).path
        texts = [("first.txt", "first", []), ("r.txt", f"see {first}", [first])]
        named = [store.text_path(name, text, refs) for name, text, refs in texts]
        assert named == [info.path for info in store.add_texts(texts)]
        assert store.text_path("first.txt", "first") == first
        assert ("first.txt", "first", ()) in store._text_paths._paths
        # Each store its own memory, of its own store dir's names.
        assert other._text_paths._paths == {}
        assert other.text_path("first.txt", "first") == other.add_text("first.txt", "first").path
        assert other.text_path("first.txt", "first") != first


def test_texts_sent_again_get_the_paths_they_got_and_a_refused_name_is_refused_again(
    daemon: DaemonProc,
) -> None:
    texts = [{"name": f"t{i}.txt", "text": f"text {i} ☃\n", "references": []} for i in range(3)]
    first_path = text_path(daemon.store_dir, "t0.txt", texts[0]["text"].encode(), [])
    texts.append({"name": "r.txt", "text": f"see {first_path}", "references": [first_path]})
    computed = [
        text_path(daemon.store_dir, t["name"], t["text"].encode(), t["references"]) for t in texts
    ]
    with BlockingClient(daemon.socket) as client:
        assert client.call("add-texts", texts=texts)["paths"] == computed
        assert client.call("add-texts", texts=texts)["paths"] == computed
        for _ in range(2):
            with pytest.raises(DaemonError, match="period"):
                client.call("add-texts", texts=[{"name": ".t", "text": "x", "references": []}])
        infos = client.call("path-info", path=computed[-1])
    assert [Path(p).read_text() for p in computed] == [t["text"] for t in texts]
    assert infos["references"] == [first_path]


class RecordingClient(BlockingClient):
    """A client that keeps each request's operation and how many texts it sent."""

    def __init__(self, sock: str) -> None:
        super().__init__(sock)
        self.sent: list[tuple[str, int]] = []

    def call(self, op: str, **args: object) -> object:
        self.sent.append((op, len(args.get("texts") or ())))  # type: ignore[arg-type]
        return super().call(op, **args)


def test_an_evaluation_that_reuses_a_path_sends_the_texts_only_when_some_are_not_valid(
    daemon: DaemonProc,
) -> None:
    # Remembered from an evaluation before, but not in this store: added again when asked.
    kept = text_path(daemon.store_dir, "kept", b"kept", [])
    with RecordingClient(daemon.socket) as client:
        added_again: list[str] = []

        def again() -> str:
            added_again.append(kept)
            return str(client.call("add-text", name="kept", text="kept", references=[])["path"])

        def evaluate(nonce: str) -> list[str]:
            client.sent.clear()
            recipes = DaemonRecipeStore(client, daemon.store_dir, batch=True)
            with recipes, using(recipes):
                assert recipes.reuse(kept, again) == kept
                made = [derivation(f"d{i}", "/bin/sh", ["-c", f": {nonce} {i}"]) for i in range(3)]
            return [d.path for d in made]

        paths = evaluate("first")
        # Asked first (no text), the reused path added again, then the texts sent.
        assert client.sent == [("add-texts", 0), ("add-text", 0), ("add-texts", 3)]
        assert client.call("is-valid", paths=[kept, *paths]) == [kept, *paths]
        assert evaluate("first") == paths
        assert client.sent == [("add-texts", 0)]  # all valid: nothing more
        assert evaluate("second") != paths
        assert client.sent == [("add-texts", 0), ("add-texts", 3)]
        assert added_again == [kept]

import os
import shutil
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from store import base32
from store.paths import InvalidPath, PathKind, StorePath, make_store_path, validate_name

H = "blake3:" + "ab" * 32


@given(st.binary(min_size=20, max_size=20))
def test_base32_round_trip(digest: bytes) -> None:
    text = base32.encode(digest)
    assert len(text) == 32
    assert base32.decode(text, 20) == digest


@pytest.mark.skipif(shutil.which("nix-hash") is None, reason="install.sh installs nix-bin")
def test_base32_matches_nix() -> None:
    digests = [os.urandom(20) for _ in range(20)] + [b"\0" * 20, b"\xff" * 20]
    for d in digests:
        nix = subprocess.run(
            ["nix-hash", "--type", "sha1", "--to-base32", d.hex()],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        assert base32.encode(d) == nix


def test_base32_decode_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="invalid base-32"):
        base32.decode("e" * 32, 20)
    with pytest.raises(ValueError, match="wrong length"):
        base32.decode("0" * 31, 20)


@pytest.mark.parametrize("name", ["hello", "hello-1.0", "a+b=c?d_e.f", "x" * 211, "A9"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name,why",
    [
        ("", "empty"),
        (".hidden", "period"),
        ("x" * 212, "longer"),
        ("a b", "' '"),
        ("a/b", "'/'"),
        ("caf\u00e9", "forbidden"),
        ("a:b", "':'"),
    ],
)
def test_invalid_names(name: str, why: str) -> None:
    with pytest.raises(InvalidPath, match=why):
        validate_name(name)


def test_same_inputs_same_path_and_each_field_matters() -> None:
    base = make_store_path(PathKind.SOURCE, H, "/s", "n", ["/s/" + "0" * 32 + "-r"])
    assert base == make_store_path(PathKind.SOURCE, H, "/s/", "n", ["/s/" + "0" * 32 + "-r"])
    variants = [
        make_store_path(PathKind.TEXT, H, "/s", "n", ["/s/" + "0" * 32 + "-r"]),
        make_store_path(
            PathKind.SOURCE, "blake3:" + "cd" * 32, "/s", "n", ["/s/" + "0" * 32 + "-r"]
        ),
        make_store_path(PathKind.SOURCE, H, "/other", "n", ["/s/" + "0" * 32 + "-r"]),
        make_store_path(PathKind.SOURCE, H, "/s", "m", ["/s/" + "0" * 32 + "-r"]),
        make_store_path(PathKind.SOURCE, H, "/s", "n", []),
    ]
    assert len({v.hash_part for v in variants} | {base.hash_part}) == 6


def test_reference_order_does_not_matter() -> None:
    a, b = "/s/" + "0" * 32 + "-a", "/s/" + "1" * 32 + "-b"
    assert make_store_path(PathKind.SOURCE, H, "/s", "n", [a, b]) == make_store_path(
        PathKind.SOURCE, H, "/s", "n", [b, a, a]
    )


def test_parse_store_path() -> None:
    p = make_store_path(PathKind.SOURCE, H, "/s", "name-1.0")
    assert StorePath.parse(str(p), "/s") == p
    with pytest.raises(InvalidPath, match="not in the store"):
        StorePath.parse("/elsewhere/x", "/s")
    with pytest.raises(InvalidPath, match="not a store path"):
        StorePath.parse("/s/short-name", "/s")

"""Hostile and malformed archives are refused with a clear error, and nothing lands."""

import io
import os
from pathlib import Path

import pytest

from store import Store, nar
from store.nar import NarError
from store.nar import encode_str as s


def regular(data: bytes = b"x", executable: bool = False) -> bytes:
    return nar.file_header(executable, len(data)) + data + nar.file_trailer(len(data))


def symlink(target: bytes) -> bytes:
    return s(b"(") + s(b"type") + s(b"symlink") + s(b"target") + s(target) + s(b")")


def directory(*entries: tuple[bytes, bytes]) -> bytes:
    body = b"".join(
        s(b"entry") + s(b"(") + s(b"name") + s(name) + s(b"node") + node + s(b")")
        for name, node in entries
    )
    return s(b"(") + s(b"type") + s(b"directory") + body + s(b")")


def archive(node: bytes) -> bytes:
    return nar.HEADER + node


def nested(depth: int) -> bytes:
    node = regular()
    for _ in range(depth):
        node = directory((b"d", node))
    return node


CASES = {
    "unsorted entries": (archive(directory((b"b", regular()), (b"a", regular()))), "unsorted"),
    "duplicate entries": (archive(directory((b"a", regular()), (b"a", regular()))), "duplicate"),
    "empty name": (archive(directory((b"", regular()))), "empty entry name"),
    "dot name": (archive(directory((b".", regular()))), "not allowed"),
    "dotdot name": (archive(directory((b"..", regular()))), "not allowed"),
    "slash in name": (archive(directory((b"a/b", regular()))), "'/' or NUL"),
    "nul in name": (archive(directory((b"a\0b", regular()))), "'/' or NUL"),
    "name over 255 bytes": (archive(directory((b"n" * 256, regular()))), "exceeds the limit"),
    "empty symlink target": (archive(symlink(b"")), "empty symlink target"),
    "nul in symlink target": (archive(symlink(b"a\0b")), "contains NUL"),
    "nesting too deep": (archive(nested(nar.MAX_DEPTH + 1)), "nesting deeper"),
    "content past end of stream": (archive(nar.file_header(False, 1000) + b"short"), "truncated"),
    "absurd length": (archive(nar.file_header(False, 1 << 63) + b"\0" * 64), "absurd file length"),
    "huge string length": (
        nar.HEADER + (1 << 63).to_bytes(8, "little") + b"(",
        "exceeds the limit",
    ),
    "trailing garbage": (archive(regular()) + b"garbage!", "trailing garbage"),
    "truncated archive": (archive(regular())[:-8], "truncated"),
    "unknown tag in file": (
        archive(s(b"(") + s(b"type") + s(b"regular") + s(b"mode") + s(b"")),
        "expected 'contents'",
    ),
    "unknown tag in directory": (
        archive(s(b"(") + s(b"type") + s(b"directory") + s(b"entri") + s(b")")),
        "expected 'entry'",
    ),
    "fifo node": (archive(s(b"(") + s(b"type") + s(b"fifo") + s(b")")), "unknown node type"),
    "device node": (
        archive(s(b"(") + s(b"type") + s(b"chardevice") + s(b")")),
        "unknown node type",
    ),
    "bad magic": (s(b"nix-archive-2") + regular(), "bad magic"),
    "non-zero padding": (
        archive(nar.file_header(False, 1) + b"x" + b"\1" * 7 + s(b")")),
        "non-zero padding",
    ),
    "executable marker not empty": (
        archive(s(b"(") + s(b"type") + s(b"regular") + s(b"executable") + s(b"yes")),
        "exceeds the limit",
    ),
    "empty stream": (b"", "truncated"),
}


def store_contents(store: Store) -> tuple[list[str], list[str], int]:
    entries = sorted(os.listdir(store.store_dir))
    tmp = sorted(os.listdir(store.tmp.path))
    with store.db.connection() as conn:
        rows = conn.execute("SELECT count(*) FROM ValidPaths").fetchone()[0]
    return entries, tmp, rows


@pytest.mark.parametrize("case", sorted(CASES))
def test_rejected_and_nothing_lands(store: Store, case: str) -> None:
    data, message = CASES[case]
    kept = store.add_text("kept", "already here")
    before = store_contents(store)
    with pytest.raises(NarError, match=message):
        store.add_nar(io.BytesIO(data).read, "hostile")
    assert store_contents(store) == before
    assert store.verify().ok
    assert store.is_valid(kept.path)


def test_nesting_at_the_limit_is_accepted(tmp_path: Path) -> None:
    nar.restore(io.BytesIO(archive(nested(nar.MAX_DEPTH))).read, tmp_path / "deep")
    assert (tmp_path / "deep" / "d").is_dir()


def test_error_names_the_entry(tmp_path: Path) -> None:
    data = archive(directory((b"sub", directory((b"b", regular()), (b"a", regular())))))
    with pytest.raises(NarError, match="'/sub/a'"):
        nar.restore(io.BytesIO(data).read, tmp_path / "x")


def test_restore_stays_below_its_destination(tmp_path: Path) -> None:
    # A symlink followed by an entry of the same name cannot be used to write through it:
    # the duplicate is refused before the second entry is opened.
    target = tmp_path / "outside"
    target.mkdir()
    data = archive(
        directory((b"l", symlink(str(target).encode())), (b"l", directory((b"f", regular()))))
    )
    with pytest.raises(NarError, match="duplicate"):
        nar.restore(io.BytesIO(data).read, tmp_path / "dest")
    assert list(target.iterdir()) == []

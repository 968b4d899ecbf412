import os
from pathlib import Path

from store import base32
from store.refscan import ReferenceScanner, scan_path


def hashes(n: int) -> list[str]:
    return [base32.encode(os.urandom(20)) for _ in range(n)]


def test_hash_inside_binary_data_is_found_and_absent_ones_are_not(tmp_path: Path) -> None:
    present, absent, in_name, in_link = hashes(4)
    out = tmp_path / "out"
    (out / "lib").mkdir(parents=True)
    blob = os.urandom(3 << 20) + b"\0\xff/store/" + present.encode() + b"-dep\0" + os.urandom(999)
    (out / "lib" / "blob.bin").write_bytes(blob)
    (out / f"named-{in_name}").write_text("x")
    (out / "link").symlink_to(f"/store/{in_link}-thing")
    assert scan_path(out, [present, absent, in_name, in_link]) == {present, in_name, in_link}


def test_hash_split_across_chunks_and_in_long_runs() -> None:
    wanted, other = hashes(2)
    data = os.urandom(100) + b"zzzz" + wanted.encode() + b"qqqq" + os.urandom(100)
    for cut in range(len(data)):
        s = ReferenceScanner([wanted, other])
        s.feed(data[:cut])
        s.feed(data[cut:])
        assert s.result() == {wanted}, cut
    s = ReferenceScanner([wanted])
    for byte in data:
        s.feed(bytes([byte]))
    assert s.result() == {wanted}


def test_near_misses_are_not_references() -> None:
    (wanted,) = hashes(1)
    s = ReferenceScanner([wanted])
    s.feed(wanted[:-1].encode() + b"e" + wanted[:31].encode())
    assert s.result() == set()

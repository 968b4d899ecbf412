"""Our archives are Nix's archives: byte-identical dumps, and restores both ways."""

import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from store import nar
from tests.conftest import tree_listing

NIX_STORE = shutil.which("nix-store")
pytestmark = pytest.mark.skipif(NIX_STORE is None, reason="install.sh installs nix-bin")


def nix_dump(path: Path) -> bytes:
    return subprocess.run([NIX_STORE, "--dump", str(path)], check=True, capture_output=True).stdout


def our_dump(path: Path) -> bytes:
    return b"".join(nar.dump(path))


def test_dump_is_byte_identical_to_nix(varied_tree: Path) -> None:
    ours = our_dump(varied_tree)
    assert ours == nix_dump(varied_tree)
    assert b"raw-\xff-dir" in ours


@pytest.mark.parametrize("kind", ["file", "executable", "symlink", "empty-file"])
def test_single_node_dumps_match_nix(tmp_path: Path, kind: str) -> None:
    p = tmp_path / "node"
    if kind == "symlink":
        p.symlink_to("somewhere")
    else:
        p.write_bytes(b"" if kind == "empty-file" else b"contents that need padding")
        if kind == "executable":
            p.chmod(0o755)
    assert our_dump(p) == nix_dump(p)


def test_nix_restores_our_archive(varied_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "restored-by-nix"
    subprocess.run([NIX_STORE, "--restore", str(out)], input=our_dump(varied_tree), check=True)
    assert tree_listing(out) == tree_listing(varied_tree)


def test_we_restore_nix_archive(varied_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "restored-by-us"
    archive = nix_dump(varied_tree)
    assert nar.restore(io.BytesIO(archive).read, out) == len(archive)
    assert tree_listing(out) == tree_listing(varied_tree)
    # Restored trees are canonical.
    for dirpath, dirnames, filenames in os.walk(out):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            assert st.st_mtime == 1
            if not os.path.islink(os.path.join(dirpath, name)):
                assert st.st_mode & 0o7777 in (0o444, 0o555)


def test_dump_streams_a_huge_file_in_bounded_memory(tmp_path: Path) -> None:
    # A sparse 2 GiB file is cheap on disk; the dump must never hold it whole.
    big = tmp_path / "huge"
    with big.open("wb") as f:
        f.truncate(2 << 30)
    # VmHWM, the process's own peak: ru_maxrss would count the test process's, inherited
    # through vfork and exec.
    script = f"""
import sys
from store import nar
before = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
total = 0
for chunk in nar.dump({str(big)!r}):
    total += len(chunk)
grown = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) - before
print(total, grown)
"""
    out = subprocess.run(
        [os.sys.executable, "-c", script],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
    ).stdout.split()
    total, grown_kib = int(out[0]), int(out[1])
    framing = len(nar.HEADER + nar.file_header(False, 0) + nar.file_trailer(0))
    assert total == (2 << 30) + framing
    assert grown_kib < 64 * 1024

import contextlib
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from bench.daemons import processes_naming
from store import Store

pytest_plugins = ["tests.daemon_fixtures", "tests.cmdserver_fixtures"]


# Made when pytest configures, not when this module is imported: test modules import it
# again (`from tests.conftest import ...`), and each import would make another.
_RUNTIME = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """The command servers the store-* commands start (cmdserver/) live in a runtime dir of
    the test run's own, set before any test module copies the environment: no server of
    the user's serves the tests, and `pytest_unconfigure` stops the run's own."""
    runtime = tempfile.mkdtemp(prefix="weft-tests-run-")
    config.stash[_RUNTIME] = runtime
    os.environ["XDG_RUNTIME_DIR"] = runtime


def pytest_unconfigure(config: pytest.Config) -> None:
    runtime = config.stash.get(_RUNTIME, None)
    if runtime is None:
        return
    for pid in processes_naming(runtime):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture
def store(tmp_path: Path):
    s = Store.open(tmp_path / "state")
    yield s
    s.close()


def make_varied_tree(root: Path, large_size: int = 3 << 20) -> Path:
    """A tree with every kind of entry the archive format knows, and awkward names."""
    root.mkdir()
    (root / "empty-file").write_bytes(b"")
    (root / "empty-dir").mkdir()
    (root / "text").write_text("hello\n")
    (root / "seven").write_bytes(b"1234567")
    script = root / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    (root / "link-rel").symlink_to("text")
    (root / "link-abs").symlink_to("/nonexistent/target")
    (root / "link-dir").symlink_to("empty-dir")
    sub = root / "sub" / "deeper" / "deepest"
    sub.mkdir(parents=True)
    (sub / "leaf").write_bytes(os.urandom(100))
    # Unicode names; and names whose byte order differs from their code-point order once
    # decoded with surrogate escapes (b"\xff" sorts last as bytes, first-ish as str).
    (root / "caf\u00e9").write_text("unicode")
    (root / "\U0001f600-smile").write_text("emoji")
    (root / "Upper").write_text("U")
    (root / "lower").write_text("l")
    os.mkdir(os.path.join(os.fsencode(root), b"raw-\xff-dir"))
    with open(os.path.join(os.fsencode(root), b"raw-\xfe"), "wb") as f:
        f.write(b"raw")
    with open(os.path.join(os.fsencode(root), b"raw-\xff-dir", b"x"), "wb") as f:
        f.write(b"x")
    big = root / "large.bin"
    with big.open("wb") as f:
        block = os.urandom(1 << 16)
        for _ in range(large_size // len(block)):
            f.write(block)
        f.write(b"tail")
    return root


@pytest.fixture
def varied_tree(tmp_path: Path) -> Path:
    return make_varied_tree(tmp_path / "tree")


def tree_listing(root: Path) -> dict[bytes, tuple]:
    """What the archive format preserves of a tree: types, executable bits, contents."""
    out: dict[bytes, tuple] = {}
    rb = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(rb):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, rb)
            st = os.lstat(full)
            if os.path.islink(full):
                out[rel] = ("link", os.readlink(full))
            elif os.path.isdir(full):
                out[rel] = ("dir",)
            else:
                with open(full, "rb") as f:
                    out[rel] = ("file", bool(st.st_mode & 0o100), f.read())
    return out

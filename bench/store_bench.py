"""Store core: add throughput beside physical references and Nix, and query speed."""

import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import blake3

from bench.measure import Alternating, scratch
from store import Store
from store.tmparea import remove_tree

LARGE_MIB = 512
SMALL_FILES = 2000
SMALL_SIZE = 4096
CHAIN = 10_000
ROUNDS = 3

Row = tuple[str, str, str]


def _nix_store() -> str | None:
    return shutil.which("nix-store")


def _nix(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "NIX_REMOTE"}
    return subprocess.run(
        ["nix-store", *args], check=True, capture_output=True, text=True, env=env
    ).stdout.strip()


def _hash_and_copy(src: Path, dst: Path) -> None:
    """The physical reference: read, BLAKE3 and write the same bytes, nothing else."""
    hasher = blake3.blake3()
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    with open(src, "rb", buffering=0) as i, open(dst, "wb", buffering=0) as o:
        while n := i.readinto(buf):
            hasher.update(view[:n])
            o.write(view[:n])


class _Contenders:
    """Each contender writes into `work`; cleanup empties it between runs."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.nix_paths: list[str] = []

    def weft(self, src: Path) -> Callable[[], object]:
        def run() -> None:
            with Store.open(self.work / "weft") as store:
                store.add_path(src)

        return run

    def cp(self, src: Path, recursive: bool) -> Callable[[], object]:
        flags = ["-r"] if recursive else []
        return lambda: subprocess.run(["cp", *flags, str(src), str(self.work / "cp")], check=True)

    def nix(self, src: Path) -> Callable[[], object]:
        return lambda: self.nix_paths.append(_nix("--add", str(src)))

    def cleanup(self) -> None:
        for entry in self.work.iterdir():
            remove_tree(entry)
        if self.nix_paths:
            _nix("--delete", *self.nix_paths)
            self.nix_paths.clear()


def bench_large_add(tmp: Path) -> list[Row]:
    src = tmp / "large.bin"
    block = os.urandom(4 << 20)
    with src.open("wb") as f:
        for _ in range(LARGE_MIB // 4):
            f.write(block)
    work = tmp / "out"
    work.mkdir()
    c = _Contenders(work)
    contenders: dict[str, Callable[[], object]] = {
        "read+blake3+write": lambda: _hash_and_copy(src, work / "ref"),
        "weft add": c.weft(src),
        "cp": c.cp(src, recursive=False),
    }
    if _nix_store():
        contenders["nix-store --add"] = c.nix(src)
    alt = Alternating()
    alt.run(ROUNDS, contenders, c.cleanup)
    src.unlink()
    rows = [
        (
            f"add {LARGE_MIB} MiB file: {name}",
            f"{LARGE_MIB / alt.median(name):,.0f} MB/s",
            f"{alt.ratio(name, 'weft add'):.2f}x weft's time",
        )
        for name in contenders
    ]
    rows.append(
        (
            "add large: weft / read+blake3+write",
            f"{alt.ratio('weft add', 'read+blake3+write'):.2f}",
            "target <= 1.5",
        )
    )
    return rows


def bench_small_add(tmp: Path) -> list[Row]:
    src = tmp / "small"
    src.mkdir()
    for i in range(SMALL_FILES):
        (src / f"f{i:04d}").write_bytes(os.urandom(SMALL_SIZE))
    work = tmp / "out-small"
    work.mkdir()
    c = _Contenders(work)
    contenders: dict[str, Callable[[], object]] = {
        "cp -r": c.cp(src, recursive=True),
        "weft add": c.weft(src),
    }
    if _nix_store():
        contenders["nix-store --add"] = c.nix(src)
    alt = Alternating()
    alt.run(ROUNDS + 2, contenders, c.cleanup)
    rows = [
        (
            f"add {SMALL_FILES} files of 4 KiB: {name}",
            f"{SMALL_FILES / alt.median(name):,.0f} files/s",
            f"{alt.ratio(name, 'weft add'):.2f}x weft's time",
        )
        for name in contenders
    ]
    rows.append(
        ("add small: weft / cp -r", f"{alt.ratio('weft add', 'cp -r'):.2f}", "target <= 1.3")
    )
    return rows


def bench_queries(tmp: Path) -> list[Row]:
    with Store.open(tmp / "chain") as store:
        prev: list[str] = []
        t = time.perf_counter()
        for i in range(CHAIN):
            prev = [store.add_text(f"link{i}", str(i), prev).path]
        build = time.perf_counter() - t
        head = prev[0]
        times = []
        for _ in range(5):
            t = time.perf_counter()
            closure = store.closure([head])
            times.append(time.perf_counter() - t)
        assert len(closure) == CHAIN
        n = 20_000
        t = time.perf_counter()
        for i in range(n):
            store.path_info(closure[i % CHAIN])
        lookups = n / (time.perf_counter() - t)
    return [
        (
            f"add_text x {CHAIN} (chain, one transaction pair each)",
            f"{CHAIN / build:,.0f} paths/s",
            "",
        ),
        (
            f"closure of a {CHAIN:,}-path chain",
            f"{statistics.median(times) * 1000:.0f} ms",
            "median of 5",
        ),
        ("path-info lookups in-process", f"{lookups:,.0f} /s", "one thread"),
    ]


def run() -> list[Row]:
    with scratch("weft-bench-") as d:
        tmp = Path(d)
        rows = bench_large_add(tmp) + bench_small_add(tmp) + bench_queries(tmp)
    return rows


if __name__ == "__main__":
    for row in run():
        print(" | ".join(row), file=sys.stdout)

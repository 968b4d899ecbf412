"""Adding one large file, side by side with the machine and with Nix (issue 24's last row).

Three contenders add a 512 MiB file of fresh content (a new file each time, so no store
has it yet), in alternated order, round after round:
- weft: the whole `store-add FILE` command against a daemon of this run;
- the physical reference: what the job needs at the least, in this process:
  `copy_file_range` of the file into a new one, then a BLAKE3 of the file with BLAKE3's
  own threads (one per CPU) over a mapping of it;
- Nix: the whole `nix-store --add FILE` against a nix-daemon of this run.
The disk of this VM changes speed tenfold for minutes, so each round's weft/reference
ratio is reported, and their median: only figures taken side by side mean anything.
"""

import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import blake3

from bench.daemons import start_daemon, stop_daemon
from bench.measure import Alternating, scratch
from bench.nixdaemon import Nix, NixUnavailable, scratch_nix

Row = tuple[str, str, str]
SIZE_MIB = 512
ROUNDS = 5
GOAL = 1.2  # weft's time over the reference's, at most
STORE_ADD = str(Path(sys.executable).parent / "store-add")
# Bytes that make each copy's content new: a head of its own before the shared body.
_HEAD = 32


def _make_body(path: Path) -> None:
    with path.open("wb") as f:
        for _ in range(SIZE_MIB // 4):
            f.write(os.urandom(4 << 20))


def _fresh(body: Path, dest: Path) -> Path:
    """A file of content no store has seen: a random head, then the body."""
    with body.open("rb") as src, dest.open("wb") as out:
        out.write(os.urandom(_HEAD))
        left = os.fstat(src.fileno()).st_size
        while left:
            left -= os.copy_file_range(src.fileno(), out.fileno(), left)
    return dest


def _reference(src: Path, dest: Path) -> None:
    """The least the job takes: the kernel's copy, and a threaded BLAKE3 of the bytes."""
    with src.open("rb") as i, dest.open("wb") as o:
        left = os.fstat(i.fileno()).st_size
        while left:
            left -= os.copy_file_range(i.fileno(), o.fileno(), left)
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    hasher.update_mmap(src)
    hasher.digest()


class _Contenders:
    """The three commands, each on the fresh file `src`; `next`, after each run, makes the
    next fresh file, off the clock.  Nothing is deleted before the end: this disk is
    mounted with `discard`, and the trims of one run's deletions would land in the next
    run's time."""

    def __init__(self, work: Path, body: Path, socket: str, nix: Nix | None) -> None:
        self.work, self.body, self.socket, self.nix = work, body, socket, nix
        self.runs = 0
        self.src = _fresh(body, work / "large-0.bin")
        self.nix_paths: list[str] = []

    def table(self) -> dict[str, Callable[[], object]]:
        found: dict[str, Callable[[], object]] = {"weft": self.weft, "reference": self.reference}
        if self.nix is not None:
            found["nix"] = self.nix_add
        return found

    def weft(self) -> None:
        command = [STORE_ADD, "--socket", self.socket, str(self.src)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)

    def reference(self) -> None:
        _reference(self.src, self.work / f"ref-{self.runs}.bin")

    def nix_add(self) -> None:
        assert self.nix is not None
        self.nix_paths.append(self.nix("nix-store", "--add", str(self.src)).stdout.strip())

    def next(self) -> None:
        self.runs += 1
        self.src = _fresh(self.body, self.work / f"large-{self.runs}.bin")

    def remove_nix_paths(self) -> None:
        """Nix's copies, from the machine's store; weft's and the rest go with `work`."""
        if self.nix is not None and self.nix_paths:
            self.nix("nix-store", "--delete", *self.nix_paths)


def _measure(work: Path, nix: Nix | None) -> Alternating:
    body = work / "body.bin"
    _make_body(body)
    d = start_daemon(work / "weft-state")
    try:
        c = _Contenders(work, body, d.socket, nix)
        alt = Alternating()
        try:
            alt.run(ROUNDS, c.table(), c.next)
        finally:
            c.remove_nix_paths()
    finally:
        stop_daemon(d)
    return alt


def _rows(alt: Alternating, no_nix: str = "") -> list[Row]:
    weft, ref = alt.times["weft"], alt.times["reference"]
    nix = alt.times.get("nix")
    ratios = [w / r for w, r in zip(weft, ref, strict=True)]
    rows: list[Row] = []
    for i, (w, r) in enumerate(zip(weft, ref, strict=True)):
        theirs = f", Nix {nix[i]:.3f} s" if nix else ""
        rows.append(
            (
                f"add {SIZE_MIB} MiB file, round {i + 1}",
                f"weft {w:.3f} s, reference {r:.3f} s{theirs}",
                f"weft/reference {w / r:.2f}",
            )
        )
    met = sum(r <= GOAL for r in ratios)
    versus = (
        f"Nix {statistics.median(nix):.3f} s, Nix/weft {alt.ratio('nix', 'weft'):.2f}"
        if nix
        else f"Nix unavailable ({no_nix})"
    )
    rows.append(
        (
            f"add a {SIZE_MIB} MiB file (fresh content), whole `store-add`",
            f"weft {statistics.median(weft):.3f} s ({SIZE_MIB / statistics.median(weft):,.0f}"
            f" MiB/s), reference {statistics.median(ref):.3f} s; {versus}; medians of {ROUNDS}",
            f"weft/reference {statistics.median(ratios):.2f} (rounds: "
            f"{', '.join(f'{r:.2f}' for r in ratios)}); goal <= {GOAL}, met in {met}/{ROUNDS}",
        )
    )
    return rows


def run() -> list[Row]:
    with scratch("weft-bench-") as tmp:
        work = Path(tmp)
        try:
            with scratch_nix(work) as nix:
                return _rows(_measure(work, nix))
        except NixUnavailable as e:
            return _rows(_measure(work, None), str(e))


if __name__ == "__main__":
    for row in run():
        print(" | ".join(row))

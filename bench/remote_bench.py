"""Remote builds through a REAPI engine (BuildGrid) against local ones, on this machine.

A one-machine farm (`contrib/remote/farm`: PostgreSQL, `bgd` on a Unix socket, two
`store-worker`s) serves a daemon whose `weft.toml` sends every build to it; another daemon
builds the same recipe locally with `-j2`.  Both have the machine's two cores, so the
remote graph cannot be faster: what it shows is what offloading costs.  Rounds alternate
the two, each with a fresh nonce (nothing cached, nothing shared), and the ratios of each
round are reported: this VM's disk changes speed tenfold for minutes.

- 40 builds of about a second of CPU each, whole `store-build -j2`, local against remote;
- the overhead of one remote build: a chain of trivial builds (each waits for the one
  before), per build, remote minus local;
- uploading a closure of 100 MB (fresh random files) to the engine's CAS, in MB/s, and the
  same closure again, when FindMissingBlobs finds nothing missing.
"""

import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.daemons import DaemonProc, start_daemon, stop_daemon, store_command
from bench.measure import scratch

Row = tuple[str, str, str]
ROUNDS = 3
HEAVY = 40
CHAIN = 20
JOBS = 2
WORKERS = 2
# About one second of CPU of busybox's sh on this VM (0.65 s of user time for 200,000).
LOOPS = 300_000
UPLOAD_MB = 100
UPLOAD_FILES = 25  # 4 MB each: over the batch limit, so through ByteStream, as large inputs go
REPO = Path(__file__).resolve().parent.parent
FARM = [sys.executable, str(REPO / "contrib" / "remote" / "farm.py")]

HEAVY_RECIPE = """\
from store.recipe import busybox, derivation

sh = f"{{busybox()}}/bin/busybox"
loop = 'i=0; while [ $i -lt {loops} ]; do i=$((i+1)); done'
parts = [
    derivation(f"heavy{{i}}", sh, ["sh", "-c", f"{{loop}}; echo {nonce} {{i}} > $out"])
    for i in range({n})
]
default = derivation("heavy", sh, ["sh", "-c", "cat " + " ".join(map(str, parts)) + " > $out"])
"""

CHAIN_RECIPE = """\
from store.recipe import busybox, derivation

sh = f"{{busybox()}}/bin/busybox"
last = derivation("link0", sh, ["sh", "-c", "echo {nonce} > $out"])
for i in range(1, {n}):
    last = derivation(f"link{{i}}", sh, ["sh", "-c", f"cat {{last}} > $out; echo {{i}} >> $out"])
default = last
"""


def _timed(command: list[str]) -> float:
    t = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    took = time.perf_counter() - t
    assert done.returncode == 0, done.stderr[-3000:]
    return took


@contextmanager
def _farm(work: Path, state: Path) -> Iterator[str]:
    """A farm whose workers serve the store dir of `state`; its endpoint."""
    farm_dir = work / "farm"
    start = [*FARM, "start", str(farm_dir), "--workers", str(WORKERS), "--store-dir"]
    done = subprocess.run([*start, str(state / "store")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    try:
        yield done.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([*FARM, "stop", str(farm_dir)], capture_output=True)


def _daemon(state: Path, settings: str) -> DaemonProc:
    state.mkdir(parents=True, exist_ok=True)
    (state / "weft.toml").write_text(settings)
    return start_daemon(state)


def _build(d: DaemonProc, recipe: Path) -> float:
    return _timed(
        [*store_command("store-build"), "--socket", d.socket, "-j", str(JOBS), str(recipe)]
    )


def _recipe(work: Path, template: str, **values: object) -> Path:
    path = work / f"recipe-{uuid.uuid4().hex[:8]}.py"
    path.write_text(template.format(nonce=uuid.uuid4().hex, **values))
    return path


def _rounds(work: Path, local: DaemonProc, remote: DaemonProc) -> tuple[list[Row], list[float]]:
    heavy: list[tuple[float, float]] = []
    chain: list[tuple[float, float]] = []
    for r in range(ROUNDS):
        # Each contender its own fresh recipe: nothing in common, not even in the CAS.
        pairs = [(local, "l"), (remote, "r")] if r % 2 == 0 else [(remote, "r"), (local, "l")]
        times: dict[str, tuple[float, float]] = {}
        for d, key in pairs:
            h = _build(d, _recipe(work, HEAVY_RECIPE, loops=LOOPS, n=HEAVY))
            c = _build(d, _recipe(work, CHAIN_RECIPE, n=CHAIN))
            times[key] = (h, c)
        heavy.append((times["l"][0], times["r"][0]))
        chain.append((times["l"][1], times["r"][1]))
    ratios = [rt / lt for lt, rt in heavy]
    overheads = [(rt - lt) / CHAIN * 1000 for lt, rt in chain]
    rows: list[Row] = [
        (
            f"{HEAVY} builds of about 1 s of CPU each, whole `store-build -j{JOBS}`",
            f"remote/local {statistics.median(ratios):.2f}x; medians of {ROUNDS} rounds "
            f"(local {statistics.median(lt for lt, _ in heavy):.1f} s, "
            f"remote {statistics.median(rt for _, rt in heavy):.1f} s)",
            f"{WORKERS} workers on the same 2 cores; rounds: "
            + ", ".join(f"{x:.2f}" for x in ratios),
        ),
        (
            f"overhead of a remote build (a chain of {CHAIN} trivial builds)",
            f"{statistics.median(overheads):.0f} ms a build over a local one",
            "rounds: "
            + ", ".join(f"{x:.0f}" for x in overheads)
            + f"; local {statistics.median(lt for lt, _ in chain) / CHAIN * 1000:.0f} ms a build",
        ),
    ]
    return rows, ratios


def _upload(endpoint: str, work: Path) -> Row:
    """A closure of fresh files uploaded to the CAS, then again."""
    from remote.cas import Cas
    from remote.channel import open_channel
    from remote.digests import Blobs, node_of

    src = work / "upload"
    src.mkdir()
    size = UPLOAD_MB * 1_000_000 // UPLOAD_FILES
    for i in range(UPLOAD_FILES):
        (src / f"f{i}").write_bytes(os.urandom(size))
    channel = open_channel(endpoint)
    try:
        cas = Cas(channel)
        blobs = Blobs()
        t = time.perf_counter()
        node_of(str(src), blobs)
        hashed = time.perf_counter() - t
        t = time.perf_counter()
        first = cas.upload(blobs)
        sent = time.perf_counter() - t
        t = time.perf_counter()
        again = cas.upload(blobs)
        second = time.perf_counter() - t
    finally:
        channel.close()
    return (
        f"upload a {UPLOAD_MB} MB closure ({UPLOAD_FILES} files) to the engine's CAS",
        f"{first.bytes / sent / 1e6:.0f} MB/s ({sent:.2f} s); again: {second * 1000:.0f} ms, "
        f"{again.blobs} blobs sent",
        f"hashing it first: {UPLOAD_MB / hashed:.0f} MB/s; the CAS is bgd's disk CAS",
    )


def run() -> list[Row]:
    with scratch("weft-remote-bench-") as tmp:
        work = Path(tmp)
        local_state, remote_state = work / "local", work / "remote"
        with _farm(work, remote_state) as endpoint:
            settings = f'remote-endpoint = "{endpoint}"\nremote-policy = "all"\n'
            local = _daemon(local_state, f"max-jobs = {JOBS}\n")
            remote = _daemon(remote_state, settings + f"remote-max-jobs = {WORKERS}\n")
            try:
                rows, _ = _rounds(work, local, remote)
                rows.append(_upload(endpoint, work))
            finally:
                stop_daemon(local)
                stop_daemon(remote)
    return rows

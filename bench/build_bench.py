"""Builds side by side with nix-daemon (sandbox on, same machine, same run), busybox as the
builder: 200 independent trivial derivations, and a chain of 50.  Also reference scanning.

The Nix column needs Debian's nix-bin (install.sh installs it); this bench starts its own
nix-daemon with a scratch configuration, and says so when it cannot.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from bench.measure import settle
from daemon.blocking import BlockingClient
from daemon.build_command import DaemonRecipeStore
from store import base32
from store.recipe import busybox, derivation, using
from store.refscan import ReferenceScanner
from tests.daemon_fixtures import start_daemon, stop_daemon

Row = tuple[str, str, str]
INDEPENDENT = 200
CHAIN = 50
JOBS = 2
NIX_CONF = """build-users-group = nixbld
sandbox = true
sandbox-fallback = false
max-jobs = 2
substituters =
experimental-features = nix-command
"""


def _weft(work: Path, nonce: str) -> tuple[float, float]:
    d = start_daemon(work / "weft-state")
    try:
        with BlockingClient(d.socket) as client, using(DaemonRecipeStore(client, d.store_dir)):
            bb = busybox()
            sh = f"{bb}/bin/busybox"
            flat = [
                derivation(f"t{i}", sh, ["sh", "-c", f"echo {nonce} {i} > $out"])
                for i in range(INDEPENDENT)
            ]
            chain = [derivation("c0", sh, ["sh", "-c", f"echo {nonce} > $out"])]
            for i in range(1, CHAIN):
                chain.append(derivation(f"c{i}", sh, ["sh", "-c", f"cat {chain[-1]} > $out"]))
            settle()
            t = time.perf_counter()
            results = client.call("build", drvs=[x.path for x in flat], max_jobs=JOBS)
            flat_time = time.perf_counter() - t
            assert all(r["status"] == "built" for r in results), results[:3]
            t = time.perf_counter()
            (last,) = client.call("build", drvs=[chain[-1].path], max_jobs=JOBS)
            chain_time = time.perf_counter() - t
            assert last["status"] == "built", last
    finally:
        stop_daemon(d)
    return flat_time, chain_time


def _nix(work: Path, nonce: str) -> tuple[float, float] | str:
    if not shutil.which("nix-daemon"):
        return "nix-daemon is not installed"
    conf = work / "nix-conf"
    conf.mkdir()
    (conf / "nix.conf").write_text(NIX_CONF)
    base = {k: v for k, v in os.environ.items() if k != "NIX_REMOTE"}
    base["NIX_CONF_DIR"] = str(conf)
    # Started with NIX_REMOTE unset: a daemon that inherits NIX_REMOTE=daemon forks forever.
    daemon = subprocess.Popen(
        ["nix-daemon", "--daemon"],
        env=base,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    client_env = {**base, "NIX_REMOTE": "daemon"}

    def nix(*args: str) -> str:
        return subprocess.run(
            args, env=client_env, check=True, capture_output=True, text=True
        ).stdout

    try:
        time.sleep(1)
        bb_dir = work / "nix-busybox" / "bin"
        bb_dir.mkdir(parents=True)
        shutil.copy("/bin/busybox", bb_dir / "busybox")
        bb = nix("nix-store", "--add", str(bb_dir.parent)).strip()
        expr = work / "graphs.nix"
        expr.write_text(f"""
let
  bb = builtins.storePath "{bb}";
  mk = name: script: derivation {{
    inherit name; system = "x86_64-linux";
    builder = "${{bb}}/bin/busybox"; args = [ "sh" "-c" script ];
  }};
  chain = n: if n == 0 then mk "c0" "echo {nonce} > $out"
             else mk "c${{toString n}}" "cat ${{chain (n - 1)}} > $out";
in {{
  flat = builtins.genList (i: mk "t${{toString i}}" "echo {nonce} ${{toString i}} > $out")
                          {INDEPENDENT};
  chain = chain {CHAIN - 1};
}}
""")
        flat = nix("nix-instantiate", str(expr), "-A", "flat").split()
        last = nix("nix-instantiate", str(expr), "-A", "chain").split()
        settle()
        t = time.perf_counter()
        nix("nix-store", "--realise", "--max-jobs", str(JOBS), *flat)
        flat_time = time.perf_counter() - t
        t = time.perf_counter()
        nix("nix-store", "--realise", "--max-jobs", str(JOBS), *last)
        chain_time = time.perf_counter() - t
    except (subprocess.CalledProcessError, OSError) as e:
        return f"nix-daemon failed: {getattr(e, 'stderr', '') or e}".strip()[:200]
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait()
    return flat_time, chain_time


def _scan_rate() -> float:
    candidates = [base32.encode(os.urandom(20)) for _ in range(500)]
    chunk = os.urandom(1 << 20)
    scanner = ReferenceScanner(candidates)
    t = time.perf_counter()
    for _ in range(1024):
        scanner.feed(chunk)
    return 1024 / (time.perf_counter() - t) * 1.048576


def run() -> list[Row]:
    nonce = uuid.uuid4().hex
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="weft-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        weft = _weft(work, nonce)
        nix = _nix(work, nonce)
    for label, n, w in (
        ("independent trivial derivations", INDEPENDENT, weft[0]),
        ("chain of dependent derivations", CHAIN, weft[1]),
    ):
        i = 0 if n == INDEPENDENT else 1
        if isinstance(nix, str):
            rows.append(
                (
                    f"{n} {label}, -j{JOBS}",
                    f"weft {w:.2f} s ({w / n * 1000:.1f} ms each)",
                    f"Nix skipped: {nix}",
                )
            )
        else:
            rows.append(
                (
                    f"{n} {label}, -j{JOBS}",
                    f"weft {w:.2f} s ({w / n * 1000:.1f} ms each), "
                    f"nix-daemon {nix[i]:.2f} s ({nix[i] / n * 1000:.1f} ms each)",
                    f"weft/nix {w / nix[i]:.2f}; target <= 0.33",
                )
            )
    rows.append(
        (
            "reference scan of 1 GiB against 500 candidates",
            f"{_scan_rate():,.0f} MB/s",
            "target >= 500",
        )
    )
    return rows

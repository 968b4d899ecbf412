"""A nix-daemon of our own for the side-by-side benches: Debian's nix-bin, a scratch
configuration (sandbox on, no substituters), the machine's /nix/store."""

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

NIX_CONF = """build-users-group = nixbld
sandbox = true
sandbox-fallback = false
max-jobs = 2
substituters =
experimental-features = nix-command
"""

Nix = Callable[..., subprocess.CompletedProcess[str]]


class NixUnavailable(Exception):
    """Why the Nix column is skipped."""


@contextlib.contextmanager
def scratch_nix(work: Path) -> Iterator[Nix]:
    """Yields `nix(*argv)`, which runs a Nix command against the daemon and checks it."""
    if not shutil.which("nix-daemon"):
        raise NixUnavailable("nix-daemon is not installed")
    conf = work / "nix-conf"
    conf.mkdir(exist_ok=True)
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

    def nix(*args: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(args, env=client_env, check=True, capture_output=True, text=True)
        except (subprocess.CalledProcessError, OSError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            raise NixUnavailable(f"{args[0]} failed: {detail.strip()[:200]}") from None

    try:
        time.sleep(1)
        yield nix
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait()

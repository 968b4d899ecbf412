"""`store-build --dry-run`: what would be built and what is already valid, as nix-build
--dry-run says it, with nothing built and no link made."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from bench.daemons import DaemonProc
from daemon.cli.blocking import BlockingClient
from daemon.cli.build import evaluate

RECIPE = """
from store.recipe import busybox, derivation

bb = busybox()
env = {{"PATH": f"{{bb}}/bin"}}
base = derivation("base-{tag}", f"{{bb}}/bin/busybox", ["sh", "-c", "echo b > $out"], env=env)
top = derivation(
    "top-{tag}", f"{{bb}}/bin/busybox", ["sh", "-c", f"cat {{base}} > $out"], env=env
)
"""


def store_build(d: DaemonProc, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WEFT_STATE_DIR": str(d.state)}
    cmd = [Path(sys.executable).parent / "store-build", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_dry_run_says_what_would_be_built_and_what_is_valid_and_builds_nothing(
    builder_daemon: DaemonProc, tmp_path: Path
) -> None:
    recipe = tmp_path / "pair.py"
    tag = os.urandom(4).hex()
    recipe.write_text(textwrap.dedent(RECIPE.format(tag=tag)))
    with BlockingClient(builder_daemon.socket, on_log=lambda e: None) as client:
        base, top = (evaluate(f"{recipe}:{name}", client)[0] for name in ("base", "top"))
    link = tmp_path / "result"

    out = store_build(builder_daemon, "--dry-run", "-o", str(link), f"{recipe}:top")
    assert out.returncode == 0 and out.stdout == "", out.stderr
    assert out.stderr.endswith(f"these 2 derivations will be built:\n  {base}\n  {top}\n")
    # Nothing built: no output of either is in the store.
    assert not link.exists()
    assert {p.name for p in Path(top).parent.glob(f"*-{tag}*")} == {Path(base).name, Path(top).name}

    first = store_build(builder_daemon, f"{recipe}:base")
    assert first.returncode == 0, first.stderr
    (base_out,) = first.stdout.split()
    out = store_build(builder_daemon, "--dry-run", top)
    assert out.stderr.endswith(f"this derivation will be built:\n  {top}\n"), out.stderr

    built = store_build(builder_daemon, top)
    assert built.returncode == 0, built.stderr
    (top_out,) = built.stdout.split()
    out = store_build(builder_daemon, "--dry-run", top, f"{recipe}:base")
    assert out.returncode == 0
    assert out.stderr.endswith(f"these 2 paths are already valid:\n  {top_out}\n  {base_out}\n")
    assert "will be built" not in out.stderr

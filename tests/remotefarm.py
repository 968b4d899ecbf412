"""Test helpers for a one-machine remote-execution farm (contrib/remote/farm): a private
PostgreSQL, BuildGrid's bgd on a Unix socket, and store-workers.

    with start_farm(tmp_path / "farm", workers=2, store_dir=state / "store") as farm:
        ... farm.endpoint ...  # unix://.../bgd.sock
        farm.kill_worker(0)

The farm is driven through its command, as a user would. Its keeper (the process that owns
and reaps the farm's processes) runs as this test process's child (`farm start --foreground`),
so that it too has a reaper; `stop()` (or leaving the `with`) stops everything it started and
waits for it. Tests that need the engine skip when install.sh has not set it up
(`engine_available()`).
"""

from __future__ import annotations

import selectors
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FARM = ROOT / "contrib" / "remote" / "farm"
ENGINE = ROOT / ".venv-bgd" / "bin" / "bgd"
# A farm starts in ~3 s; a machine busy with parallel test runs may take many times that.
FARM_COMMAND_TIMEOUT = 180


def engine_available() -> bool:
    return ENGINE.exists()


def needs_engine() -> pytest.MarkDecorator:
    """Skip a test when the engine (BuildGrid, from install.sh) is not installed."""
    return pytest.mark.skipif(not engine_available(), reason="no .venv-bgd: run install.sh")


def _farm(*args: str) -> str:
    done = subprocess.run(
        [str(FARM), *args],
        capture_output=True,
        text=True,
        timeout=FARM_COMMAND_TIMEOUT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"farm {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


@dataclass
class Farm:
    """A running farm: its endpoint (for weft.toml's remote-endpoint or a worker's --endpoint)
    and its directory (bgd.log, workers/N/log, cas/)."""

    dir: Path
    endpoint: str
    keeper: subprocess.Popen[bytes]

    def stop(self) -> None:
        """Stop everything; harmless when already stopped."""
        _farm("stop", str(self.dir))
        self.keeper.wait(timeout=FARM_COMMAND_TIMEOUT)

    def kill_worker(self, index: int) -> None:
        """SIGKILL worker `index` and everything it runs, as a crash would."""
        _farm("workers", str(self.dir), "--kill", str(index))

    def stop_worker(self, index: int) -> None:
        _farm("workers", str(self.dir), "--stop", str(index))

    def add_workers(self, count: int) -> None:
        """Start `count` more workers (numbered after the existing ones)."""
        _farm("workers", str(self.dir), "--add", str(count))

    def stop_engine(self) -> None:
        """Stop bgd alone (PostgreSQL and the workers stay): the engine is unreachable."""
        _farm("engine", str(self.dir), "--stop")

    def start_engine(self) -> None:
        """Start bgd again (its action cache starts empty; the CAS is kept)."""
        _farm("engine", str(self.dir), "--start")

    def worker_log(self, index: int) -> str:
        path = self.dir / "workers" / str(index) / "log"
        return path.read_text(errors="replace") if path.exists() else ""

    def engine_log(self) -> str:
        return (self.dir / "bgd.log").read_text(errors="replace")

    def blob_path(self, sha256: str) -> Path:
        """Where bgd's disk CAS keeps the blob of that hash (a test may tamper with it)."""
        return self.dir / "cas" / "cas" / "objects" / sha256[:2] / sha256[2:]


def launch_farm(
    dir: Path,
    *,
    workers: int = 0,
    store_dir: Path | str | None = None,
    instance: str = "",
    property_keys: tuple[str, ...] = (),
    bot_timeout: int | None = None,
) -> Farm:
    """Start a farm in `dir`; the caller must `stop()` it (start_farm does, as a context)."""
    args = ["start", str(dir), "--workers", str(workers), "--foreground"]
    if store_dir is not None:
        args += ["--store-dir", str(store_dir)]
    if instance:
        args += ["--instance", instance]
    for key in property_keys:
        args += ["--property-key", key]
    if bot_timeout is not None:
        args += ["--bot-timeout", str(bot_timeout)]
    dir = Path(dir).resolve()
    dir.mkdir(parents=True, exist_ok=True)
    with open(dir / "farm.log", "ab") as log:
        keeper = subprocess.Popen(
            [str(FARM), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
        )
    assert keeper.stdout is not None
    with keeper.stdout, selectors.DefaultSelector() as ready:
        ready.register(keeper.stdout, selectors.EVENT_READ)
        endpoint = b""
        if ready.select(timeout=FARM_COMMAND_TIMEOUT):
            endpoint = keeper.stdout.readline()
    if not endpoint:
        _farm("stop", str(dir))
        keeper.kill()
        keeper.wait()
        log_text = (dir / "farm.log").read_text(errors="replace")
        raise RuntimeError(f"farm start in {dir} failed:\n{log_text}")
    return Farm(dir=dir, endpoint=endpoint.decode().strip(), keeper=keeper)


@contextmanager
def start_farm(dir: Path, **options: object) -> Iterator[Farm]:
    """A farm for the duration of the `with` (options as for launch_farm)."""
    farm = launch_farm(dir, **options)  # type: ignore[arg-type]
    try:
        yield farm
    finally:
        farm.stop()

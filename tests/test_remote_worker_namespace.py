"""The worker's view of its state dir at the daemons' path (`worker/namespace.py`): a
rename of that path on the host detaches the worker's bind mount, after which the path
shows the host's directory; the worker must notice and stop rather than build there."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# The worker notices within its watch period (1 s) and stops its private daemon: a
# generous bound for a loaded machine.
EXIT_SECONDS = 60
# Its private daemon answering on its socket, first start included.
START_SECONDS = 60


def _worker(tmp_path: Path, logical: Path) -> subprocess.Popen[bytes]:
    argv = [os.path.join(os.path.dirname(sys.executable), "store-worker")]
    # No engine there: the worker keeps retrying, which is all this test needs of it.
    argv += ["--endpoint", f"unix://{tmp_path}/no-engine.sock", "--name", "view"]
    argv += ["--state-dir", str(tmp_path / "real"), "--as-state-dir", str(logical)]
    log = (tmp_path / "worker.log").open("wb")
    with log:
        return subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)


def _wait_for(what: str, check: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_a_worker_whose_logical_dir_is_renamed_on_the_host_stops(tmp_path: Path) -> None:
    logical = tmp_path / "logical"  # does not exist yet: the worker makes it
    worker = _worker(tmp_path, logical)
    log = tmp_path / "worker.log"
    try:
        _wait_for("the worker serving", lambda: "serving" in log.read_text(), START_SECONDS)
        # Seen from the host, the logical dir is empty: the worker's store is in `real`.
        assert not (logical / "store").exists()
        assert (tmp_path / "real" / "store").is_dir()
        assert worker.poll() is None
        logical.rename(tmp_path / "moved")
        code = worker.wait(EXIT_SECONDS)
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(EXIT_SECONDS)
    assert code == 1, log.read_text()
    assert "no longer its own state dir" in log.read_text()

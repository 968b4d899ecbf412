"""The farm's keeper: the one process that starts the farm's processes, reaps them, and stops
them. It lives as long as the farm does.

Every farm process is its child or, once orphaned (PostgreSQL's postmaster after pg_ctl exits,
a worker's daemon after a killed worker), its adopted child: the keeper is a child subreaper,
so each of them has exactly one reaper even where PID 1 reaps nothing. Later commands (`farm
workers`, `farm engine`) are requests the keeper carries out, written as files in
DIR/requests/; `farm stop` is a SIGTERM to the keeper.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import time
from pathlib import Path

import farmpg
import farmprocs
from farmstate import ENGINE, HERE, WORKER, Farm, uses_psycopg2, write_config

# The engine starts in about 2 s here; a machine busy with parallel tests may take many times it.
READY_TIMEOUT = 60.0
# How long a worker or bgd may take to exit on SIGTERM before SIGKILL.
STOP_GRACE = 10.0
# How often the keeper looks for requests and reaps: a request waits at most this long.
LOOP_SECONDS = 0.02
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def reap() -> None:
    """Collect every child that has exited (ours and adopted ones)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        farmprocs.reaped(pid)


def start_farm(farm: Farm, workers: int) -> None:
    """PostgreSQL, bgd (serving), then the workers; on any failure, stop what was started."""
    try:
        cluster = farm.cluster()
        if not cluster.data.is_dir():
            template = ENGINE / "pg-template" / cluster.bindir.parent.name
            migrate = [str(ENGINE / "bin" / "bgd"), "migrate", "apply"]
            farmpg.create(cluster, template, migrate, uses_psycopg2())
        farmpg.start(cluster)
        (farm.dir / "cas").mkdir(exist_ok=True)
        start_engine(farm)
        start_workers(farm, workers)
    except BaseException:
        stop_farm(farm)
        raise


def start_engine(farm: Farm) -> None:
    config = write_config(farm)
    (Path(farm.socket_dir) / "bgd.sock").unlink(missing_ok=True)
    argv = [str(ENGINE / "bin" / "python"), str(HERE / "bgd_server.py"), str(config)]
    farm.bgd = farmprocs.spawn(argv, farm.dir / "bgd.log", cwd=farm.dir)
    farm.save()
    _wait_serving(farm)


def _wait_serving(farm: Farm) -> None:
    """Return once the engine answers GetCapabilities with SHA-256; fail if bgd dies first."""
    import grpc

    from remote.channel import open_channel
    from remote.wire import reapi_pb2, reapi_pb2_grpc

    assert farm.bgd is not None
    deadline = time.monotonic() + READY_TIMEOUT
    with open_channel(farm.endpoint) as channel:
        stub = reapi_pb2_grpc.CapabilitiesStub(channel)
        request = reapi_pb2.GetCapabilitiesRequest(instance_name=farm.instance)
        while time.monotonic() < deadline:
            if not farmprocs.alive(farm.bgd):
                raise SystemExit(f"farm: bgd exited:\n{farmprocs.log_tail(farm.bgd.log)}")
            try:
                caps = stub.GetCapabilities(request, timeout=2)
            except grpc.RpcError:
                time.sleep(farmprocs.POLL_SECONDS)
                continue
            sha256 = reapi_pb2.DigestFunction.SHA256
            if sha256 not in caps.cache_capabilities.digest_functions:
                raise SystemExit("farm: the engine does not offer SHA-256 digests")
            return
    raise SystemExit(f"farm: bgd not serving after {READY_TIMEOUT:g} s")


def start_workers(farm: Farm, count: int) -> None:
    if count and not WORKER.exists():
        raise SystemExit(f"farm: {WORKER} is missing: run install.sh")
    # The workers' daemons have their own state dirs: a caller's WEFT_STATE_DIR is not theirs.
    env = {k: v for k, v in os.environ.items() if k != "WEFT_STATE_DIR"}
    for index in range(farm.next_worker, farm.next_worker + count):
        home = farm.dir / "workers" / str(index)
        argv = [str(WORKER), "--endpoint", farm.endpoint, "--state-dir", str(home / "state")]
        argv += ["--name", f"worker-{index}"]
        if farm.store_dir:
            argv += ["--as-state-dir", str(Path(farm.store_dir).parent)]
        if farm.instance:
            argv += ["--instance", farm.instance]
        farm.workers[index] = farmprocs.spawn(argv, home / "log", env=env)
        farm.next_worker = index + 1
        farm.save()


def stop_farm(farm: Farm) -> None:
    """Stop what the farm runs (workers, bgd, PostgreSQL) and remove its record."""
    farmprocs.stop(list(farm.workers.values()), STOP_GRACE)
    if farm.bgd:
        farmprocs.stop([farm.bgd], STOP_GRACE)
    farmpg.stop(farm.cluster())
    if farm.socket_dir != str(farm.dir):
        shutil.rmtree(farm.socket_dir, ignore_errors=True)
    if farm.pg_private:
        shutil.rmtree(farm.pg_home, ignore_errors=True)
        (farm.dir / "pg").unlink(missing_ok=True)
    shutil.rmtree(farm.dir / "requests", ignore_errors=True)
    farm.state_file.unlink(missing_ok=True)


def carry_out(farm: Farm, op: str, arg: int) -> None:
    """One request of a later `farm workers` or `farm engine` command."""
    if op == "add-workers":
        start_workers(farm, arg)
    elif op in ("kill-worker", "stop-worker"):
        proc = farm.workers.pop(arg, None)
        if proc is None:
            raise SystemExit(f"farm: no worker {arg}")
        if op == "kill-worker":
            farmprocs.kill(proc)
        else:
            farmprocs.stop([proc], STOP_GRACE)
    elif op == "stop-engine":
        if farm.bgd:
            farmprocs.stop([farm.bgd], STOP_GRACE)
        farm.bgd = None
    elif op == "start-engine":
        if farm.bgd is None or not farmprocs.alive(farm.bgd):
            start_engine(farm)
    else:
        raise SystemExit(f"farm: unknown request {op!r}")
    farm.save()


def _handle_requests(farm: Farm) -> None:
    requests = farm.dir / "requests"
    if not requests.is_dir():
        return
    for path in sorted(requests.glob("*.json"), key=lambda p: p.stat().st_mtime_ns):
        request = json.loads(path.read_text())
        try:
            carry_out(farm, request["op"], request["arg"])
            outcome = {"ok": True, "error": ""}
        except (SystemExit, Exception) as error:
            outcome = {"ok": False, "error": str(error)}
        done = path.with_suffix(".done")
        done.with_suffix(".tmp").write_text(json.dumps(outcome))
        done.with_suffix(".tmp").replace(done)
        path.unlink()


def serve(farm: Farm) -> None:
    """Carry out requests and reap children until SIGTERM (or SIGINT), then stop the farm."""
    stopping = False

    def stop_soon(signo: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop_soon)
    signal.signal(signal.SIGINT, stop_soon)
    try:
        while not stopping:
            reap()
            _handle_requests(farm)
            time.sleep(LOOP_SECONDS)
    finally:
        stop_farm(farm)
        reap()

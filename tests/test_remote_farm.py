"""The REAPI wire modules and the one-machine farm (contrib/remote/farm): our subset .proto files
must generate importable modules whose messages carry the real APIs' names and field numbers;
a farm must start, serve the CAS, Execution, ActionCache and Bots services to those modules (a
real BuildGrid is the check that our subset is wire-compatible), and stop leaving nothing
running."""

import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from remote.channel import RemoteUnavailable, open_channel, target_of, wait_ready
from remote.wire import (
    bots_pb2,
    bots_pb2_grpc,
    bytestream_pb2_grpc,
    operations_pb2,
    reapi_pb2,
    reapi_pb2_grpc,
    status_pb2,
    worker_pb2,
)
from tests.remotefarm import FARM, ROOT, Farm, engine_available, launch_farm, start_farm

WORKER = ROOT / ".venv" / "bin" / "store-worker"


def test_the_generated_wire_modules_carry_the_real_api_names_and_field_numbers() -> None:
    action = reapi_pb2.Action.DESCRIPTOR
    assert action.full_name == "build.bazel.remote.execution.v2.Action"
    assert action.fields_by_name["input_root_digest"].number == 2
    assert action.fields_by_name["platform"].number == 10
    assert operations_pb2.Operation.DESCRIPTOR.fields_by_name["response"].number == 5
    assert status_pb2.Status.DESCRIPTOR.full_name == "google.rpc.Status"
    lease = bots_pb2.Lease.DESCRIPTOR
    assert lease.full_name == "google.devtools.remoteworkers.v1test2.Lease"
    assert lease.fields_by_name["payload"].number == 8
    assert worker_pb2.Worker.Property.DESCRIPTOR.fields_by_name["value"].number == 2
    for stubs in (reapi_pb2_grpc, bots_pb2_grpc, bytestream_pb2_grpc):
        assert any(name.endswith("Stub") for name in dir(stubs))


def test_a_message_round_trips_through_its_bytes_with_unknown_fields_kept() -> None:
    result = reapi_pb2.ActionResult(exit_code=3)
    result.output_files.add(path="a/b", digest=reapi_pb2.Digest(hash="00" * 32, size_bytes=4))
    # A field our subset leaves out (OutputFile.node_properties = 7) survives a round trip.
    extra = bytes([0x3A, 0x00])
    file_bytes = result.output_files[0].SerializeToString() + extra
    parsed = reapi_pb2.OutputFile.FromString(file_bytes)
    assert parsed.path == "a/b"
    assert parsed.SerializeToString().endswith(extra)
    again = reapi_pb2.ActionResult.FromString(result.SerializeToString())
    assert again == result


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that name `text` (a farm's directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and stat[stat.rindex(")") + 2] != "Z":
            found.append(cmdline)
    return found


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    if not engine_available():
        pytest.skip("no .venv-bgd: run install.sh")
    with start_farm(tmp_path_factory.mktemp("farm")) as running:
        yield running


def test_a_farm_serves_capabilities_with_sha256(farm: Farm) -> None:
    with open_channel(farm.endpoint) as channel:
        stub = reapi_pb2_grpc.CapabilitiesStub(channel)
        caps = stub.GetCapabilities(reapi_pb2.GetCapabilitiesRequest(), timeout=10)
    assert reapi_pb2.DigestFunction.SHA256 in caps.cache_capabilities.digest_functions
    assert caps.execution_capabilities.exec_enabled
    assert caps.cache_capabilities.max_batch_total_size_bytes > 0


def test_a_blob_goes_into_the_farms_cas_and_comes_back(farm: Farm) -> None:
    data = b"weft remote round trip " + os.urandom(16)
    digest = reapi_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    with open_channel(farm.endpoint) as channel:
        cas = reapi_pb2_grpc.ContentAddressableStorageStub(channel)
        missing = cas.FindMissingBlobs(
            reapi_pb2.FindMissingBlobsRequest(blob_digests=[digest]), timeout=10
        )
        assert list(missing.missing_blob_digests) == [digest]
        update = reapi_pb2.BatchUpdateBlobsRequest()
        update.requests.add(digest=digest, data=data)
        (stored,) = cas.BatchUpdateBlobs(update, timeout=10).responses
        assert stored.status.code == 0
        missing = cas.FindMissingBlobs(
            reapi_pb2.FindMissingBlobsRequest(blob_digests=[digest]), timeout=10
        )
        assert not missing.missing_blob_digests
        read = cas.BatchReadBlobs(reapi_pb2.BatchReadBlobsRequest(digests=[digest]), timeout=10)
        (back,) = read.responses
    assert back.status.code == 0
    assert back.data == data
    assert farm.blob_path(digest.hash).read_bytes() == data


def test_an_endpoint_is_refused_when_it_is_not_one_weft_can_reach() -> None:
    assert target_of("unix:///run/bgd.sock") == "unix:///run/bgd.sock"
    assert target_of("grpc://engine.lan:8980") == "engine.lan:8980"
    assert target_of("localhost:50051") == "localhost:50051"
    for bad in ("grpcs://engine:443", "unix:relative.sock", "engine", "unix:///" + "x" * 120):
        with pytest.raises(ValueError):
            target_of(bad)


def test_an_engine_that_is_not_there_is_unavailable(tmp_path: Path) -> None:
    with open_channel(f"unix://{tmp_path}/none.sock") as channel, pytest.raises(RemoteUnavailable):
        wait_ready(channel, timeout=0.2)


@pytest.mark.parametrize("place", ["tmp", "var-tmp", "long"])
def test_a_farm_starts_and_stops_in_seconds_leaving_nothing_running(
    place: str, tmp_path: Path
) -> None:
    if not engine_available():
        pytest.skip("no .venv-bgd: run install.sh")
    if place == "tmp":
        dir = tmp_path / "farm"
    elif place == "var-tmp":
        dir = Path(tempfile.mkdtemp(prefix="weft-farm-test-", dir="/var/tmp")) / "f"
    else:
        dir = tmp_path / ("deep-" * 12) / "farm"
    try:
        began = time.monotonic()
        farm = launch_farm(dir)
        record = json.loads((dir / "farm.json").read_text())
        postmaster = Path(record["pg_home"]) / "data" / "postmaster.pid"
        assert postmaster.exists()
        with open_channel(farm.endpoint) as channel:
            wait_ready(channel, timeout=10)
        farm.stop()
        took = time.monotonic() - began
        assert not _processes_mentioning(str(dir))
        assert not _processes_mentioning(record["pg_home"])
        assert not postmaster.exists()
        assert not (dir / "farm.json").exists()
        assert not Path(farm.endpoint.removeprefix("unix://")).exists()
        assert took < 30, f"a farm start/stop cycle took {took:.1f} s"
        farm.stop()  # stopping again is harmless
    finally:
        subprocess.run([str(FARM), "stop", str(dir)], check=False)
        if place == "var-tmp":
            shutil.rmtree(dir.parent, ignore_errors=True)


CasStub = reapi_pb2_grpc.ContentAddressableStorageStub


def _put(cas: CasStub, *blobs: bytes) -> list[reapi_pb2.Digest]:
    update = reapi_pb2.BatchUpdateBlobsRequest()
    digests = []
    for blob in blobs:
        digest = reapi_pb2.Digest(hash=hashlib.sha256(blob).hexdigest(), size_bytes=len(blob))
        update.requests.add(digest=digest, data=blob)
        digests.append(digest)
    for response in cas.BatchUpdateBlobs(update, timeout=10).responses:
        assert response.status.code == 0
    return digests


def _action(cas: CasStub, store_dir: str) -> tuple[reapi_pb2.Action, reapi_pb2.Digest]:
    properties = {"ISA": os.uname().machine, "OSFamily": "linux", "weft-store-dir": store_dir}
    platform = reapi_pb2.Platform(
        properties=[reapi_pb2.Platform.Property(name=k, value=v) for k, v in properties.items()]
    )
    command = reapi_pb2.Command(arguments=["/bin/true"], working_directory="build")
    command_digest, root_digest = _put(
        cas, command.SerializeToString(), reapi_pb2.Directory().SerializeToString()
    )
    action = reapi_pb2.Action(
        command_digest=command_digest, input_root_digest=root_digest, platform=platform
    )
    action.timeout.FromSeconds(60)
    (action_digest,) = _put(cas, action.SerializeToString())
    return action, action_digest


def _bot_session(name: str, store_dir: str) -> bots_pb2.BotSession:
    properties = {"ISA": os.uname().machine, "OSFamily": "linux", "weft-store-dir": store_dir}
    # BuildGrid matches an action's platform against the primary (first) device's properties.
    device = worker_pb2.Device(
        handle=name,
        properties=[worker_pb2.Device.Property(key=k, value=v) for k, v in properties.items()],
    )
    return bots_pb2.BotSession(
        bot_id=name, status=bots_pb2.BotStatus.OK, worker=worker_pb2.Worker(devices=[device])
    )


def _take_lease(bots: bots_pb2_grpc.BotsStub, session: bots_pb2.BotSession) -> bots_pb2.BotSession:
    """Poll until the engine assigns a lease; return the session holding it."""
    deadline = time.monotonic() + 30
    while not session.leases:
        assert time.monotonic() < deadline, "no lease assigned"
        request = bots_pb2.UpdateBotSessionRequest(name=session.name, bot_session=session)
        session = bots.UpdateBotSession(request, timeout=3)
    return session


def _serve_one_lease(channel: grpc.Channel, store_dir: str, action: reapi_pb2.Action) -> bytes:
    """Be a bot: take the one lease, check its payload, complete it; return the log's hash."""
    bots = bots_pb2_grpc.BotsStub(channel)
    session = bots.CreateBotSession(
        bots_pb2.CreateBotSessionRequest(bot_session=_bot_session("wire-bot", store_dir)),
        timeout=10,
    )
    session = _take_lease(bots, session)
    (lease,) = session.leases
    # BuildGrid 0.9 gives the Action itself, already ACTIVE.
    payload = reapi_pb2.Action()
    assert lease.payload.Unpack(payload)
    assert payload == action
    (log_digest,) = _put(CasStub(channel), b"built\n")
    result = reapi_pb2.ActionResult(exit_code=0, stdout_digest=log_digest)
    result.execution_metadata.worker = "wire-bot"
    lease.result.Pack(result)
    lease.status.CopyFrom(status_pb2.Status(code=0))
    lease.state = bots_pb2.LeaseState.COMPLETED
    request = bots_pb2.UpdateBotSessionRequest(name=session.name, bot_session=session)
    bots.UpdateBotSession(request, timeout=3)
    return log_digest.hash


def test_an_action_run_by_a_bot_comes_back_through_the_execute_stream(farm: Farm) -> None:
    store_dir = f"/weft-wire-test-{os.getpid()}/store"
    with open_channel(farm.endpoint) as channel:
        cas = reapi_pb2_grpc.ContentAddressableStorageStub(channel)
        action, action_digest = _action(cas, store_dir)
        execution = reapi_pb2_grpc.ExecutionStub(channel)
        request = reapi_pb2.ExecuteRequest(action_digest=action_digest, skip_cache_lookup=True)
        stream = execution.Execute(request, timeout=60)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            final = pool.submit(lambda: [op for op in stream if op.done])
            try:
                log_hash = _serve_one_lease(channel, store_dir, action)
                (operation,) = final.result(timeout=60)
            finally:
                stream.cancel()
        response = reapi_pb2.ExecuteResponse()
        assert operation.response.Unpack(response)
        assert response.status.code == 0
        assert response.result.stdout_digest.hash == log_hash
        assert response.result.execution_metadata.worker == "wire-bot"
        cache = reapi_pb2_grpc.ActionCacheStub(channel)
        cached = cache.GetActionResult(
            reapi_pb2.GetActionResultRequest(action_digest=action_digest), timeout=10
        )
    assert cached.stdout_digest.hash == log_hash


def test_a_stopped_engine_is_unreachable_and_comes_back_with_its_cas(farm: Farm) -> None:
    with open_channel(farm.endpoint) as channel:
        (digest,) = _put(CasStub(channel), b"kept across an engine restart")
    farm.stop_engine()
    try:
        with open_channel(farm.endpoint) as channel, pytest.raises(RemoteUnavailable):
            wait_ready(channel, timeout=0.5)
    finally:
        farm.start_engine()
    with open_channel(farm.endpoint) as channel:
        read = CasStub(channel).BatchReadBlobs(
            reapi_pb2.BatchReadBlobsRequest(digests=[digest]), timeout=10
        )
    assert read.responses[0].data == b"kept across an engine restart"


def test_a_killed_worker_leaves_nothing_behind_and_another_can_be_added(tmp_path: Path) -> None:
    if not engine_available() or not WORKER.exists():
        pytest.skip("no .venv-bgd or store-worker: run install.sh")
    state = Path(tempfile.mkdtemp(prefix="weft-farm-st-", dir="/var/tmp"))
    try:
        with start_farm(tmp_path / "farm", workers=1, store_dir=state / "store") as farm:
            first = str(farm.dir / "workers" / "0")
            assert _processes_mentioning(first)
            farm.kill_worker(0)
            assert not _processes_mentioning(first)
            farm.add_workers(1)
            assert _processes_mentioning(str(farm.dir / "workers" / "1"))
        assert not _processes_mentioning(str(farm.dir))
    finally:
        shutil.rmtree(state, ignore_errors=True)

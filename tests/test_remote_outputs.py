"""An action's outputs through a real BuildGrid CAS (`remote/outputs.py`): a worker's
outputs made into an ActionResult and laid out again identical; and hostile results (names
that climb out, a symlink under a directory's name, missing or tampered blobs, endless
trees) refused with nothing written outside the destination."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from remote.cas import Cas
from remote.digests import Blobs, NodeKind, PathNode, node_of, sha256_digest, to_proto
from remote.errors import DigestMismatch, OutputError, RemoteError
from remote.execution import Execution
from remote.outputs import Budget, fetch_outputs, materialise, read_log, result_for
from remote.wire import reapi_pb2, reapi_pb2_grpc
from tests.remotecas import CasServer, bgd_path, cas_server, tamper

pytestmark = pytest.mark.skipif(bgd_path() is None, reason="no bgd (install.sh sets it up)")

STORE = "/var/tmp/w/store"


@pytest.fixture(scope="module")
def server() -> Iterator[CasServer]:
    with cas_server("/var/tmp") as s:
        yield s


@pytest.fixture
def cas(server: CasServer) -> Iterator[Cas]:
    with server.channel() as channel:
        yield Cas(channel, server.instance)


def _outputs(root: Path) -> dict[str, str]:
    tree = root / "tree"
    (tree / "sub" / "empty").mkdir(parents=True)
    (tree / "sub" / "data").write_bytes(os.urandom(5000))
    (tree / "sub" / "same").write_bytes((tree / "sub" / "data").read_bytes())
    (tree / "sub" / "nothing").write_bytes(b"")
    big = os.urandom(5 << 20)  # streamed, and twice
    (tree / "big1").write_bytes(big)
    (tree / "big2").write_bytes(big)
    (tree / "tool").write_bytes(b"#!/bin/sh\nexit 0\n")
    (tree / "tool").chmod(0o755)
    (tree / "up").symlink_to("../../etc")
    (root / "file").write_bytes(os.urandom(6 << 20))
    (root / "file").chmod(0o755)
    (root / "link").symlink_to("/etc/passwd")
    return {
        f"{STORE}/aaaa-tree": str(tree),
        f"{STORE}/bbbb-file": str(root / "file"),
        f"{STORE}/cccc-link": str(root / "link"),
        f"{STORE}/dddd-never-made": str(root / "absent"),
    }


def _same(a: str, b: str) -> None:
    one, two = node_of(a), node_of(b)
    assert (one.kind, one.digest, one.is_executable, one.target) == (
        two.kind,
        two.digest,
        two.is_executable,
        two.target,
    )


def test_outputs_come_back_as_they_were_made(cas: Cas, tmp_path: Path) -> None:
    made = _outputs(tmp_path / "made")
    result = result_for(cas, made, 0, b"line one\nline two\n", "worker-7")
    assert [f.path for f in result.output_files] == ["var/tmp/w/store/bbbb-file"]
    assert [d.path for d in result.output_directories] == ["var/tmp/w/store/aaaa-tree"]
    assert [(s.path, s.target) for s in result.output_symlinks] == [
        ("var/tmp/w/store/cccc-link", "/etc/passwd")
    ]
    assert result.execution_metadata.worker == "worker-7"
    assert read_log(cas, result) == b"line one\nline two\n"

    dest = tmp_path / "dest"
    dest.mkdir()
    produced = [p for p in made if not p.endswith("never-made")]
    fetch_outputs(cas, result, {p: str(dest / os.path.basename(p)) for p in produced})
    for path in produced:
        _same(made[path], str(dest / os.path.basename(path)))
    assert os.readlink(dest / "aaaa-tree" / "up") == "../../etc"

    with pytest.raises(OutputError, match="lacks"):
        fetch_outputs(cas, result, {made.popitem()[0]: str(dest / "missing")})


def test_an_input_path_is_laid_out_from_its_directories(cas: Cas, tmp_path: Path) -> None:
    made = _outputs(tmp_path / "made")
    blobs = Blobs()
    node = node_of(made[f"{STORE}/aaaa-tree"], blobs)
    cas.upload(blobs)
    directories = cas.directories(node.digest, limit=100)
    assert len(directories) == 3
    materialise(cas, PathNode(NodeKind.DIRECTORY, node.digest), str(tmp_path / "in"), directories)
    _same(made[f"{STORE}/aaaa-tree"], str(tmp_path / "in"))
    with pytest.raises(RemoteError):
        cas.directories(node.digest, limit=2)


def _result_with_tree(cas: Cas, root: reapi_pb2.Directory, children=()) -> reapi_pb2.ActionResult:
    blobs = Blobs()
    tree = blobs.add_message(reapi_pb2.Tree(root=root, children=list(children)))
    cas.upload(blobs)
    result = reapi_pb2.ActionResult()
    result.output_directories.add(path="out", tree_digest=to_proto(tree))
    return result


def _file(cas: Cas, data: bytes) -> reapi_pb2.Digest:
    blobs = Blobs()
    digest = blobs.add_bytes(data)
    cas.upload(blobs)
    return to_proto(digest)


@pytest.mark.parametrize("name", ["..", ".", "", "../../escape", "a/b", "nul\0x"])
def test_a_name_that_is_no_plain_name_is_refused(cas: Cas, tmp_path: Path, name: str) -> None:
    root = reapi_pb2.Directory()
    root.files.add(name=name, digest=_file(cas, b"escaped"))
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputError):
        fetch_outputs(cas, _result_with_tree(cas, root), {"out": str(tmp_path / "d" / "out")})
    assert sorted(os.listdir(tmp_path)) == ["d"] and os.listdir(tmp_path / "d") == []


def test_a_symlink_and_a_directory_of_one_name_cannot_write_through_it(
    cas: Cas, tmp_path: Path
) -> None:
    target = tmp_path / "target"
    target.mkdir()
    inner = reapi_pb2.Directory()
    inner.files.add(name="planted", digest=_file(cas, b"planted"))
    root = reapi_pb2.Directory()
    root.symlinks.add(name="a", target=str(target))
    root.directories.add(name="a", digest=to_proto(sha256_digest(inner.SerializeToString())))
    with pytest.raises(OutputError, match="twice"):
        fetch_outputs(cas, _result_with_tree(cas, root, [inner]), {"out": str(tmp_path / "out")})
    assert list(target.iterdir()) == []


def test_a_tree_without_a_child_it_names_is_refused(cas: Cas, tmp_path: Path) -> None:
    root = reapi_pb2.Directory()
    root.directories.add(name="gone", digest=to_proto(sha256_digest(b"no such directory")))
    with pytest.raises(OutputError, match="missing"):
        fetch_outputs(cas, _result_with_tree(cas, root), {"out": str(tmp_path / "out")})


def test_a_tampered_file_in_a_directory_output_is_refused(
    cas: Cas, server: CasServer, tmp_path: Path
) -> None:
    data = os.urandom(3000)
    root = reapi_pb2.Directory()
    root.files.add(name="f", digest=_file(cas, data))
    result = _result_with_tree(cas, root)
    tamper(server.blob_file(sha256_digest(data).hash))
    with pytest.raises(OutputError) as caught:
        fetch_outputs(cas, result, {"out": str(tmp_path / "out")})
    assert isinstance(caught.value.__cause__, DigestMismatch)
    assert not (tmp_path / "out" / "f").exists()


def test_an_output_whose_blob_is_missing_is_refused(cas: Cas, tmp_path: Path) -> None:
    result = reapi_pb2.ActionResult()
    result.output_files.add(path="out", digest=to_proto(sha256_digest(b"never uploaded")))
    with pytest.raises(OutputError):
        fetch_outputs(cas, result, {"out": str(tmp_path / "out")})
    assert not (tmp_path / "out").exists()


def test_an_endless_tree_or_file_stops_at_the_budget(cas: Cas, tmp_path: Path) -> None:
    # Each level names the one below twice: 2**40 directories described in a few KiB.
    level = reapi_pb2.Directory()
    children = []
    for _ in range(40):
        children.append(level)
        digest = to_proto(sha256_digest(level.SerializeToString(deterministic=True)))
        level = reapi_pb2.Directory()
        level.directories.add(name="a", digest=digest)
        level.directories.add(name="b", digest=digest)
    result = _result_with_tree(cas, level, children)
    with pytest.raises(OutputError, match="larger than their bounds"):
        fetch_outputs(cas, result, {"out": str(tmp_path / "out")}, Budget(entries=1000))

    huge = reapi_pb2.ActionResult()
    huge.output_files.add(path="out", digest=to_proto(sha256_digest(b"x"))).digest.size_bytes = (
        1 << 50
    )
    with pytest.raises(OutputError):
        fetch_outputs(cas, huge, {"out": str(tmp_path / "huge")})
    assert not (tmp_path / "huge").exists()


def test_the_action_cache_answers_a_known_action_and_misses_others(
    server: CasServer, cas: Cas
) -> None:
    action = sha256_digest(b"an action")
    result = reapi_pb2.ActionResult(exit_code=0)
    result.output_files.add(path="x", digest=_file(cas, b"x"))
    with server.channel() as channel:
        reapi_pb2_grpc.ActionCacheStub(channel).UpdateActionResult(
            reapi_pb2.UpdateActionResultRequest(
                action_digest=to_proto(action), action_result=result
            )
        )
        execution = Execution(channel)
        assert execution.cached(action) == result
        assert execution.cached(sha256_digest(b"another")) is None
        # This engine has no execution service: its own error, not "unavailable".
        with pytest.raises(RemoteError) as caught:
            execution.execute(action)
        assert type(caught.value) is RemoteError

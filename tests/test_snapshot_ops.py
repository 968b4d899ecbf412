"""The snapshot rules through a real daemon (issue 22, docs/snapshots.md): the scope table
of the issue through the `build` operation (`bad-request`, the rule's words), the types of
the snapshot arguments, `resume_from` with one derivation, the snapshot operations'
refusals; the durable directories' path and name tables of the issue through recipes built
by `store-build` (refused naming the recipe's line, exit 1); the scopes in effect merged
over `weft.toml`.  The daemons are under /tmp: nothing here gets as far as a sandbox
(`--dry-run`, or a derivation named but never added, which is refused after the snapshot
arguments were accepted)."""

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.daemons import DaemonProc, start_daemon, stop_daemon
from daemon.cli.blocking import BlockingClient, DaemonError
from tests.test_durabledirs import (
    INVALID_NAMES,
    INVALID_PATHS,
    SCOPE_RULE,
    VALID_NAMES,
    VALID_PATHS,
)
from tests.test_snapshot_cli import run


@pytest.fixture(scope="module")
def plain() -> Iterator[DaemonProc]:
    root = Path(tempfile.mkdtemp(prefix="weft-snapshot-ops-", dir="/tmp"))
    d = start_daemon(root / "state")
    yield d
    stop_daemon(d)
    shutil.rmtree(root, ignore_errors=True)


def refusal(d: DaemonProc, op: str, **args: object) -> tuple[str, str]:
    with BlockingClient(d.socket) as c, pytest.raises(DaemonError) as refused:
        c.call(op, **args)
    return refused.value.code, refused.value.message


def _missing_drv(d: DaemonProc) -> str:
    return f"{d.store_dir}/{'0' * 32}-app.drv"


@pytest.mark.parametrize(("on_pause", "on_commit"), list(SCOPE_RULE))
def test_the_build_operation_applies_the_subset_rule(
    plain: DaemonProc, on_pause: str | None, on_commit: str | None
) -> None:
    scopes = {k: v for k, v in (("on_pause", on_pause), ("on_commit", on_commit)) if v}
    code, message = refusal(plain, "build", drvs=[_missing_drv(plain)], **scopes)
    assert code == "bad-request"
    if SCOPE_RULE[on_pause, on_commit]:
        assert "must be a subset" not in message and "app.drv" in message, message
    else:
        assert message == (
            f"on-commit ({on_commit or 'unset, so full'}) must be a subset of on-pause (data): "
            "with on-pause = data, set on-commit = data too"
        )
    assert plain.alive()


@pytest.mark.parametrize("key", ["on_pause", "on_commit"])
@pytest.mark.parametrize("scope", ["memory", "Full", "DATA"])
def test_the_build_operation_refuses_an_unknown_scope(
    plain: DaemonProc, key: str, scope: str
) -> None:
    code, message = refusal(plain, "build", drvs=[_missing_drv(plain)], **{key: scope})
    assert code == "bad-request"
    name = key.replace("_", "-")
    assert message == f"{name}: unknown snapshot scope {scope!r} (one of full, data)"


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        ({"on_pause": 1}, "bad-request", "'on_pause' must be a non-empty string"),
        ({"on_commit": ""}, "bad-request", "'on_commit' must be a non-empty string"),
        ({"on_commit": ["data"]}, "bad-request", "'on_commit' must be a non-empty string"),
        ({"resume_from": True}, "bad-request", "'resume_from' must be a non-empty string"),
        ({"resume_from": "/etc/passwd"}, "invalid-path", "/etc/passwd"),
    ],
)
def test_the_build_operation_checks_the_types_of_the_snapshot_arguments(
    plain: DaemonProc, args: dict, code: str, says: str
) -> None:
    refused = refusal(plain, "build", drvs=[_missing_drv(plain)], **args)
    assert refused[0] == code and says in refused[1], refused


@pytest.mark.parametrize("count", [0, 2])
def test_resume_from_needs_exactly_one_derivation(plain: DaemonProc, count: int) -> None:
    drvs = [f"{plain.store_dir}/{str(i) * 32}-app.drv" for i in range(count)]
    snapshot = f"{plain.store_dir}/{'1' * 32}-app-snapshot"
    code, message = refusal(plain, "build", drvs=drvs, resume_from=snapshot)
    assert code == "bad-request"
    assert (
        message == f"'resume_from' seeds exactly one derivation's build; the request names {count}"
    )


def test_resuming_from_a_path_with_no_record_is_refused(plain: DaemonProc) -> None:
    snapshot = f"{plain.store_dir}/{'1' * 32}-app-snapshot"
    code, message = refusal(plain, "build", drvs=[_missing_drv(plain)], resume_from=snapshot)
    assert code == "bad-request"
    assert message == (
        f"{snapshot} is not a snapshot (no record of it: snapshots are made by builds, not added)"
    )


def test_the_snapshot_operations_refuse_what_they_cannot_mean(plain: DaemonProc) -> None:
    drv, nothing = _missing_drv(plain), f"{plain.store_dir}/{'1' * 32}-app-snapshot"
    assert refusal(plain, "snapshot-commit", drv=drv, scope="memory") == (
        "bad-request",
        "scope: unknown snapshot scope 'memory' (one of full, data)",
    )
    assert refusal(plain, "snapshot-commit", drv=drv) == (
        "bad-request",
        f"no build of {drv} is running",
    )
    assert refusal(plain, "snapshot-commit", drv="/etc/passwd")[0] == "invalid-path"
    assert refusal(plain, "snapshot-commit")[0] == "bad-request"
    assert refusal(plain, "snapshots", target="relative")[0] == "invalid-path"
    assert refusal(plain, "snapshot-forget", path=nothing) == (
        "bad-request",
        f"{nothing} is not a snapshot (no record of it)",
    )
    with BlockingClient(plain.socket) as c:
        assert c.call("snapshots", target=drv) == {"snapshots": []}
    assert plain.alive()


RECIPE = """from store.recipe import derivation

app = derivation("app", "/bin/sh", ["-c", "echo > $out"], durable_dirs={dirs!r})
"""


def _store_build_recipe(
    d: DaemonProc, where: Path, dirs: dict[str, str], capfd: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    where.mkdir()
    recipe = where / "recipe.py"
    recipe.write_text(RECIPE.format(dirs=dirs))
    code, _, err = run(capfd, "store-build", "--socket", d.socket, "--dry-run", str(recipe))
    return code, err


@pytest.mark.parametrize("path", VALID_PATHS)
def test_store_build_accepts_a_recipes_durable_dir_path_as_listed(
    plain: DaemonProc, path: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    code, err = _store_build_recipe(plain, tmp_path / "r", {"cache": path}, capfd)
    assert code == 0 and err.startswith("this derivation will be built:\n"), err


@pytest.mark.parametrize("name", VALID_NAMES)
def test_store_build_accepts_a_recipes_durable_dir_name_as_listed(
    plain: DaemonProc, name: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    code, err = _store_build_recipe(plain, tmp_path / "r", {name: "/build/d"}, capfd)
    assert code == 0 and err.startswith("this derivation will be built:\n"), err


@pytest.mark.parametrize("path", list(INVALID_PATHS))
def test_store_build_refuses_a_recipes_durable_dir_path_as_listed(
    plain: DaemonProc, path: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    where = tmp_path / "r"
    code, err = _store_build_recipe(plain, where, {"cache": path}, capfd)
    assert code == 1
    assert err.startswith(
        f"{where / 'recipe.py'}:3: DurableDirError: app: durable directory 'cache': "
    ), err
    assert INVALID_PATHS[path] in err


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_store_build_refuses_a_recipes_durable_dir_name_as_listed(
    plain: DaemonProc, name: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    where = tmp_path / "r"
    code, err = _store_build_recipe(plain, where, {name: "/build/d"}, capfd)
    assert code == 1
    assert err.startswith(
        f"{where / 'recipe.py'}:3: DurableDirError: app: durable directory name {name!r} "
        "is not a DNS label"
    ), err


@pytest.mark.parametrize(
    ("dirs", "says"),
    [
        ({f"d{i}": f"/build/d{i}" for i in range(9)}, "9 durable directories, over the 8"),
        ({"a": "/build/x", "b": "/build/x"}, "'a' and 'b' are both '/build/x'"),
        ({"outer": "/build/x", "inner": "/build/x/y"}, "'inner' ('/build/x/y') is inside"),
    ],
)
def test_store_build_refuses_too_many_duplicate_or_nested_durable_dirs(
    plain: DaemonProc,
    dirs: dict[str, str],
    says: str,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    code, err = _store_build_recipe(plain, tmp_path / "r", dirs, capfd)
    assert code == 1 and "DurableDirError: app: " in err and says in err, err


def test_resume_from_a_recipe_naming_two_derivations_is_a_usage_error(
    plain: DaemonProc, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "two.py"
    recipe.write_text(
        "from store.recipe import derivation\n"
        "a = derivation('a', '/bin/sh', ['-c', 'echo > $out'])\n"
        "b = derivation('b', '/bin/sh', ['-c', 'echo b > $out'])\n"
    )
    snapshot = f"{plain.store_dir}/{'1' * 32}-a-snapshot"
    code, out, err = run(
        capfd, "store-build", "--socket", plain.socket, "--resume-from", snapshot, str(recipe)
    )
    assert (code, out) == (2, "")
    assert err.startswith(
        "store-build: --resume-from seeds one derivation's build; the target names 2\n"
    ), err


def test_store_status_counts_evicted_builds_waiting(
    plain: DaemonProc, capfd: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capfd, "store-status", "--socket", plain.socket)
    assert code == 0
    assert "retries waiting: 0, evicted waiting: 0" in out.splitlines()[2], out


def test_the_scopes_in_effect_merge_the_request_over_weft_toml(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A request's own pair may be valid and the pair in effect not: only the daemon
    knows its weft.toml, so it refuses (exit 1, the rule's words)."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "weft.toml").write_text('snapshot-on-pause = "data"\nsnapshot-on-commit = "data"\n')
    d = start_daemon(state)
    try:
        missing = f"{d.store_dir}/{'0' * 32}-app.drv"
        args = ("store-build", "--socket", d.socket, "--no-retry")
        code, _, err = run(capfd, *args, "--on-commit", "full", missing)
        assert code == 1
        assert err == (
            "error: on-commit (full) must be a subset of on-pause (data): "
            "with on-pause = data, set on-commit = data too\n"
        )
        # With the request's on-pause full, the settings' on-commit data is a subset.
        code, _, err = run(capfd, *args, "--on-pause", "full", missing)
        assert code == 1 and "subset" not in err and "app.drv" in err, err
    finally:
        stop_daemon(d)

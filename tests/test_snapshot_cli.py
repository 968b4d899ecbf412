"""The snapshot options and commands refusing what they cannot mean, with no daemon
(issue 22, docs/snapshots.md): the scope table of the issue through `store-build` (exit 2
and the rule's words, before any daemon is asked), the other snapshot options' usage,
`store-snapshot`'s usage and its listing.  The commands run in this process against a
state dir that holds no store: reaching for the daemon would be exit 1, "no store at"."""

import sys
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.cli.snapshot import age, table
from tests.test_durabledirs import SCOPE_RULE

UNKNOWN_SCOPES = ["memory", "Full", "DATA", "process", ""]


@pytest.fixture
def nowhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Options naming a state dir with no store in it (and no default to fall back on)."""
    monkeypatch.setenv("WEFT_STATE_DIR", str(tmp_path / "default"))
    return ["--state-dir", str(tmp_path / "no-store")]


def run(capfd: pytest.CaptureFixture[str], name: str, *args: str) -> tuple[int, str, str]:
    code = main.run(name, list(args))
    sys.stdout.flush()
    out, err = capfd.readouterr()
    return code, out, err


def _scope_options(on_pause: str | None, on_commit: str | None) -> list[str]:
    options = [] if on_pause is None else [f"--on-pause={on_pause}"]
    return options + ([] if on_commit is None else [f"--on-commit={on_commit}"])


@pytest.mark.parametrize(("on_pause", "on_commit"), list(SCOPE_RULE))
def test_store_build_applies_the_subset_rule_before_asking_the_daemon(
    on_pause: str | None,
    on_commit: str | None,
    nowhere: list[str],
    capfd: pytest.CaptureFixture[str],
) -> None:
    scopes = _scope_options(on_pause, on_commit)
    code, out, err = run(capfd, "store-build", *nowhere, *scopes, "/x/y-a.drv")
    assert out == ""
    if SCOPE_RULE[on_pause, on_commit]:
        assert code == 1 and "no store at" in err, err
    else:
        assert code == 2, err
        assert err.startswith(
            f"store-build: error: on-commit ({on_commit or 'unset, so full'}) must be a subset "
            "of on-pause (data): with on-pause = data, set on-commit = data too\n"
            "usage: store-build "
        ), err


def test_on_pause_data_alone_is_refused_and_on_commit_data_alone_is_not(
    nowhere: list[str], capfd: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capfd, "store-build", *nowhere, "--on-pause", "data", "/x/y-a.drv")
    assert code == 2 and "must be a subset of on-pause (data)" in err
    code, _, err = run(capfd, "store-build", *nowhere, "--on-commit", "data", "/x/y-a.drv")
    assert code == 1 and "no store at" in err


@pytest.mark.parametrize("flag", ["--on-pause", "--on-commit"])
@pytest.mark.parametrize("scope", UNKNOWN_SCOPES)
def test_store_build_refuses_an_unknown_scope_naming_it(
    flag: str, scope: str, nowhere: list[str], capfd: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capfd, "store-build", *nowhere, f"{flag}={scope}", "/x/y-a.drv")
    assert code == 2
    assert err.startswith(
        f"store-build: error: {flag[2:]}: unknown snapshot scope {scope!r} (one of full, data)"
    ), err


@pytest.mark.parametrize("scope", UNKNOWN_SCOPES)
def test_commit_refuses_an_unknown_scope(
    scope: str, nowhere: list[str], capfd: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        capfd, "store-build", *nowhere, "--commit", "/x/y-a.drv", f"--on-commit={scope}"
    )
    assert code == 2 and f"unknown snapshot scope {scope!r}" in err, err


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--commit", "/x/y-a.drv", "/x/z-b.drv"], "--commit snapshots a running build"),
        (["--commit", "/x/y-a.drv", "--on-pause", "data"], "not --on-pause"),
        (["--commit", "/x/y-a.drv", "--resume-from", "/x/s"], "not --resume-from"),
        (["--commit", "/x/y-a.drv", "--keep-failed"], "not --keep-failed"),
        (["--resume-from", "/x/s", "/x/y-a.drv", "/x/z-b.drv"], "2 targets were given"),
        (["--resume-from", "", "/x/y-a.drv"], "--resume-from needs a value"),
    ],
)
def test_snapshot_options_that_mean_nothing_together_are_usage_errors(
    args: list[str], says: str, nowhere: list[str], capfd: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capfd, "store-build", *nowhere, *args)
    assert (code, out) == (2, "")
    assert says in err and "usage: store-build" in err, err


def test_a_valid_commit_and_resume_go_to_the_daemon(
    nowhere: list[str], capfd: pytest.CaptureFixture[str]
) -> None:
    for args in (
        ["--commit", "/x/y-a.drv"],
        ["--commit", "/x/y-a.drv", "--on-commit", "data"],
        ["--resume-from", "/x/s", "--on-commit", "full", "/x/y-a.drv"],
    ):
        code, _, err = run(capfd, "store-build", *nowhere, *args)
        assert code == 1 and "no store at" in err, (args, err)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ([], "give one derivation or output path, or --forget SNAPSHOT"),
        (["/x/a.drv", "/x/b.drv"], "give one derivation"),
        (["--forget", "/x/s", "/x/t"], "--forget takes one snapshot"),
        (["--forget"], "--forget needs a value"),
        (["--bogus", "/x/a.drv"], "unknown option --bogus"),
    ],
)
def test_store_snapshot_usage_errors(
    args: list[str], says: str, nowhere: list[str], capfd: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capfd, "store-snapshot", *nowhere, *args)
    assert (code, out) == (2, "")
    assert err.startswith(f"store-snapshot: {says}") and "usage: store-snapshot" in err, err


def test_help_names_the_snapshot_options(capfd: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capfd, "store-build", "--help")
    assert code == 0
    for flag in ("--on-pause SCOPE", "--on-commit SCOPE", "--resume-from SNAPSHOT", "--commit DRV"):
        assert flag in out
    code, out, _ = run(capfd, "store-snapshot", "--help")
    assert code == 0 and "--forget SNAPSHOT" in out and "--json" in out


def test_ages_are_shown_in_their_largest_whole_unit() -> None:
    assert [age(s) for s in (0, 59.9, 60, 3599, 3600, 86399, 86400 * 3 + 5, -2)] == [
        "0s",
        "59s",
        "1m",
        "59m",
        "1h",
        "23h",
        "3d",
        "0s",
    ]


def test_the_listing_has_a_row_per_snapshot_under_aligned_columns() -> None:
    record = {
        "path": "/s/abc-app-snapshot",
        "drv": "/s/def-app.drv",
        "state": "committed",
        "scope": "data",
        "reason": "failed",
        "attempt": 2,
        "nar_size": 3 << 20,
        "created": 1000.0,
    }
    shown = table([record, {**record, "state": "paused", "reason": "evicted"}], 1000.0 + 7200)
    assert [line.split() for line in shown] == [
        ["path", "state", "scope", "reason", "attempt", "size", "age"],
        ["/s/abc-app-snapshot", "committed", "data", "failed", "2", "3.0", "MiB", "2h"],
        ["/s/abc-app-snapshot", "paused", "data", "evicted", "2", "3.0", "MiB", "2h"],
    ]
    column = shown[0].index("state")
    assert shown[1].index("committed") == shown[2].index("paused") == column

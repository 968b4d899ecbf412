"""The remote policy's decisions (daemon/remote/policy.py), the settings that feed it and
`store-build --remote`: no engine needed."""

import pytest

from daemon.cli.build import REMOTE_POLICIES, build_args
from daemon.cli.common import UsageError
from daemon.remote.policy import (
    Fallback,
    Policy,
    Where,
    choose,
    effective,
    on_unavailable,
    parse_policy,
    unoffloadable,
)
from daemon.settings import Settings
from store.layout import ConfigError

ENDPOINT = "unix:///run/bgd.sock"


def test_without_an_endpoint_nothing_goes_remote_whatever_is_asked() -> None:
    assert effective(Policy.ALL, Policy.ALL, "") is Policy.NONE
    assert effective(None, Policy.OVERFLOW, "") is Policy.NONE


def test_a_request_s_policy_wins_over_the_settings() -> None:
    assert effective(Policy.NONE, Policy.ALL, ENDPOINT) is Policy.NONE
    assert effective(Policy.ALL, Policy.OVERFLOW, ENDPOINT) is Policy.ALL
    assert effective(None, Policy.ALL, ENDPOINT) is Policy.ALL


def test_overflow_goes_remote_only_when_no_local_slot_is_free() -> None:
    assert choose(Policy.OVERFLOW, {}, local_free=True).where is Where.LOCAL
    assert choose(Policy.OVERFLOW, {}, local_free=False).where is Where.REMOTE


def test_all_goes_remote_even_with_local_slots_free() -> None:
    assert choose(Policy.ALL, {}, local_free=True).where is Where.REMOTE


def test_none_stays_local_without_a_word() -> None:
    choice = choose(Policy.NONE, {}, local_free=False)
    assert choice.where is Where.LOCAL and choice.why == ""


@pytest.mark.parametrize("value", ["1", "true", " True "])
def test_a_derivation_preferring_local_builds_stays_local_and_says_so(value: str) -> None:
    choice = choose(Policy.ALL, {"preferLocalBuild": value}, local_free=False)
    assert choice.where is Where.LOCAL
    assert "preferLocalBuild" in choice.why


def test_prefer_local_build_set_to_an_empty_string_is_no_wish() -> None:
    assert choose(Policy.ALL, {"preferLocalBuild": ""}, local_free=True).where is Where.REMOTE


def test_a_closure_named_in_utf8_may_go_remote() -> None:
    assert unoffloadable("/tmp/x/store", ["/tmp/x/store/abc-héllo"]) == ""


def test_a_closure_with_a_name_that_is_not_utf8_stays_local_and_names_it() -> None:
    bad = b"/tmp/x/store/abc-\xff\xfe".decode("utf-8", "surrogateescape")
    why = unoffloadable("/tmp/x/store", ["/tmp/x/store/ok", bad])
    assert why.startswith("built locally:")
    assert "abc-\\xff\\xfe" in why


def test_a_store_dir_not_named_in_utf8_keeps_every_build_local() -> None:
    store_dir = b"/tmp/\xff/store".decode("utf-8", "surrogateescape")
    assert "store dir" in unoffloadable(store_dir, [])


def test_an_unreachable_engine_falls_back_to_a_local_build_with_a_warning() -> None:
    fallback, line = on_unavailable(Policy.OVERFLOW, True, "connection refused")
    assert fallback is Fallback.LOCAL
    assert line.startswith("warning:") and "connection refused" in line


def test_an_unreachable_engine_fails_the_build_when_local_fallback_is_off() -> None:
    fallback, line = on_unavailable(Policy.ALL, False, "connection refused")
    assert fallback is Fallback.FAIL
    assert "remote-fallback" in line


def test_an_unknown_policy_name_is_refused_with_the_names_there_are() -> None:
    with pytest.raises(ValueError, match="all, overflow, none"):
        parse_policy("some", "remote-policy")


def test_remote_settings_are_read_from_weft_toml() -> None:
    settings = Settings.from_toml(
        'remote-endpoint = "unix:///run/bgd.sock"\n'
        'remote-instance = "main"\n'
        "remote-max-jobs = 8\n"
        'remote-policy = "all"\n'
        "remote-fallback = false\n"
        '[remote-platform]\ngpu = "none"\n'
    )
    assert settings.remote_endpoint == "unix:///run/bgd.sock"
    assert settings.remote_instance == "main"
    assert settings.remote_max_jobs == 8
    assert settings.remote is Policy.ALL
    assert settings.remote_fallback is False
    assert settings.remote_platform == {"gpu": "none"}


def test_the_remote_policy_defaults_to_overflow() -> None:
    assert Settings().remote is Policy.OVERFLOW
    assert Settings().remote_endpoint == ""


@pytest.mark.parametrize(
    ("line", "what"),
    [
        ('remote-policy = "sometimes"', "remote-policy must be one of"),
        ('remote-endpoint = "/run/bgd.sock"', "is not unix:///"),
        ("remote-max-jobs = 0", "out of range"),
        ('[remote-platform]\nweft-store-dir = "/x"', "set by weft itself"),
        ("[remote-platform]\ncount = 3", "must be a string"),
    ],
)
def test_bad_remote_settings_are_refused_at_start(line: str, what: str) -> None:
    with pytest.raises(ConfigError, match=what):
        Settings.from_toml(line + "\n")


@pytest.mark.parametrize("endpoint", ["grpc://127.0.0.1:50051", "localhost:8980"])
def test_host_and_port_endpoints_are_accepted(endpoint: str) -> None:
    assert Settings.from_toml(f'remote-endpoint = "{endpoint}"\n').remote_endpoint == endpoint


def test_store_build_passes_its_remote_policy_on() -> None:
    assert build_args({"--remote": "none"})["remote"] == "none"
    assert "remote" not in build_args({})


def test_store_build_refuses_an_unknown_remote_policy() -> None:
    with pytest.raises(UsageError, match="--remote takes one of"):
        build_args({"--remote": "always"})


def test_a_build_with_durable_directories_stays_local() -> None:
    choice = choose(Policy.ALL, {}, local_free=False, durable=True)
    assert choice.where is Where.LOCAL and "durable" in choice.why


def test_a_request_keeping_failed_builds_builds_locally() -> None:
    choice = choose(Policy.ALL, {}, local_free=False, keep_failed=True)
    assert choice.where is Where.LOCAL and "--keep-failed" in choice.why


def test_a_build_seeded_with_a_snapshot_builds_locally() -> None:
    # `--resume-from` restores the snapshot into a local build dir: a remote build would
    # silently start from nothing.
    choice = choose(Policy.ALL, {}, local_free=False, resumed=True)
    assert choice.where is Where.LOCAL and "snapshot" in choice.why


def test_store_build_knows_the_policies_the_daemon_knows() -> None:
    # A copy in the command, which does not import the daemon's modules.
    assert tuple(p.value for p in Policy) == REMOTE_POLICIES

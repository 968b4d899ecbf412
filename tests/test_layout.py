import os
from pathlib import Path

import pytest

from daemon.settings import Settings
from store.defaults import default_state_dir
from store.layout import ConfigError, StateDir


def test_default_state_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEFT_STATE_DIR", raising=False)
    if os.geteuid() == 0:
        assert default_state_dir() == "/var/lib/weft"
    monkeypatch.setenv("WEFT_STATE_DIR", "/tmp/somewhere")
    assert default_state_dir() == "/tmp/somewhere"


def test_layout_is_created(tmp_path: Path) -> None:
    sd = StateDir.at(tmp_path / "s")
    sd.create()
    for d in (
        sd.store_dir,
        sd.links_dir,
        sd.tmp_dir,
        sd.db_dir,
        sd.gcroots_dir / "auto",
        sd.log_dir,
    ):
        assert d.is_dir()
    assert sd.store_dir == tmp_path / "s" / "store"
    assert sd.db_path == tmp_path / "s" / "var" / "db" / "db.sqlite"


def test_state_dir_with_separator_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="may not contain"):
        StateDir.at(tmp_path / "a:b")


def test_settings_parse_and_errors() -> None:
    s = Settings.from_toml('trusted-users = ["root", "alice"]')
    assert s.trusted_users == ["root", "alice"]
    assert s.allowed_users == ["*"]
    with pytest.raises(ConfigError, match="unknown setting 'max-jbos'"):
        Settings.from_toml("max-jbos = 3")
    with pytest.raises(ConfigError, match="must be a list"):
        Settings.from_toml('trusted-users = "root"')
    with pytest.raises(ConfigError, match=r"weft\.toml"):
        Settings.from_toml("this is not toml")

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import apsw
import pytest

from daemon.cli.blocking import BlockingClient
from daemon.settings import Settings
from store import Store
from store.defaults import default_state_dir, has_store
from store.layout import ConfigError, StateDir
from tests.daemon_fixtures import run_as_nobody, start_daemon, stop_daemon

ROOT = Path(__file__).parent.parent


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


# Who may read what (docs/store-paths.md): the store is everyone's, as in Nix; the
# database, roots, logs and scratch are the daemon's.
PUBLIC = ("", "store", "store/.links")
PRIVATE = ("store/.tmp", "var/db", "var/gcroots", "var/gcroots/auto", "var/log")


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o077, 0o000, 0o022], ids=lambda m: f"umask {m:03o}")
def test_the_store_is_public_and_the_daemons_records_private_whatever_the_umask(
    tmp_path: Path, umask: int
) -> None:
    old = os.umask(umask)
    try:
        with Store.open(tmp_path / "state") as s:
            s.add_text("note", "written so the WAL files exist")
            root = s.state.root
            assert {d: _mode(root / d) for d in PUBLIC} == dict.fromkeys(PUBLIC, 0o755)
            assert {d: _mode(root / d) for d in PRIVATE} == dict.fromkeys(PRIVATE, 0o700)
            db_files = [p for p in s.state.db_dir.iterdir()]
            assert {p.name for p in db_files} >= {"db.sqlite", "db.sqlite-wal", "db.sqlite-shm"}
            assert {p.name: _mode(p) for p in db_files} == {p.name: 0o600 for p in db_files}
            assert s.state.has_store() and has_store(str(root))
    finally:
        os.umask(old)


def test_a_state_dir_made_by_an_older_weft_is_made_private_when_opened(tmp_path: Path) -> None:
    sd = StateDir.at(tmp_path / "old")
    for d in PRIVATE:
        (sd.root / d).mkdir(parents=True)
        os.chmod(sd.root / d, 0o755)
    apsw.Connection(str(sd.db_path)).execute("PRAGMA journal_mode = WAL").fetchall()
    os.chmod(sd.db_path, 0o644)
    with Store(sd):
        assert {d: _mode(sd.root / d) for d in PRIVATE} == dict.fromkeys(PRIVATE, 0o700)
        assert _mode(sd.db_path) == 0o600


def test_other_users_read_the_store_but_not_the_database_roots_or_logs() -> None:
    where = Path(tempfile.mkdtemp(prefix="weft-modes-", dir="/var/tmp"))
    try:
        where.chmod(0o755)
        d = start_daemon(where / "state")
        try:
            with BlockingClient(d.socket) as c:
                path = c.call("add-text", name="public", text="anyone may read this")["path"]
            code = textwrap.dedent(f"""
                import os
                print(open({path!r}).read())
                for p in ("var/db/db.sqlite", "var/gcroots", "var/log", "store/.tmp"):
                    full = os.path.join({str(d.state)!r}, p)
                    try:
                        os.listdir(full) if os.path.isdir(full) else open(full, "rb")
                        print(p, "read")
                    except PermissionError:
                        print(p, "refused")
            """)
            out = run_as_nobody(code)
            assert out.returncode == 0, out.stderr
            assert out.stdout.splitlines() == [
                "anyone may read this",
                "var/db/db.sqlite refused",
                "var/gcroots refused",
                "var/log refused",
                "store/.tmp refused",
            ]
        finally:
            stop_daemon(d)
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_the_offline_store_command_makes_no_store_where_none_was_asked_for(
    tmp_path: Path,
) -> None:
    typo = tmp_path / "stat"
    cmd = [sys.executable, "-m", "store", "--state-dir", str(typo)]
    refused = subprocess.run([*cmd, "verify"], capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 1
    assert f"no store at {typo}; --init creates one" in refused.stderr
    assert not typo.exists()
    made = subprocess.run([*cmd, "--init", "verify"], capture_output=True, text=True, cwd=ROOT)
    assert made.returncode == 0, made.stderr
    assert has_store(str(typo))

"""What a farm is made of and where it lives: DIR/farm.json (the record `stop` reads), the
socket and PostgreSQL placement, and bgd's configuration written from bgd.yml.template."""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import farmpg
from farmprocs import Proc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# The engine's venv (install.sh's); another one (a BuildGrid of another version) for a try-out.
ENGINE = Path(os.environ.get("WEFT_FARM_ENGINE", ROOT / ".venv-bgd"))
WORKER = ROOT / ".venv" / "bin" / "store-worker"
# The longest socket path put inside DIR; a longer one (the limit is 107 bytes, and PostgreSQL
# appends its own file name) goes to a short private directory under /tmp.
MAX_SOCKET_PATH = 90
# The polls and assigner interval of the engine (seconds): ~50 ms per trivial action.
POLL_INTERVAL = 0.02
# A worker silent for this long (no UpdateBotSession) is dead: its leases are given again.
DEFAULT_BOT_TIMEOUT = 10
# Server threads: each Execute stream and each bot's long poll holds one for its duration.
THREADS = 128


@dataclass
class Farm:
    """What `start` made, as DIR/farm.json records it."""

    dir: Path
    endpoint: str
    socket_dir: str
    pg_home: str
    pg_private: bool
    instance: str = ""
    store_dir: str | None = None
    bot_timeout: int = DEFAULT_BOT_TIMEOUT
    property_keys: list[str] = field(default_factory=list)
    # Workers are numbered in the order they are started; a killed one's number is not reused.
    next_worker: int = 0
    keeper: Proc | None = None
    bgd: Proc | None = None
    workers: dict[int, Proc] = field(default_factory=dict)

    @property
    def state_file(self) -> Path:
        return self.dir / "farm.json"

    def save(self) -> None:
        data = {
            "endpoint": self.endpoint,
            "socket_dir": self.socket_dir,
            "pg_home": self.pg_home,
            "pg_private": self.pg_private,
            "instance": self.instance,
            "store_dir": self.store_dir,
            "bot_timeout": self.bot_timeout,
            "property_keys": self.property_keys,
            "next_worker": self.next_worker,
            "keeper": self.keeper.to_json() if self.keeper else None,
            "bgd": self.bgd.to_json() if self.bgd else None,
            "workers": {str(i): p.to_json() for i, p in self.workers.items()},
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(self.state_file)

    @classmethod
    def load(cls, dir: Path) -> Farm | None:
        try:
            data = json.loads((dir / "farm.json").read_text())
        except FileNotFoundError:
            return None
        farm = cls(dir=dir, **{k: data[k] for k in _SCALARS})
        farm.keeper = Proc.from_json(data["keeper"]) if data["keeper"] else None
        farm.bgd = Proc.from_json(data["bgd"]) if data["bgd"] else None
        farm.workers = {int(i): Proc.from_json(p) for i, p in data["workers"].items()}
        return farm

    def cluster(self) -> farmpg.Cluster:
        return farmpg.Cluster(home=Path(self.pg_home), bindir=farmpg.bindir())


_SCALARS = (
    "endpoint",
    "socket_dir",
    "pg_home",
    "pg_private",
    "instance",
    "store_dir",
    "bot_timeout",
    "property_keys",
    "next_worker",
)


def engine_version() -> str:
    try:
        return (ENGINE / "weft-engine").read_text().strip()
    except FileNotFoundError:
        raise SystemExit(f"farm: no engine in {ENGINE}: run install.sh") from None


def uses_psycopg2() -> bool:
    # BuildGrid 0.4 (the one Debian's Python 3.11 installs) speaks psycopg2; 0.9 psycopg 3.
    return "==0.4." in engine_version()


def place(dir: Path) -> tuple[str, str, bool]:
    """(socket dir, PostgreSQL home, whether that home is private under /tmp)."""
    socket_dir = str(dir)
    if len(str(dir / "bgd.sock")) > MAX_SOCKET_PATH:
        socket_dir = tempfile.mkdtemp(prefix="weft-farm-")
    home = dir / "pg"
    if home.is_symlink():
        home.unlink()  # a private home of an earlier run, gone with it
    if len(str(home / ".s.PGSQL.5432")) <= MAX_SOCKET_PATH:
        farmpg.prepare_home(home)
        if farmpg.postgres_can_use(home):
            return socket_dir, str(home), False
        shutil.rmtree(home)
    # The postgres user cannot reach DIR (a root-only parent, as pytest's tmp dirs are), or the
    # path is too long for a socket: the cluster lives in a directory of its own.
    private = Path(tempfile.mkdtemp(prefix="weft-farm-pg-"))
    farmpg.prepare_home(private)
    home.symlink_to(private)
    return socket_dir, str(private), True


def write_config(farm: Farm) -> Path:
    template = string.Template((HERE / "bgd.yml.template").read_text())
    keys = ["weft-store-dir", *farm.property_keys]
    text = template.substitute(
        address=json.dumps(farm.endpoint),
        connection=json.dumps(farmpg.connection_string(farm.cluster(), uses_psycopg2())),
        cas=json.dumps(str(farm.dir / "cas")),
        poll=POLL_INTERVAL,
        bot_timeout=farm.bot_timeout,
        match_keys=json.dumps(sorted(set(keys))),
        instance=json.dumps(farm.instance),
        threads=THREADS,
    )
    config = farm.dir / "bgd.yml"
    config.write_text(text)
    return config

"""The farm's private PostgreSQL cluster: the execution service's queue and bot sessions.

A cluster of its own (not the machine's), listening on a Unix socket only
(`listen_addresses = ''`), run as the `postgres` user (PostgreSQL refuses root). A fresh
cluster is a copy of a template made once per PostgreSQL and BuildGrid version (initdb, the
`bgd` database and BuildGrid's migrations take 3 s; a copy takes a tenth of that) and kept in
the engine's venv.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

PG_USER = "postgres"
DATABASE = "bgd"
# A private cluster for tests and small farms: commits do not wait for the WAL to reach the disk
# (a crash loses the last moments of queue state, never the cluster's consistency).
SERVER_SETTINGS = "-c listen_addresses='' -c synchronous_commit=off -c max_connections=200"
# How long PostgreSQL may take to start or stop (it takes well under a second here).
PG_CTL_TIMEOUT = 60
# `pg_ctl status`'s exit code for "no server running".
PG_CTL_NOT_RUNNING = 3


@dataclass
class Cluster:
    """Where a cluster lives: `home` holds `data/`, the socket and the log."""

    home: Path
    bindir: Path

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def log(self) -> Path:
        return self.home / "log"


def bindir() -> Path:
    """The newest installed PostgreSQL's programs (Debian keeps them per major version)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key)
    if not found:
        raise SystemExit("farm: PostgreSQL is not installed (apt-get install postgresql)")
    return Path(found[-1]).parent


def _version_key(path: str) -> tuple[int, ...]:
    version = Path(path).parent.parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def _as_postgres(argv: list[str]) -> None:
    subprocess.run(
        ["runuser", "-u", PG_USER, "--", *argv],
        check=True,
        cwd="/",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def postgres_can_use(path: Path) -> bool:
    """Whether the postgres user can reach and write `path` (every parent must let it pass)."""
    probe = subprocess.run(["runuser", "-u", PG_USER, "--", "test", "-w", str(path)], cwd="/")
    return probe.returncode == 0


def prepare_home(home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    shutil.chown(home, PG_USER)
    home.chmod(0o700)


def start(cluster: Cluster) -> None:
    options = f"{SERVER_SETTINGS} -c unix_socket_directories='{cluster.home}'"
    pg_ctl = [str(cluster.bindir / "pg_ctl"), "-D", str(cluster.data), "-l", str(cluster.log)]
    _as_postgres([*pg_ctl, "-w", "-t", str(PG_CTL_TIMEOUT), "-s", "-o", options, "start"])


def stop(cluster: Cluster) -> None:
    """Stop the cluster if it runs (a fast shutdown: open sessions are ended)."""
    if not (cluster.data / "postmaster.pid").exists():
        return
    pg_ctl = [str(cluster.bindir / "pg_ctl"), "-D", str(cluster.data)]
    try:
        _as_postgres([*pg_ctl, "-w", "-s", "-m", "fast", "-t", str(PG_CTL_TIMEOUT), "stop"])
    except subprocess.CalledProcessError:
        # A postmaster killed outright leaves its pid file: nothing runs, nothing to stop.
        status = subprocess.run(
            ["runuser", "-u", PG_USER, "--", *pg_ctl, "status"], cwd="/", capture_output=True
        )
        if status.returncode != PG_CTL_NOT_RUNNING:
            raise


def connection_string(cluster: Cluster, psycopg2: bool) -> str:
    driver = "postgresql+psycopg2" if psycopg2 else "postgresql+psycopg"
    return f"{driver}://{PG_USER}@/{DATABASE}?host={cluster.home}"


def create(cluster: Cluster, template: Path, migrate: list[str], psycopg2: bool) -> None:
    """A new cluster in `cluster.home`, with BuildGrid's database, from the template (made
    first when there is none)."""
    if not template.is_dir():
        _make_template(cluster.bindir, template, migrate, psycopg2)
    subprocess.run(["cp", "-a", str(template), str(cluster.data)], check=True)


def _make_template(bindir: Path, template: Path, migrate: list[str], psycopg2: bool) -> None:
    # Built in a directory postgres can reach, then moved in place: concurrent farms that both
    # make one leave a complete template either way.
    work = Path(tempfile.mkdtemp(prefix="weft-farm-template-"))
    try:
        scratch = Cluster(home=work, bindir=bindir)
        prepare_home(work)
        initdb = [str(bindir / "initdb"), "-D", str(scratch.data), "-A", "trust"]
        _as_postgres([*initdb, "-U", PG_USER, "-E", "UTF8", "--no-sync"])
        start(scratch)
        try:
            _as_postgres([str(bindir / "createdb"), "-h", str(work), DATABASE])
            subprocess.run(
                [*migrate, connection_string(scratch, psycopg2)],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        finally:
            stop(scratch)
        template.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=".staged-", dir=template.parent))
        subprocess.run(["cp", "-a", str(scratch.data), str(staged / "data")], check=True)
        # Another farm may have put its template there first: then this one is not needed.
        with contextlib.suppress(OSError):
            os.rename(staged / "data", template)
        shutil.rmtree(staged, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

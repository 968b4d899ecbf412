"""The daemon's path-info cache answers what the database holds now: a path deleted, or
changed by another process writing the database, is never answered from before it, and
the cache stays bounded; the composition root makes it, and the path-info queries find it
in the services they are given.  Real daemons and real stores, under /tmp and /var/tmp."""

import io
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from bench.daemons import DaemonProc, start_daemon, stop_daemon
from daemon.cli.blocking import BlockingClient, DaemonError
from daemon.proc.workers import Workers
from daemon.rpc import infocache
from daemon.rpc.infocache import InfoCache
from daemon.rpc.ops.paths import path_info, path_infos
from daemon.rpc.services import Services
from daemon.settings import Settings
from daemon.upkeep.collector import Collector
from daemon.wire import protocol as p
from daemon.wire.protocol import Packed
from store.store import Store


@pytest.fixture(params=["/tmp", "/var/tmp"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    with (
        tempfile.TemporaryDirectory(prefix="weft-infocache-", dir=request.param) as tmp,
        Store.open(Path(tmp) / "state") as s,
    ):
        yield s


@pytest.fixture
def services(store: Store) -> Iterator[Services]:
    """The services of a daemon without builds over `store`, as its tests make them."""
    settings, workers = Settings(), Workers()
    infos = InfoCache(str(store.db.path))
    yield Services(
        store.state, store, settings, Collector(store, settings, workers), workers, infos
    )
    infos.forget()


@pytest.fixture
def var_tmp_daemon() -> Iterator[DaemonProc]:
    with tempfile.TemporaryDirectory(prefix="weft-infocache-", dir="/var/tmp") as tmp:
        d = start_daemon(Path(tmp) / "state", "--grace", "5")
        try:
            yield d
        finally:
            stop_daemon(d)
        assert d.proc.returncode == 0, d.log.read_text()


class Counting:
    """A fetch that answers from the store, counting the paths it was asked about."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.asked: list[str] = []

    def __call__(self, paths: list[str]) -> list[Any]:
        self.asked += paths
        infos = self.store.path_infos(paths)
        return [{"path": p} if p in infos else KeyError(p) for p in paths]


def _unpacked(answer: Packed) -> Any:
    return msgpack.unpackb(answer.body)


def _texts(store: Store, n: int, tag: str = "") -> list[str]:
    return [i.path for i in store.add_texts([(f"t{tag}{i}", f"{tag}{i}", []) for i in range(n)])]


def test_a_kept_info_is_asked_of_the_database_again_once_another_process_wrote_it(
    store: Store,
) -> None:
    paths = _texts(store, 3)
    cache, fetch = InfoCache(str(store.db.path)), Counting(store)
    assert [a["path"] for a in cache.lookup(paths, fetch)] == paths
    assert [a["path"] for a in cache.lookup(paths, fetch)] == paths
    assert fetch.asked == paths  # the second batch came from the cache

    # Another process commits a write: whatever it changed, nothing kept is trusted.
    code = (
        "import sys; from store.store import Store\n"
        "with Store.open(sys.argv[1]) as s: s.add_text('other', 'other', [])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(store.state.root)], check=True)
    cache.lookup(paths, fetch)
    assert fetch.asked == paths + paths
    cache.forget()


def test_a_deleted_path_is_answered_not_valid_though_its_info_was_kept(
    var_tmp_daemon: DaemonProc,
) -> None:
    d = var_tmp_daemon
    with BlockingClient(d.socket) as adder:  # its pin on the path ends with it
        path = adder.call("add-text", name="doomed", text="doomed")["path"]
    with BlockingClient(d.socket) as c:
        for _ in range(3):
            assert c.call("path-info", path=path)["path"] == path
        deleted = c.download("gc", io.BytesIO().write, paths=[path])["deleted"]
        assert deleted == 1
        with pytest.raises(DaemonError) as e:
            c.call("path-info", path=path)
        assert e.value.code == "not-valid"
        # Many at once (one batch, the cache's `many` form) say the same.
        answers = c.call_many([("path-info", {"path": path})] * 5)
        assert all(isinstance(a, DaemonError) and a.code == "not-valid" for a in answers)


def test_a_path_not_valid_yet_is_asked_again_and_found_once_added(services: Services) -> None:
    store = services.store
    path = _texts(store, 1, "later")[0]
    with store.db.connection() as conn:  # gone behind the store's back, as by a collection
        conn.execute("DELETE FROM ValidPaths WHERE path = ?", (path,))
    with pytest.raises(Exception, match="not valid"):
        path_info(services, {"path": path})
    assert services.infos._infos == {}  # not kept: asked of the database again
    assert _texts(store, 1, "later") == [path]
    assert _unpacked(path_info(services, {"path": path}))["path"] == path
    assert path_infos(services, [{"path": path}] * 2) == [path_info(services, {"path": path})] * 2
    assert list(services.infos._infos) == [path]


def test_the_cache_keeps_at_most_its_bound_and_keeps_nothing_when_it_cannot_check(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(infocache, "MAX_ENTRIES", 8)
    store, cache = services.store, services.infos
    paths = _texts(store, 20)
    fetch = Counting(store)
    cache.lookup(paths, fetch)
    assert len(cache._infos) == 8
    cache.lookup(paths[-8:], fetch)  # the newest are those kept
    assert fetch.asked == paths
    # The oldest kept, asked with more than the bound of others: answered all the same.
    answers = cache.lookup([paths[-8], *paths[:12]], fetch)
    assert [a["path"] for a in answers] == [paths[-8], *paths[:12]]
    assert len(cache._infos) == 8

    blind, fetch = InfoCache(str(store.state.root / "no-such-dir" / "db")), Counting(store)
    for _ in range(2):
        assert [a["path"] for a in blind.lookup(paths[:2], fetch)] == paths[:2]
    assert fetch.asked == paths[:2] * 2
    assert blind._infos == {}


def test_a_packed_result_reaches_the_client_as_the_value_it_encodes() -> None:
    server, client = p.Connection(p.Role.SERVER), p.Connection(p.Role.CLIENT)
    server.receive_data(client.send(p.Hello()))
    assert isinstance(server.next_event(), p.Hello)
    client.receive_data(server.send(p.Welcome(1, "test")))
    assert client.next_event() == p.Welcome(1, "test")
    server.receive_data(client.send(p.Request(7, "path-info", {"path": "x"})))
    assert server.next_event() == p.Request(7, "path-info", {"path": "x"})
    value = {"path": "x", "references": ["a", "b"], "sigs": [], "deriver": None}
    client.receive_data(server.send(p.Reply(7, p.packed(value))))
    reply = client.next_event()
    assert isinstance(reply, p.Reply) and reply.id == 7 and reply.result == value


def test_the_cache_s_connection_never_holds_back_a_checkpoint_of_the_log(store: Store) -> None:
    paths = _texts(store, 3)
    cache = InfoCache(str(store.db.path))
    cache.lookup(paths, Counting(store))
    _texts(store, 2, "more")
    cache.lookup(paths, Counting(store))  # checked again, after a write
    with store.db.connection() as conn:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()[0]
    assert busy == 0
    cache.forget()

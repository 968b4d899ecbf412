"""The collector's own foreign-key checks (`store/gc/unregister.py`) against the database's:
the same paths kept and deleted either way, the schema they stand in for checked first, and
the connection given back as it was lent."""

import os
from pathlib import Path

import pytest

from store import Store, gc
from store.gc import unregister
from tests.test_gc import _all_valid, _consistent, _text
from tests.test_store import a_derivation


@pytest.fixture(params=["collector's checks", "database's checks"])
def checks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "database's checks":
        # A schema the collector does not know: it leaves every check to the database.
        monkeypatch.setattr(unregister, "KNOWN_FOREIGN_KEYS", frozenset())
    return str(request.param)


def _count(store: Store, sql: str) -> int:
    with store.db.connection() as conn:
        return int(conn.execute(sql).fetchone()[0])


def test_the_foreign_keys_into_valid_paths_are_the_ones_stood_in_for(store: Store) -> None:
    with store.db.connection() as conn:
        assert unregister.checks_known(conn)


def test_a_path_added_after_the_marking_keeps_its_dead_closure(store: Store, checks: str) -> None:
    base = _text(store, "base")
    mid = _text(store, "mid", (base,))
    others = [_text(store, f"o{i}", (base,)) for i in range(3)]
    plan = gc.plan(store)
    user = _text(store, "user", (mid,))  # unpinned: only the database keeps mid alive
    result = gc.delete(store, plan, batch_size=2)
    assert set(result.deleted) == set(others)
    assert set(result.kept) == {mid, base}
    assert _all_valid(store) == {base, mid, user}
    _consistent(store)


def test_a_self_reference_and_derivation_outputs_go_with_their_paths(
    store: Store, tmp_path: Path, checks: str
) -> None:
    drv = a_derivation(store, "selfish")
    out_path = f"{store.store_dir}/{store.parse(drv).hash_part}-selfish"
    src = tmp_path / "out"
    src.write_text(f"I am {out_path}\n")
    (info,) = store.add_outputs(drv, {"out": (str(src), out_path)}, [])
    assert out_path in info.references  # it refers to itself
    assert _count(store, "SELECT count(*) FROM DerivationOutputs") == 1
    result = gc.delete(store, gc.plan(store))
    assert set(result.deleted) >= {drv, out_path}
    assert _count(store, "SELECT count(*) FROM DerivationOutputs") == 0
    assert _count(store, "SELECT count(*) FROM Refs") == 0
    assert not _all_valid(store)
    _consistent(store)


def test_a_foreign_key_the_collector_does_not_know_is_left_to_the_database(
    store: Store,
) -> None:
    held = _text(store, "held")
    free = [_text(store, f"free{i}") for i in range(4)]
    with store.db.connection() as conn:
        conn.execute(
            "CREATE TABLE Holds (path INTEGER REFERENCES ValidPaths(id) ON DELETE RESTRICT)"
        )
        conn.execute("INSERT INTO Holds SELECT id FROM ValidPaths WHERE path = ?", (held,))
        assert not unregister.checks_known(conn)
    result = gc.delete(store, gc.plan(store))
    assert set(result.deleted) == set(free)
    assert result.kept == [held] and os.path.exists(held)
    _consistent(store)


def test_the_connection_goes_back_to_the_pool_as_it_was_lent(store: Store) -> None:
    def settings() -> tuple[int, int, int]:
        with store.db.connection() as conn:
            return (
                conn.execute("PRAGMA foreign_keys").fetchone()[0],
                conn.execute("PRAGMA cache_size").fetchone()[0],
                conn.execute("PRAGMA temp_store").fetchone()[0],
            )

    before = settings()
    assert before[0] == 1
    for i in range(50):
        _text(store, f"t{i}")
    gc.delete(store, gc.plan(store), batch_size=8)
    assert settings() == before  # the pool lends its most recent connection first

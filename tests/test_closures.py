from pathlib import Path

import pytest

from daemon.build.closures import Closures
from store.store import Store


def test_closures_of_new_outputs_match_the_database(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = store.add_text("base", "base")
    dep = store.add_text("dep", "dep", [base.path])
    lone = store.add_text("lone", "lone")
    closures = Closures(store)
    assert closures.known([dep.path]) is None
    assert closures.compute([dep.path, lone.path]) == sorted([base.path, dep.path, lone.path])
    assert closures.known([lone.path]) == [lone.path]

    sd = store.store_dir
    out_path, doc_path = f"{sd}/{'1' * 32}-thing", f"{sd}/{'2' * 32}-thing-doc"
    (tmp_path / "out").write_text(f"{dep.path} {out_path}")
    (tmp_path / "doc").write_text(f"see {out_path}")
    infos = store.add_outputs(
        f"{sd}/{'3' * 32}-thing.drv",
        {"out": (str(tmp_path / "out"), out_path), "doc": (str(tmp_path / "doc"), doc_path)},
        [base.path, dep.path, lone.path],
    )

    def no_database(paths: object) -> list[str]:
        raise AssertionError("the closure of an output whose references are known was asked for")

    with monkeypatch.context() as m:
        m.setattr(store, "closure", no_database)
        closures.add_outputs(infos)
    for path in (out_path, doc_path):
        assert closures.known([path]) == sorted(store.closure([path]))
    assert closures.known([doc_path, lone.path]) == sorted(store.closure([doc_path, lone.path]))


def test_an_output_referring_to_a_path_not_looked_at_asks_the_database(
    store: Store, tmp_path: Path
) -> None:
    base = store.add_text("base", "base")
    dep = store.add_text("dep", "dep", [base.path])
    out_path = f"{store.store_dir}/{'1' * 32}-thing"
    (tmp_path / "out").write_text(base.path)
    infos = store.add_outputs(
        f"{store.store_dir}/{'3' * 32}-thing.drv",
        {"out": (str(tmp_path / "out"), out_path)},
        [base.path, dep.path],
    )
    closures = Closures(store)
    closures.add_outputs(infos)
    assert closures.known([out_path]) == sorted([base.path, out_path])

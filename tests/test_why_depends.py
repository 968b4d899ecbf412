"""store-why-depends as `nix why-depends`: a shortest chain of references, every path
leading there with --all, and a clear failure when there is no dependency.  A real daemon,
the command in a process of its own."""

from pathlib import Path

import pytest

from bench.daemons import DaemonProc
from daemon.cli.blocking import BlockingClient
from tests.weft_cli import weft


class Paths:
    """top -> m1 -> leaf; top -> m2 -> m3 -> leaf; top -> other, which needs nothing."""

    def __init__(self, client: BlockingClient) -> None:
        def add(name: str, refs: list[str]) -> str:
            return client.call("add-text", name=name, text=f"{name}\n", references=refs)["path"]

        self.leaf = add("leaf", [])
        self.m1 = add("m1", [self.leaf])
        self.m3 = add("m3", [self.leaf])
        self.m2 = add("m2", [self.m3])
        self.other = add("other", [])
        self.top = add("top", [self.m1, self.m2, self.other])


@pytest.fixture
def paths(daemon: DaemonProc) -> Paths:
    with BlockingClient(daemon.socket) as c:
        return Paths(c)


def test_it_prints_one_shortest_chain_of_references_as_a_tree(
    daemon: DaemonProc, paths: Paths, tmp_path: Path
) -> None:
    (tmp_path / "result").symlink_to(paths.top)
    out = weft("store-why-depends", daemon.socket, "result", paths.leaf, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [paths.top, f"└───{paths.m1}", f"    └───{paths.leaf}"]


def test_with_all_it_prints_every_path_that_leads_to_the_dependency(
    daemon: DaemonProc, paths: Paths
) -> None:
    out = weft("store-why-depends", daemon.socket, "--all", paths.top, paths.leaf)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        paths.top,
        f"├───{paths.m1}",
        f"│   └───{paths.leaf}",
        f"└───{paths.m2}",
        f"    └───{paths.m3}",
        f"        └───{paths.leaf} [...]",
    ]


def test_a_path_that_does_not_depend_on_the_other_fails_with_a_clear_message(
    daemon: DaemonProc, paths: Paths
) -> None:
    out = weft("store-why-depends", daemon.socket, paths.other, paths.leaf)
    assert out.returncode == 1
    assert out.stdout == ""
    assert f"'{paths.other}' does not depend on '{paths.leaf}'" in out.stderr
    backwards = weft("store-why-depends", daemon.socket, paths.leaf, paths.top)
    assert backwards.returncode == 1 and "does not depend on" in backwards.stderr


def test_a_path_depends_on_itself_and_a_missing_argument_is_bad_usage(
    daemon: DaemonProc, paths: Paths
) -> None:
    out = weft("store-why-depends", daemon.socket, paths.m2, paths.m2)
    assert (out.returncode, out.stdout.splitlines()) == (0, [paths.m2])
    one = weft("store-why-depends", daemon.socket, paths.m2)
    assert one.returncode == 2 and "give a package and a dependency" in one.stderr

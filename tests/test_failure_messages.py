"""A failure says what failed: a derivation not built because an input failed names that
input's .drv path and carries its reason, exit code and last log lines included, since
only the requested derivations' results reach the user."""

from tests.daemon_fixtures import Graph


def test_a_dependency_failure_names_the_broken_derivation_and_why(graph: Graph) -> None:
    broken = graph.sh("broken", "echo the real problem; exit 5")
    middle = graph.sh("middle", f"cat {broken} > $out")
    top = graph.sh("top", f"cat {middle} > $out")
    by_drv = {r["drv"]: r for r in graph.build(top, middle, keep_going=True)}
    for r in (by_drv[top.path], by_drv[middle.path]):
        assert r["status"] == "dependency-failed"
        assert r["message"].startswith(f"dependency '{broken.path}' failed: "), r["message"]
        assert "exit code 5" in r["message"] and "the real problem" in r["message"]

"""store-query as Nix users use `nix-store -q`: arguments that are links or files inside a
store path, trees, DOT graphs, sizes, derivers and outputs; and the queries it had before,
in their formats.  A real daemon each time, the command in a process of its own."""

import json
import os
from pathlib import Path

from bench.daemons import DaemonProc
from daemon.cli.blocking import BlockingClient
from tests.daemon_fixtures import Graph
from tests.weft_cli import weft


class Diamond:
    """top -> a, b, leaf; a -> leaf; b -> leaf: text paths, added through the daemon."""

    def __init__(self, client: BlockingClient) -> None:
        def add(name: str, refs: list[str]) -> str:
            return client.call("add-text", name=name, text=f"{name}\n", references=refs)["path"]

        self.leaf = add("leaf", [])
        self.a = add("a", [self.leaf])
        self.b = add("b", [self.leaf])
        self.top = add("top", [self.a, self.b, self.leaf])


def query(d: DaemonProc, *args: str, cwd: Path | None = None) -> list[str]:
    out = weft("store-query", d.socket, *args, cwd=str(cwd) if cwd else None)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_a_result_link_and_a_file_inside_a_store_path_mean_that_store_path(
    daemon: DaemonProc, tmp_path: Path
) -> None:
    tree = tmp_path / "pkg"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "y").write_text("#!/bin/sh\n")
    with BlockingClient(daemon.socket) as c:
        path = c.call("add-from-path", path=str(tree))["path"]
    work = tmp_path / "work"
    work.mkdir()
    (work / "result").symlink_to(path)
    (work / "again").symlink_to("result")  # a relative link to a link
    (work / "dir").symlink_to(work)  # a directory link on the way

    args = ["result", "again", "dir/result/bin/y", f"{path}/bin/y", path]
    assert query(daemon, "--info", *args, cwd=work) == query(daemon, "--info", path) * len(args)

    (work / "loop").symlink_to("loop")
    looped = weft("store-query", daemon.socket, "--info", "loop", cwd=str(work))
    assert looped.returncode == 2
    assert "more than 40 symbolic links" in looped.stderr


def test_the_tree_expands_each_path_once_dependencies_first_and_marks_repeats(
    daemon: DaemonProc,
) -> None:
    with BlockingClient(daemon.socket) as c:
        p = Diamond(c)
    a, b = (x for x in query(daemon, "--closure", p.top) if x in (p.a, p.b))
    assert query(daemon, "--tree", p.top) == [
        p.top,
        f"├───{p.leaf}",
        f"├───{a}",
        f"│   └───{p.leaf} [...]",
        f"└───{b}",
        f"    └───{p.leaf} [...]",
    ]
    adjacency = json.loads("\n".join(query(daemon, "--tree", "--json", p.top)))
    assert adjacency == {
        p.leaf: [],
        a: [p.leaf],
        b: [p.leaf],
        p.top: sorted([p.leaf, a, b], key=list(adjacency).index),
    }


def test_the_graph_is_dot_with_an_edge_from_each_reference_to_its_referrer(
    daemon: DaemonProc,
) -> None:
    with BlockingClient(daemon.socket) as c:
        p = Diamond(c)
    dot = query(daemon, "--graph", p.top)
    assert dot[0] == "digraph G {" and dot[-1] == "}"
    edges = {tuple(x.strip('"') for x in line.split(" [")[0].split(" -> ")) for line in dot[1:-1]}
    nodes = {e for e in edges if len(e) == 1}
    assert {e for e in edges if len(e) == 2} == {
        (p.leaf, p.a),
        (p.leaf, p.b),
        (p.leaf, p.top),
        (p.a, p.top),
        (p.b, p.top),
    }
    assert nodes == {(p.leaf,), (p.a,), (p.b,), (p.top,)}
    assert f'"{p.top}" [label = "top", shape = box' in "\n".join(dot)


def test_sizes_are_in_human_units_and_in_bytes_with_json(
    daemon: DaemonProc, tmp_path: Path
) -> None:
    big = tmp_path / "big"
    big.write_bytes(os.urandom(3 << 20))
    with BlockingClient(daemon.socket) as c:
        blob = c.call("add-from-path", path=str(big))
        small = c.call("add-text", name="small", text="x", references=[blob["path"]])
    assert query(daemon, "--size", small["path"]) == [f"{small['nar_size']} B\t{small['path']}"]
    assert query(daemon, "--size", blob["path"]) == [
        f"{blob['nar_size'] / 2**20:.1f} MiB\t{blob['path']}"
    ]
    total = blob["nar_size"] + small["nar_size"]
    assert query(daemon, "--closure-size", small["path"]) == [
        f"{total / 2**20:.1f} MiB\t{small['path']}"
    ]
    sizes = json.loads("\n".join(query(daemon, "--closure-size", "--json", small["path"])))
    assert sizes == {small["path"]: total}
    sizes = json.loads("\n".join(query(daemon, "--size", "--json", blob["path"], small["path"])))
    assert sizes == {blob["path"]: blob["nar_size"], small["path"]: small["nar_size"]}


def test_deriver_names_what_built_a_path_and_outputs_what_a_derivation_builds(
    graph: Graph, builder_daemon: DaemonProc
) -> None:
    app = graph.sh("app", "echo app > $out")
    (result,) = graph.build(app)
    assert result["status"] == "built"
    d = builder_daemon
    assert query(d, "--deriver", app.out, graph.bb) == [app.path, "unknown-deriver"]
    assert json.loads("\n".join(query(d, "--deriver", "--json", app.out))) == {app.out: app.path}
    assert query(d, "--outputs", app.path, graph.bb) == [app.out, graph.bb]
    assert json.loads("\n".join(query(d, "--outputs", "--json", app.path))) == {app.path: [app.out]}


def test_the_queries_it_had_keep_their_formats(daemon: DaemonProc) -> None:
    with BlockingClient(daemon.socket) as c:
        p = Diamond(c)
        info = c.call("path-info", path=p.a)
    assert query(daemon, "--info", p.a) == [f"{p.a}\t{info['nar_hash']}\t{info['nar_size']}"]
    assert json.loads("\n".join(query(daemon, "--info", "--json", p.a)))[0]["path"] == p.a
    assert query(daemon, "--references", p.a, p.b) == [p.leaf]
    assert sorted(query(daemon, "--referrers", p.leaf)) == sorted([p.a, p.b, p.top])
    assert query(daemon, "--closure", p.a) == [p.leaf, p.a]
    assert query(daemon, "--valid", p.a, p.a) == [p.a]
    gone = p.a[: -len("-a")] + "-gone"
    missing = weft("store-query", daemon.socket, "--valid", p.a, gone)
    assert (missing.returncode, missing.stdout.splitlines()) == (1, [p.a])
    both = weft("store-query", daemon.socket, "--tree", "--size", p.a)
    assert both.returncode == 2 and "exactly one of" in both.stderr


def test_a_chain_deeper_than_the_recursion_limit_draws_as_a_tree(daemon: DaemonProc) -> None:
    depth = 1_200
    chain: list[str] = []
    with BlockingClient(daemon.socket) as c:
        for i in range(depth):
            refs = chain[-1:]
            chain.append(c.call("add-text", name=f"n{i}", text=str(i), references=refs)["path"])
    tree = query(daemon, "--tree", chain[-1])
    assert len(tree) == depth
    assert tree[0] == chain[-1]
    assert tree[-1] == " " * 4 * (depth - 2) + f"└───{chain[0]}"

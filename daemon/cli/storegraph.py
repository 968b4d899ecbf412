"""What the commands that walk store paths share: turning what a user typed (`./result`,
a file inside a store path) into a store path, a closure's graph in one request
(`closure-info`), trees drawn as Nix draws them, and sizes in human units.

No trio, and nothing costly to import: every command pays for its imports.
"""

import os
import stat
from collections.abc import Callable, Iterator

import msgpack

from daemon.cli.blocking import BlockingClient
from daemon.cli.common import UsageError

# Symbolic links followed for one argument before giving up: the kernel's own limit on
# links followed in one lookup (ELOOP), so a loop fails as it would in a shell.
MAX_LINKS = 40

# The box-drawing pieces of `nix-store -q --tree` and `nix why-depends`.
TREE_CONN = "├───"
TREE_LAST = "└───"
TREE_LINE = "│   "
TREE_NULL = "    "


def store_path_of(path: str, store_dir: str) -> str | None:
    """The store path `path` is or lies inside (`<store>/abc-x/bin/y`: `<store>/abc-x`)."""
    prefix = store_dir.rstrip("/") + "/"
    if not path.startswith(prefix):
        return None
    base = path[len(prefix) :].split("/", 1)[0]
    return prefix + base if base else None


def resolve(arg: str, store_dir: str) -> str:
    """The store path an argument means, as `nix-store -q` reads it: links (`./result`,
    or a directory link on the way) are followed until the path is inside the store, and a
    path inside a store path means that store path.  Links inside the store are not
    followed: `<store>/abc-x/bin/sh`, a link to busybox, still means `abc-x`.  An argument
    that leads nowhere into the store is returned absolute, for the daemon to refuse."""
    path = os.path.abspath(arg)
    for _ in range(MAX_LINKS):
        found = store_path_of(path, store_dir)
        if found is not None:
            return found
        link = _first_link(path)
        if link is None:
            return path
        rest = path[len(link) :].lstrip("/")
        target = os.path.join(os.path.dirname(link), os.readlink(link))
        path = os.path.normpath(os.path.join(target, rest) if rest else target)
    raise UsageError(f"{arg}: more than {MAX_LINKS} symbolic links on the way to the store")


def _first_link(path: str) -> str | None:
    """The shortest prefix of `path` that is a symbolic link, if any."""
    prefix = ""
    for part in path.split("/")[1:]:
        prefix = f"{prefix}/{part}"
        try:
            if stat.S_ISLNK(os.lstat(prefix).st_mode):
                return prefix
        except OSError:
            return None
    return None


def resolve_all(client: BlockingClient, args: list[str]) -> list[str]:
    store_dir = str(client.call("store-dir"))
    return [resolve(a, store_dir) for a in args]


class ClosureGraph:
    """A closure as `closure-info` streams it: path i's size and the indices of its
    references; every path comes after its references.  A plain class: importing
    dataclasses costs every command 12 ms."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.sizes: list[int] = []
        self.refs: list[list[int]] = []
        self.index: dict[str, int] = {}

    def add(self, path: str, size: int, refs: list[int]) -> None:
        self.index[path] = len(self.paths)
        self.paths.append(path)
        self.sizes.append(size)
        self.refs.append(refs)

    def children(self, node: int) -> list[int]:
        """A path's references without itself, dependencies first (as Nix's tree puts
        them: what many paths need is expanded once, high up, and marked after)."""
        return sorted(set(self.refs[node]) - {node})

    def reachable(self, root: int) -> set[int]:
        seen = {root}
        todo = [root]
        while todo:
            for r in self.refs[todo.pop()]:
                if r not in seen:
                    seen.add(r)
                    todo.append(r)
        return seen


def fetch_graph(client: BlockingClient, roots: list[str]) -> ClosureGraph:
    unpacker = msgpack.Unpacker(raw=False)
    client.download("closure-info", unpacker.feed, paths=roots)
    graph = ClosureGraph()
    for path, size, refs in unpacker:
        graph.add(path, size, refs)
    return graph


def draw_tree(
    graph: ClosureGraph, roots: list[int], children: Callable[[int], list[int]]
) -> Iterator[str]:
    """Each root and what `children` says lies below it, depth first; a path met again is
    printed with ` [...]` and not expanded again (`nix-store -q --tree`).  Iterative: a
    chain of references may be deeper than Python's recursion."""
    done: set[int] = set()
    stack = [(root, "", "") for root in reversed(roots)]
    while stack:
        node, first, tail = stack.pop()
        if node in done:
            yield f"{first}{graph.paths[node]} [...]"
            continue
        done.add(node)
        yield f"{first}{graph.paths[node]}"
        below = children(node)
        for i in reversed(range(len(below))):
            last = i == len(below) - 1
            pad = (TREE_LAST, TREE_NULL) if last else (TREE_CONN, TREE_LINE)
            stack.append((below[i], tail + pad[0], tail + pad[1]))

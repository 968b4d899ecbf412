"""The house rules, read from the code: which package may import what, no import cycles,
and modules and functions small enough to read (docs/architecture.md).

Every import counts, wherever it stands (inside a function, under `TYPE_CHECKING`): a
lazy import is still a dependency a reader has to follow.
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGES = ("store", "daemon", "locker", "spawner", "remote", "worker", "cmdserver", "bench")
# protoc's output (install.sh makes it from remote/wire/*.proto, git ignores it): read as
# the .proto files it comes from, not as code of ours.
GENERATED = ("_pb2.py", "_pb2_grpc.py")
# A module a reader can hold in mind at once; a function that fits on a screen.
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name.endswith(GENERATED):
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports, and for `from x import y` also `x.y` (y may be one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def _top(module: str) -> str:
    return module.split(".")[0]


def test_the_store_imports_no_trio_and_nothing_of_the_processes() -> None:
    bad = {
        name: sorted(i for i in imports if _top(i) in ("trio", "daemon", "locker", "spawner"))
        for name, imports in IMPORTS.items()
        if _top(name) == "store"
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_remote_library_imports_no_trio_and_nothing_of_the_processes() -> None:
    bad = {
        name: sorted(
            i for i in imports if _top(i) in ("trio", "daemon", "locker", "spawner", "worker")
        )
        for name, imports in IMPORTS.items()
        if _top(name) == "remote"
    }
    assert {n: i for n, i in bad.items() if i} == {}


def test_the_worker_uses_no_trio_and_of_the_daemon_only_its_client() -> None:
    allowed = ("daemon.cli.blocking", "daemon.wire")
    bad = {
        name: sorted(
            i
            for i in imports
            if _top(i) in ("trio", "locker", "spawner")
            or (_top(i) == "daemon" and not i.startswith(allowed))
        )
        for name, imports in IMPORTS.items()
        if _top(name) == "worker"
    }
    assert {n: i for n, i in bad.items() if i} == {}


def test_the_command_server_uses_no_trio_and_of_the_daemon_only_its_commands() -> None:
    bad = {
        name: sorted(
            i
            for i in imports
            if _top(i) in ("trio", "locker", "spawner", "remote", "worker")
            or (_top(i) == "daemon" and not i.startswith("daemon.cli"))
        )
        for name, imports in IMPORTS.items()
        if _top(name) == "cmdserver"
    }
    assert {n: i for n, i in bad.items() if i} == {}


def test_the_helpers_import_only_their_wire_modules_from_outside_themselves() -> None:
    def allowed(module: str) -> bool:
        return module in ("daemon", "daemon.wire") or module.startswith("daemon.wire.")

    bad = {
        name: sorted(
            i for i in imports if _top(i) in ("daemon", "store", "trio") and not allowed(i)
        )
        for name, imports in IMPORTS.items()
        if _top(name) in ("locker", "spawner")
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_benchmarks_import_nothing_from_the_tests() -> None:
    bad = [name for name, imports in IMPORTS.items() if any(_top(i) == "tests" for i in imports)]
    assert bad == []


def test_no_module_imports_itself_through_others() -> None:
    graph = {name: {m for m in imports if m in MODULES} for name, imports in IMPORTS.items()}
    assert _strongly_connected(graph) == []


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the groups of two or more modules in a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))
    return groups


def test_the_cycle_finder_finds_a_cycle_of_three() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _strongly_connected(graph) == [["a", "b", "c"]]


def test_no_command_module_loads_trio_or_grpc() -> None:
    commands = sorted(name for name in MODULES if name.startswith("daemon.cli"))
    assert "daemon.cli.main" in commands
    code = (
        "import sys\n"
        f"for name in {commands!r}:\n"
        "    __import__(name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'grpc')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_modules_and_functions_are_small_enough_to_read() -> None:
    too_long: list[str] = []
    for name, path in MODULES.items():
        text = path.read_text()
        if _top(name) != "bench" and len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert too_long == []

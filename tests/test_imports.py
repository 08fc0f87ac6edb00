"""Imports run one way: `bot` <- `infra` <- `loadtests` <- `tests`, and no module imports
itself back through others.

The graph is read from the source with `ast`, every import statement counted, those inside
functions too: a lazy import hides a cycle from the interpreter, not from the reader.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bot", "infra", "loadtests", "tests")
Graph = dict[str, set[str]]


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(module: str, is_package: bool, tree: ast.AST) -> Iterable[tuple[str, str | None]]:
    """(module, name) for every import in `tree`; name is None for `import x`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = module.split(".")
                package = package if is_package else package[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                yield base, alias.name


def import_graph(root: Path, packages: Iterable[str] = PACKAGES) -> Graph:
    """Module -> the project modules it imports (a name taken from a module: that module)."""
    files = {
        module_name(root, path): path
        for package in packages
        for path in sorted((root / package).rglob("*.py"))
    }
    graph: Graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = graph.setdefault(name, set())
        for target, attr in imported(name, path.name == "__init__.py", tree):
            if attr and f"{target}.{attr}" in files:
                edges.add(f"{target}.{attr}")
            elif target in files:
                edges.add(target)
        edges.discard(name)
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """The import cycles: strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def imports_into(graph: Graph, source: str, targets: Iterable[str]) -> list[str]:
    """`module -> imported` for every import from package `source` into any of `targets`."""
    tops = tuple(targets)
    return sorted(
        f"{mod} -> {dep}"
        for mod, deps in graph.items()
        if mod.split(".")[0] == source
        for dep in deps
        if dep.split(".")[0] in tops
    )


@pytest.fixture(scope="module")
def graph() -> Graph:
    return import_graph(ROOT)


def test_bot_imports_nothing_from_infra_loadtests_or_tests(graph: Graph) -> None:
    assert imports_into(graph, "bot", ("infra", "loadtests", "tests")) == []


def test_infra_imports_nothing_from_loadtests_or_tests(graph: Graph) -> None:
    assert imports_into(graph, "infra", ("loadtests", "tests")) == []


def test_loadtests_import_nothing_from_tests(graph: Graph) -> None:
    assert imports_into(graph, "loadtests", ("tests",)) == []


def test_no_package_has_an_import_cycle(graph: Graph) -> None:
    assert cycles(graph) == []


def test_tooling_takes_no_private_name_from_another_module() -> None:
    """`infra` and `loadtests` use each other's public names only (`runner._answers` was one)."""
    private = []
    for package in ("infra", "loadtests"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    names = [a.name for a in node.names if a.name.startswith("_")]
                    private += [f"{path.relative_to(ROOT)}: {node.module}.{n}" for n in names]
                elif (
                    isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Name)
                    and node.value.id in ("runner", "observability", "common", "programs")
                    and node.attr.startswith("_")
                ):
                    private.append(f"{path.relative_to(ROOT)}: {node.value.id}.{node.attr}")
    assert private == []


def test_supervisor_is_the_runners_dependency_not_the_bots() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("supervisor")]
    assert [d for d in project["optional-dependencies"]["runner"] if d.startswith("supervisor")]


# The checker itself, on a tree of its own: it sees what it is meant to see.


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_cycle_through_a_lazy_import_is_found(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.b import thing\n",
            "pkg/b.py": "def thing():\n    from pkg import a\n    return a\n",
            "pkg/c.py": "from . import a\n",
        },
    )
    graph = import_graph(root, ["pkg"])
    assert graph["pkg.c"] == {"pkg.a"}  # a relative import resolves to the module
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


def test_an_import_into_a_forbidden_package_is_found(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "bot/__init__.py": "",
            "bot/cli.py": "def stub():\n    from infra.stub import run\n",
            "infra/__init__.py": "",
            "infra/stub.py": "from bot import cli\n",
        },
    )
    graph = import_graph(root, ["bot", "infra"])
    assert imports_into(graph, "bot", ["infra"]) == ["bot.cli -> infra.stub"]
    assert cycles(graph) == [["bot.cli", "infra.stub"]]


def test_the_shared_helpers_import_nothing_back_from_the_tooling(graph: Graph) -> None:
    """infra.common serves the runner, the benchmark and the tests: it imports none of them."""
    assert sorted(d for d in graph["infra.common"] if not d.startswith("bot.")) == []

"""The layering of the package: no import cycles, and none dodged by a function-level import.

Data flows down (STYLE.md): a module never imports one above it, so the module-level imports
among stagecomp's modules form no cycle, and no function imports a stagecomp module to hide
one. Read from the source with ``ast``: nothing is imported to check it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "stagecomp"

# Function-level stagecomp imports allowed (none: a cycle is never dodged that way).
EXEMPT_FUNCTION_IMPORTS: tuple[str, ...] = ()


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(tree: ast.AST, in_function: bool = False) -> Iterator[tuple[ast.stmt, bool]]:
    """Every import statement, with whether it runs inside a function; ``if TYPE_CHECKING:``
    blocks are left out (they never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
        elif isinstance(node, ast.If) and is_type_checking(node):
            yield from imports(ast.Module(body=node.orelse, type_ignores=[]), in_function)
        else:
            inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            yield from imports(node, inside)


def targets(module: str, node: ast.stmt) -> set[str]:
    """The stagecomp modules an import statement loads (a name that is not a module counts
    as the module that defines it)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        assert isinstance(node, ast.ImportFrom)
        base = node.module or ""
        if node.level:  # relative: from the importing module's package
            is_package = MODULES[module].name == "__init__.py"
            package = (module if is_package else module.rpartition(".")[0]).split(".")
            anchor = package[: len(package) - node.level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
    found = set()
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name.split(".")[0] == "stagecomp":
            found.add(name)
    return found


def graph() -> tuple[dict[str, set[str]], list[str]]:
    """Module-level import edges among stagecomp modules, and every function-level import."""
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    function_level = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, in_function in imports(tree):
            found = targets(name, node) - {name}
            if in_function and found:
                where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
                function_level.append(f"{where} imports {', '.join(sorted(found))}")
            elif not in_function:
                if path.name == "__init__.py":  # a package importing its own submodules
                    found = {t for t in found if not t.startswith(name + ".")}
                edges[name] |= found
    return edges, function_level


def cycles(edges: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), plus
    modules that import themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def exempt(line: str) -> bool:
    return any(Path(line.split(":")[0]).match(pattern) for pattern in EXEMPT_FUNCTION_IMPORTS)


def test_every_module_is_seen() -> None:
    assert {"stagecomp", "stagecomp.cli", "stagecomp.report", "stagecomp.layers.base"} <= set(
        MODULES
    )


def test_no_function_level_stagecomp_imports() -> None:
    _, function_level = graph()
    offending = [line for line in function_level if not exempt(line)]
    assert not offending, "function-level imports (move them to the top):\n" + "\n".join(offending)


def test_no_import_cycles() -> None:
    edges, _ = graph()
    found = cycles(edges)
    assert not found, "import cycles among stagecomp modules: " + "; ".join(
        " <-> ".join(c) for c in found
    )


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}}, [["a", "b", "c"], ["d"]]),
    ],
)
def test_the_cycle_finder_finds_cycles(
    edges: dict[str, set[str]], expected: list[list[str]]
) -> None:
    assert sorted(cycles(edges)) == expected


def test_the_import_reader_sees_function_level_and_type_checking_imports() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from stagecomp.errors import RankError\n"
        "if TYPE_CHECKING:\n"
        "    from stagecomp.compressor import Compressor\n"
        "def f():\n"
        "    from stagecomp.cli import main\n"
    )
    found = [
        (targets("stagecomp.report", node), inside) for node, inside in imports(ast.parse(source))
    ]
    assert found == [(set(), False), ({"stagecomp.errors"}, False), ({"stagecomp.cli"}, True)]

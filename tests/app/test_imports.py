"""The package's import graph: no cycles, plain schemas, a registry that knows no schema.

The graph is read from the source with `ast`: an edge ``a -> b`` for every ``import`` of a
``kfac_train`` module in `a`, at module level, inside a function (a function-level import only
hides a cycle, it does not remove it) or under ``if TYPE_CHECKING:`` (a cycle of type-only
imports is still a circle of modules that cannot be understood one without the other: the
old ``config -> registry -> tasks.base -> config`` ran through one).
"""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

PACKAGE = REPO / "kfac_train"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def owning_module(name: str) -> str | None:
    """The longest prefix of dotted `name` that is a kfac_train module."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imported_modules(module: str) -> set[str]:
    """kfac_train modules that `module` imports anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(filter(None, (owning_module(alias.name) for alias in node.names)))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                target = f"{source}.{alias.name}"  # `from pkg import submodule`
                found.add(target if target in MODULES else owning_module(source) or "")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    found.discard("")
    found.discard(module)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == 1:
                return path[path.index(successor) :] + [successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_module_function_and_type_checking_imports() -> None:
    # app imports the registry at module level; hydra_setup imports it inside a function;
    # context imports the schemas for type checking only.
    assert "kfac_train.registry" in imported_modules("kfac_train.app")
    assert "kfac_train.registry" in imported_modules("kfac_train.hydra_setup")
    assert "kfac_train.config" in imported_modules("kfac_train.context")


def test_there_is_no_import_cycle_in_kfac_train() -> None:
    graph = {module: imported_modules(module) for module in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def imported_roots(module: str) -> set[str]:
    """Top-level package names of every import statement of `module` (kfac_train included)."""
    tree = ast.parse(MODULES[module].read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not node.level:
            roots.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
    return roots


def test_the_schema_module_imports_neither_the_registry_nor_hydra() -> None:
    imports = imported_modules("kfac_train.config")
    assert imports <= {"kfac_train.errors", "kfac_train.kfac"}, imports
    assert "hydra" not in imported_roots("kfac_train.config")


def test_the_registry_imports_neither_the_schemas_nor_hydra() -> None:
    imports = imported_modules("kfac_train.registry")
    assert "kfac_train.config" not in imports and "kfac_train.tasks.base" not in imports
    assert "hydra" not in imported_roots("kfac_train.registry")

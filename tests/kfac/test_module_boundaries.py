"""The math modules of the K-FAC library import no app, no Hydra and no ``torch.distributed``.

Read statically from the source (``ast``), following the library's own relative imports, so the
test also catches an import that a math module gains through another library module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kfac_train.kfac

PACKAGE = Path(kfac_train.kfac.__file__).parent
MATH_MODULES = (
    "assignment",
    "batchnorm",
    "conv_stats",
    "damping",
    "diagnostics",
    "embedding",
    "factors",
    "grads",
    "hyperparams",
    "kfac_layer",
    "layernorm",
    "layers",
    "linalg",
    "memory",
    "memory_model",
    "precision",
    "second_order",
    "stale",
    "unit_wise",
)
FORBIDDEN = ("hydra", "omegaconf", "torch.distributed", "torch.nn.parallel", "kfac_train")
DISTRIBUTED_MODULES = ("comm", "bucketing", "reduction", "preconditioner", "state", "capture")


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(absolute imports, sibling modules imported relatively) of ``kfac_train/kfac/<module>``."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    absolute, siblings = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            absolute |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                absolute.add(node.module or "")
            elif node.module:
                siblings.add(node.module.split(".")[0])
            else:
                siblings |= {alias.name for alias in node.names}
    return absolute, siblings


def _closure(module: str) -> tuple[set[str], set[str]]:
    seen, absolute, todo = set(), set(), [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        found, siblings = _imports(current)
        absolute |= found
        todo.extend(siblings)
    return absolute, seen


@pytest.mark.parametrize("module", MATH_MODULES)
def test_a_math_module_imports_nothing_distributed_and_nothing_of_the_app(module: str) -> None:
    absolute, library = _closure(module)
    bad = sorted(
        name
        for name in absolute
        for prefix in FORBIDDEN
        if name == prefix or name.startswith(f"{prefix}.")
    )
    assert not bad, f"{module} imports {bad}"
    assert not set(library) & set(DISTRIBUTED_MODULES), f"{module} reaches {library}"


def test_the_checked_modules_exist_and_the_library_files_stay_small() -> None:
    for module in (*MATH_MODULES, *DISTRIBUTED_MODULES):
        assert (PACKAGE / f"{module}.py").exists(), module
    for path in PACKAGE.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 300, f"{path.name} is above 300 lines"

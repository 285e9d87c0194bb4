"""Every module of services.common keeps its public surface in a complete ``__all__`` (STYLE.md section 8)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMON_FILES = sorted((REPO_ROOT / "services" / "common").rglob("*.py"))


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")


def _bound_names(target: ast.expr) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, ast.Tuple | ast.List):
        return [name for elt in target.elts for name in _bound_names(elt)]
    if isinstance(target, ast.Starred):
        return _bound_names(target.value)
    return []  # attribute or subscript assignment: binds no module-level name


def _defined_names(body: list[ast.stmt]) -> set[str]:
    """Names a module body defines itself (not imports), including inside top-level if/try blocks."""
    names: set[str] = set()
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(name for target in node.targets for name in _bound_names(target))
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            names.update(_bound_names(node.target))
        elif isinstance(node, ast.If):
            names |= _defined_names(node.body) | _defined_names(node.orelse)
        elif isinstance(node, ast.Try):
            names |= _defined_names([*node.body, *node.orelse, *node.finalbody])
            for handler in node.handlers:
                names |= _defined_names(handler.body)
    return names


def _public(names: set[str]) -> set[str]:
    return {name for name in names if not name.startswith("_")}


def test_common_files_found():
    assert REPO_ROOT / "services" / "common" / "errors.py" in COMMON_FILES


@pytest.mark.parametrize("path", COMMON_FILES, ids=_module_name)
def test_all_lists_every_public_name(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    defined = _public(_defined_names(tree.body))
    module = importlib.import_module(_module_name(path))
    if path.name == "__init__.py" and not defined and not hasattr(module, "__all__"):
        return  # a package docstring only: nothing to export
    assert hasattr(module, "__all__"), f"{module.__name__}: expected __all__, found none"
    exported = list(module.__all__)
    assert len(exported) == len(set(exported)), f"{module.__name__}.__all__ has duplicates: {exported}"
    missing = sorted(defined - set(exported))
    assert not missing, f"{module.__name__}: public names missing from __all__: {missing}"
    undefined = sorted(name for name in exported if not hasattr(module, name))
    assert not undefined, f"{module.__name__}.__all__ names what the module lacks: {undefined}"

"""The detector's serving modules and the two-stage gateway modules keep a complete ``__all__`` (STYLE.md section 8)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
FILES = sorted((REPO_ROOT / "services" / "detector").glob("*.py")) + [
    REPO_ROOT / "gateway" / "two_stage.py",
    REPO_ROOT / "gateway" / "detect_cli.py",
]


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")


def _public_defined(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {name for name in names if not name.startswith("_") and name != "log"}


def test_files_found():
    assert REPO_ROOT / "services" / "detector" / "postprocess.py" in FILES


@pytest.mark.parametrize("path", FILES, ids=_module_name)
def test_all_is_complete(path: Path):
    module = importlib.import_module(_module_name(path))
    defined = _public_defined(ast.parse(path.read_text(encoding="utf-8")))
    if path.name == "__init__.py" and not defined:
        return
    exported = list(module.__all__)
    assert len(exported) == len(set(exported))
    assert not sorted(defined - set(exported)), f"{module.__name__}: missing from __all__"
    assert all(hasattr(module, name) for name in exported)

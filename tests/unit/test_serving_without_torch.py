"""The serving path imports with torch absent (STYLE.md section 1).

import-linter checks packages that must never import torch. The classifier's serving modules and the gateway sit
next to torch-using code (``train/``, an optional torch backend), so they are checked here instead: each module is
imported in a fresh interpreter in which every ``import torch`` fails as if torch were not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# Every module of services.common, whatever files it gains later.
COMMON_MODULES = tuple(
    ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")
    for path in sorted((REPO_ROOT / "services" / "common").rglob("*.py"))
)

# The rest of the serving path. These must exist: a missing one fails the test rather than being skipped.
SERVING_MODULES = (
    *COMMON_MODULES,
    "services.classifier.api",
    "services.classifier.onnx",
    "services.classifier.preprocess",
    "gateway.cli",
)

# Runs in the child interpreter: torch and its submodules raise ModuleNotFoundError, as on a serving install.
_IMPORT_WITHOUT_TORCH = """
import importlib
import importlib.abc
import sys


class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torch" or fullname.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by the test)", name=fullname)
        return None


sys.meta_path.insert(0, _NoTorch())
importlib.import_module(sys.argv[1])
leaked = sorted(name for name in sys.modules if name == "torch" or name.startswith("torch."))
if leaked:
    raise SystemExit(f"torch modules were imported: {leaked}")
"""


def _import_without_torch(module: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-c", _IMPORT_WITHOUT_TORCH, module],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_common_modules_found():
    assert "services.common.errors" in COMMON_MODULES


@pytest.mark.parametrize("module", SERVING_MODULES)
def test_serving_module_imports_without_torch(module):
    proc = _import_without_torch(module)
    if proc.returncode != 0:
        pytest.fail(f"importing {module} with torch absent failed:\n{proc.stderr}", pytrace=False)


def test_torch_is_blocked():
    """The blocker works: a module that imports torch at the top fails to import."""
    proc = _import_without_torch("services.backbones.mobilenet_v2")
    assert proc.returncode != 0
    assert "No module named 'torch'" in proc.stderr

"""The serving path imports with torch absent (STYLE.md section 1).

import-linter checks packages that must never import torch. The classifier's serving modules and the gateway sit
next to torch-using code (``train/``, an optional torch backend), and a chain through a train/ package is hidden
from it, so every module of services, gateway and tracking outside the training code is checked here instead: each
is imported in a fresh interpreter in which every ``import torch`` fails as if torch were not installed.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# Packages allowed to import torch: training code and the torch-only backbones it uses.
TORCH_PACKAGES = ("services.backbones", "services.classifier.train", "services.detector.train")
# Single modules allowed to import torch (an optional torch backend, say). Empty so far.
TORCH_MODULES: tuple[str, ...] = ()


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")


def _allowed_torch(module: str) -> bool:
    return module in TORCH_MODULES or any(module == pkg or module.startswith(pkg + ".") for pkg in TORCH_PACKAGES)


# Every module of the serving packages, whatever files they gain later. A ``__main__`` module runs its program when
# imported, and alembic's migration scripts run only inside alembic, so they are left out.
DISCOVERED = tuple(
    name
    for top in ("services", "gateway", "tracking")
    for name in sorted(_module_name(path) for path in (REPO_ROOT / top).rglob("*.py"))
    if not _allowed_torch(name) and not name.endswith(".__main__") and not name.startswith("gateway.migrations")
)

# The serving path named explicitly as well: these must exist, and a missing one fails rather than being skipped.
REQUIRED = (
    "services.common.errors",
    "services.classifier.api",
    "services.classifier.onnx",
    "services.classifier.preprocess",
    "gateway.cli",
)
SERVING_MODULES = tuple(dict.fromkeys((*REQUIRED, *DISCOVERED)))

# Modules of the training packages that must import without torch too: ``roadlabel``'s parser registers the
# training commands, so a serving install imports their CLIs, and what those import at the top.
TORCH_FREE_TRAINING = (
    "services.backbones.training",
    "services.classifier.train.cli",
    "services.classifier.train.selftrain_cli",
    "services.detector.train.cli",
    "services.detector.train.data",
    "services.detector.train.evaluate",
    "services.detector.train.targets",
)

# Runs in the child interpreter: torch and its submodules raise ModuleNotFoundError, as on a serving install. Prints
# a JSON object {module: traceback or null}. One interpreter for all modules keeps the test fast; a module whose
# import needs torch fails however many modules were imported before it.
_IMPORT_WITHOUT_TORCH = """
import importlib
import importlib.abc
import json
import sys
import traceback


class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torch" or fullname.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by the test)", name=fullname)
        return None


sys.meta_path.insert(0, _NoTorch())
results = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
        results[name] = None
    except BaseException:
        results[name] = traceback.format_exc()
sys.stdout.write(json.dumps(results))
"""


def _import_without_torch(*modules: str) -> dict[str, str | None]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_WITHOUT_TORCH, *modules],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"the import child exited {proc.returncode}:\n{proc.stderr}", pytrace=False)
    results: dict[str, str | None] = json.loads(proc.stdout)
    return results


@functools.cache
def _serving_results() -> dict[str, str | None]:
    return _import_without_torch(*SERVING_MODULES, *TORCH_FREE_TRAINING)


def test_discovery_finds_common_and_skips_training():
    assert "services.common.modelcard" in DISCOVERED
    assert not [name for name in DISCOVERED if name.startswith("services.backbones")]


@pytest.mark.parametrize("module", SERVING_MODULES + TORCH_FREE_TRAINING)
def test_serving_module_imports_without_torch(module):
    error = _serving_results()[module]
    if error is not None:
        pytest.fail(f"importing {module} with torch absent failed:\n{error}", pytrace=False)


def test_torch_is_blocked():
    """The blocker works: a module that imports torch at the top fails to import."""
    error = _import_without_torch("services.backbones.mobilenet_v2")["services.backbones.mobilenet_v2"]
    assert error is not None
    assert "No module named 'torch'" in error

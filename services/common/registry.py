"""The model registry: immutable model versions per task, one promoted version, and a promotion history.

Layout of a registry folder ``REG``::

    REG/<task>/versions/<version>/<task>.onnx          the model (its sha256 is in the card)
    REG/<task>/versions/<version>/<task>.card.json     its card
    REG/<task>/versions/<version>/checkpoint.pt        optional torch checkpoint (fine-tuning starts from it)
    REG/<task>/versions/<version>/files.json           sha256 of every file above, checked on load
    REG/<task>/evals/<version>.<manifest hash>.json    frozen-set figures measured after registration
    REG/<task>/promoted.json                           the promoted version (who, when, forced, why)
    REG/<task>/history.jsonl                           every promotion, one JSON object a line
    REG/<task>/.lock                                   fcntl lock of promotions and additions

A version is added by copying its files into a temporary folder beside ``versions/`` and renaming it into place,
so a version is either complete or absent; it is never changed afterwards. Promotions are a locked
read-modify-write of ``promoted.json`` (written atomically) plus one appended history line.

Promotion rule (:func:`compare_frozen`), on the SAME frozen validation set (same manifest hash) only:

* classifier: track-level frozen accuracy strictly higher, AND crop-level sign accuracy not lower, AND
  background rejection not lower by more than 0.5 percentage point;
* detector: frozen AP50 strictly higher AND recall at the operating point not lower.

``force=True`` promotes anyway and records that it was forced and why. Numpy-free, torch-free.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from services.common.errors import InputError, ModelError
from services.common.modelcard import (
    ModelCard,
    atomic_write_bytes,
    card_path_for,
    file_sha256,
    load_card,
    verify_model_file,
)

__all__ = [
    "BACKGROUND_REJECTION_SLACK",
    "REGISTRY_ENV_VAR",
    "TASKS",
    "PromotionRefused",
    "Registry",
    "Task",
    "VersionInfo",
    "compare_frozen",
    "default_models_dir",
    "frozen_figures_of",
    "is_registered",
    "open_registry",
    "parse_model_spec",
    "resolve_base",
]

Task = Literal["classifier", "detector"]
TASKS: tuple[Task, ...] = ("classifier", "detector")
REGISTRY_ENV_VAR = "ROADLABEL_REGISTRY"
BACKGROUND_REJECTION_SLACK = 0.005
"""Most the classifier's frozen background rejection may drop (0.5 percentage point) for a promotion."""

_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FILES = "files.json"


class PromotionRefused(InputError):
    """The candidate is not better than the promoted version on the frozen set (or cannot be compared)."""


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """One registered version: its folder, model file and card."""

    task: Task
    version: str
    folder: Path
    model_path: Path
    card: ModelCard

    @property
    def checkpoint(self) -> Path | None:
        """The torch checkpoint stored with the version, if any."""
        path = self.folder / "checkpoint.pt"
        return path if path.is_file() else None


def parse_model_spec(spec: str) -> tuple[Task, str]:
    """``classifier`` / ``classifier@promoted`` / ``detector@VERSION`` -> (task, version or 'promoted').

    Raises:
        InputError: not of that form.
    """
    task, _, version = spec.partition("@")
    version = version or "promoted"
    if task not in TASKS or not _VERSION.fullmatch(version):
        raise InputError(
            f"model: expected 'classifier', 'detector', 'TASK@promoted' or 'TASK@VERSION' (version: letters, "
            f"digits, _ . -), got {spec!r}"
        )
    return task, version


def _check_task(task: str) -> Task:
    if task not in TASKS:
        raise InputError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    return task


def frozen_figures_of(card: ModelCard) -> dict[str, Any] | None:
    """The frozen-set figures recorded in a card (``metrics['frozen']``), or None."""
    frozen = card.metrics.get("frozen")
    return frozen if isinstance(frozen, dict) else None


def compare_frozen(task: Task, candidate: dict[str, Any], current: dict[str, Any]) -> tuple[bool, list[str]]:
    """Apply the promotion rule to two sets of frozen figures -> (better, reasons, one per criterion).

    Raises:
        PromotionRefused: the figures are not from the same frozen set (manifest hash), or lack a figure.
    """
    if candidate.get("manifest_sha256") != current.get("manifest_sha256"):
        raise PromotionRefused(
            f"{task}: expected both versions measured on the same frozen set, got manifest "
            f"{str(candidate.get('manifest_sha256'))[:12]} for the candidate and "
            f"{str(current.get('manifest_sha256'))[:12]} for the promoted one; run 'roadlabel models eval' on both"
        )

    def get(figures: dict[str, Any], key: str, who: str) -> float:
        value = figures.get(key)
        if not isinstance(value, int | float):
            raise PromotionRefused(f"{task}: expected frozen figure {key!r} for the {who} version, found {value!r}")
        return float(value)

    checks: list[tuple[bool, str]] = []
    if task == "classifier":
        new, old = get(candidate, "track_accuracy", "candidate"), get(current, "track_accuracy", "promoted")
        checks.append((new > old, f"track accuracy {new:.4f} vs {old:.4f} (must be strictly higher)"))
        new, old = get(candidate, "sign_accuracy", "candidate"), get(current, "sign_accuracy", "promoted")
        checks.append((new >= old, f"crop sign accuracy {new:.4f} vs {old:.4f} (must not be lower)"))
        new = get(candidate, "background_rejection", "candidate")
        old = get(current, "background_rejection", "promoted")
        checks.append(
            (
                new >= old - BACKGROUND_REJECTION_SLACK,
                f"background rejection {new:.4f} vs {old:.4f} (may drop by at most {BACKGROUND_REJECTION_SLACK})",
            )
        )
    else:
        new, old = get(candidate, "ap50", "candidate"), get(current, "ap50", "promoted")
        checks.append((new > old, f"AP50 {new:.4f} vs {old:.4f} (must be strictly higher)"))
        new, old = get(candidate, "recall", "candidate"), get(current, "recall", "promoted")
        checks.append((new >= old, f"recall at the operating point {new:.4f} vs {old:.4f} (must not be lower)"))
    return all(ok for ok, _ in checks), [("ok: " if ok else "FAILS: ") + text for ok, text in checks]


class Registry:
    """A registry folder (see the module docstring). Nothing is created until something is written."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # -- reading -------------------------------------------------------------------------------------------

    def task_dir(self, task: Task) -> Path:
        return self.root / _check_task(task)

    def versions(self, task: Task) -> list[VersionInfo]:
        """Every registered version of ``task``, oldest first (by the card's creation time, then name)."""
        folder = self.task_dir(task) / "versions"
        if not folder.is_dir():
            return []
        infos = [self.get(task, p.name, verify=False) for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
        return sorted(infos, key=lambda i: (str(i.card.extra.get("created", "")), i.version))

    def get(self, task: Task, version: str, *, verify: bool = True) -> VersionInfo:
        """One version (``promoted`` names the promoted one); with ``verify``, every file's sha256 is checked.

        Raises:
            ModelError: no such version, or a file was changed after registration.
        """
        if version == "promoted":
            promoted = self.promoted(task)
            if promoted is None:
                raise ModelError(f"registry {self.root}: expected a promoted {task} version, found none")
            version = promoted
        if not _VERSION.fullmatch(version):
            raise InputError(f"version: expected letters, digits, _ . - (at most 64), got {version!r}")
        folder = self.task_dir(task) / "versions" / version
        model_path = folder / f"{task}.onnx"
        if not model_path.is_file():
            names = sorted(p.name for p in folder.parent.iterdir()) if folder.parent.is_dir() else []
            known = ", ".join(n for n in names if not n.startswith("."))
            raise ModelError(f"registry {self.root}: expected {task} version {version!r}, found none (have: {known})")
        card = load_card(card_path_for(model_path))
        if verify:
            hashed = self._verify(folder)
            # The ONNX file's sha256 was just checked against files.json: the card must name that same hash.
            if hashed.get(model_path.name) != card.onnx_sha256:
                raise ModelError(
                    f"model file {model_path}: expected sha256 {card.onnx_sha256} (from its card), got "
                    f"{hashed.get(model_path.name)}; the file is corrupt or does not belong to this card"
                )
        return VersionInfo(task, version, folder, model_path, card)

    def model_path(self, task: Task, version: str = "promoted") -> Path:
        """The verified ONNX file of a version (default: the promoted one)."""
        return self.get(task, version).model_path

    def resolve(self, spec: str) -> Path:
        """``classifier``, ``classifier@promoted`` or ``classifier@VERSION`` -> the verified ONNX file."""
        task, version = parse_model_spec(spec)
        return self.model_path(task, version)

    def promoted(self, task: Task) -> str | None:
        """The promoted version's name, or None before any promotion."""
        path = self.task_dir(task) / "promoted.json"
        if not path.is_file():
            return None
        version = json.loads(path.read_text(encoding="utf-8")).get("version")
        return str(version) if version else None

    def history(self, task: Task) -> list[dict[str, Any]]:
        """Every promotion of ``task``, oldest first."""
        path = self.task_dir(task) / "history.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def frozen_figures(self, info: VersionInfo, manifest_sha256: str | None = None) -> dict[str, Any] | None:
        """Frozen figures of a version: from its card, or from a later ``evals/`` record (matching manifest)."""
        from_card = frozen_figures_of(info.card)
        if from_card is not None and manifest_sha256 in (None, from_card.get("manifest_sha256")):
            return from_card
        evals = self.task_dir(info.task) / "evals"
        pattern = f"{info.version}.{manifest_sha256 or '*'}.json"
        found = sorted(evals.glob(pattern)) if evals.is_dir() else []
        if not found:
            return from_card if manifest_sha256 is None else None
        figures: dict[str, Any] = json.loads(found[-1].read_text(encoding="utf-8"))
        return figures

    def record_eval(self, info: VersionInfo, figures: dict[str, Any]) -> Path:
        """Store frozen figures measured for a registered version (its card stays as it was registered)."""
        manifest = str(figures.get("manifest_sha256", ""))
        if not re.fullmatch(r"[0-9a-f]{64}", manifest):
            raise InputError(f"frozen figures: expected a manifest_sha256, got {manifest!r}")
        path = self.task_dir(info.task) / "evals" / f"{info.version}.{manifest}.json"
        atomic_write_bytes(path, (json.dumps(figures, indent=1, sort_keys=True) + "\n").encode())
        return path

    # -- writing -------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, task: Task) -> Iterator[None]:
        folder = self.task_dir(task)
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / ".lock").open("a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def add(self, model_path: Path, *, checkpoint: Path | None = None) -> VersionInfo:
        """Register a model (``x.onnx`` with ``x.card.json`` beside it, optionally a checkpoint); not promoted.

        Adding a version that is already registered with the same ONNX sha256 returns it unchanged.

        Raises:
            ModelError: the card is missing or invalid, or the ONNX file is not the card's.
            InputError: a different model is registered under the same version.
        """
        card = load_card(card_path_for(model_path))
        verify_model_file(model_path, card)
        task = _check_task(card.task)
        if not _VERSION.fullmatch(card.version):
            raise InputError(f"model card version: expected letters, digits, _ . -, got {card.version!r}")
        if checkpoint is not None and not checkpoint.is_file():
            raise InputError(f"checkpoint: expected a file at {checkpoint}, found nothing")
        versions = self.task_dir(task) / "versions"
        with self._locked(task):
            final = versions / card.version
            if final.exists():
                existing = self.get(task, card.version)
                if existing.card.onnx_sha256 != card.onnx_sha256:
                    raise InputError(
                        f"registry: version {card.version} is already registered with another model "
                        f"(sha256 {existing.card.onnx_sha256[:12]}, not {card.onnx_sha256[:12]})"
                    )
                return existing
            versions.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{card.version}.", dir=versions))
            try:
                shutil.copyfile(model_path, tmp / f"{task}.onnx")
                card.save(tmp / f"{task}.card.json")
                if checkpoint is not None:
                    shutil.copyfile(checkpoint, tmp / "checkpoint.pt")
                files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
                atomic_write_bytes(tmp / _FILES, (json.dumps(files, indent=1) + "\n").encode())
                for p in tmp.iterdir():
                    p.chmod(0o444)
                tmp.chmod(0o755)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return self.get(task, card.version)

    def added_line(self, info: VersionInfo) -> str:
        """What a training command tells its user after registering ``info``: the version and how to promote it."""
        task = info.task
        return (
            f"registered {task}@{info.version} in {self.root} (parent {info.card.parent_version}); "
            f"promote with: roadlabel models promote {task} {info.version} --registry {self.root}"
        )

    def seed(self, models_dir: Path) -> list[str]:
        """On first use, register ``models_dir/<task>.onnx`` as version 1 of each task and promote it.

        Tasks that already have a promoted version, or no model in ``models_dir``, are left alone.
        Returns the tasks seeded.
        """
        seeded: list[str] = []
        for task in TASKS:
            source = models_dir / f"{task}.onnx"
            if self.promoted(task) is not None or not source.is_file():
                continue
            info = self.add(source)
            with self._locked(task):
                if self.promoted(task) is None:
                    self._write_promotion(info, None, forced=False, reason=f"seeded from {models_dir}", rule=[])
                    seeded.append(task)
        return seeded

    def promote(
        self,
        task: Task,
        version: str,
        *,
        force: bool = False,
        reason: str | None = None,
        who: str | None = None,
    ) -> dict[str, Any]:
        """Promote ``version`` if it beats the promoted one on the frozen set (or ``force``); return the record.

        Raises:
            PromotionRefused: not better, not comparable (different frozen sets, no figures), or forced without
                a reason.
            ModelError: no such version, or its files changed.
        """
        if force and not (reason and reason.strip()):
            raise PromotionRefused(f"{task}: a forced promotion needs --reason TEXT, got none")
        candidate = self.get(task, version)
        with self._locked(task):
            current_name = self.promoted(task)
            if current_name == candidate.version:
                raise PromotionRefused(f"{task}: version {candidate.version} is already the promoted one")
            rule: list[str] = []
            better = True
            if current_name is not None:
                current = self.get(task, current_name)
                cur_fig = self.frozen_figures(current)
                manifest = cur_fig.get("manifest_sha256") if cur_fig else None
                cand_fig = self.frozen_figures(candidate, manifest)
                if cur_fig is None or cand_fig is None:
                    missing = current.version if cur_fig is None else candidate.version
                    if not force:
                        raise PromotionRefused(
                            f"{task}: expected figures of version {missing} on the same frozen set as the promoted "
                            f"{current.version} (manifest {str(manifest)[:12]}), found none; run 'roadlabel models "
                            f"eval {task}@{missing}' first (or --force --reason TEXT)"
                        )
                    better, rule = False, [f"not compared: no frozen figures for {missing}"]
                else:
                    try:
                        better, rule = compare_frozen(task, cand_fig, cur_fig)
                    except PromotionRefused as exc:
                        if not force:
                            raise
                        better, rule = False, [str(exc)]
                if not better and not force:
                    raise PromotionRefused(
                        f"{task}: version {candidate.version} is not better than the promoted {current_name} on "
                        "the frozen set: " + "; ".join(rule)
                    )
            return self._write_promotion(
                candidate, current_name, forced=force and not better, reason=reason, rule=rule, who=who
            )

    def _write_promotion(
        self,
        info: VersionInfo,
        previous: str | None,
        *,
        forced: bool,
        reason: str | None,
        rule: list[str],
        who: str | None = None,
    ) -> dict[str, Any]:
        record: dict[str, Any] = {
            "task": info.task,
            "version": info.version,
            "previous": previous,
            "promoted_at": datetime.now(UTC).isoformat(),
            "by": who or _whoami(),
            "forced": forced,
            "reason": reason,
            "rule": rule,
            "onnx_sha256": info.card.onnx_sha256,
            "frozen": self.frozen_figures(info),
        }
        folder = self.task_dir(info.task)
        with (folder / "history.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        atomic_write_bytes(folder / "promoted.json", (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
        return record

    def _verify(self, folder: Path) -> dict[str, str]:
        """Check every file of a version against its ``files.json``; returns those sha256 by file name."""
        manifest = folder / _FILES
        if not manifest.is_file():
            raise ModelError(f"registry version {folder}: expected {_FILES} (sha256 of its files), found nothing")
        files: dict[str, str] = json.loads(manifest.read_text(encoding="utf-8"))
        for name, want in files.items():
            path = folder / name
            got = file_sha256(path) if path.is_file() else "missing"
            if got != want:
                raise ModelError(
                    f"registry version {folder}: expected {name} with sha256 {want[:12]}, got {got[:12]}; "
                    "versions are immutable, this one was changed after registration"
                )
        return files


def default_models_dir() -> Path:
    """``<repo>/deploy/models``: the committed models that seed a new registry (an editable install's checkout)."""
    return Path(__file__).resolve().parents[2] / "deploy" / "models"


def is_registered(model_path: Path) -> bool:
    """Whether ``model_path`` is a registered version's file (``REG/<task>/versions/<version>/``): immutable."""
    folder = model_path.resolve().parent
    return folder.parent.name == "versions" and (folder / _FILES).is_file()


def open_registry(path: Path | None, *, seed_from: Path | None = None) -> Registry | None:
    """The registry at ``path`` (else ``$ROADLABEL_REGISTRY``), seeded on first use; None when neither is set."""
    chosen = path or (Path(os.environ[REGISTRY_ENV_VAR]) if os.environ.get(REGISTRY_ENV_VAR) else None)
    if chosen is None:
        return None
    registry = Registry(chosen)
    registry.seed(seed_from or default_models_dir())
    return registry


def resolve_base(
    spec: str | None, registry_dir: Path | None, task: Task
) -> tuple[Path | None, Path | None, Registry | None]:
    """A training's ``--base`` and ``--registry`` -> (base ONNX path, its checkpoint or None, the registry to add
    the new version to). ``spec`` is a path to an .onnx (its card beside it) or ``TASK@VERSION`` / ``TASK``.

    Raises:
        InputError: The file is missing, the version names another task, or a version is named without a registry.
    """
    registry = open_registry(registry_dir)
    if spec is None:
        return None, None, registry
    if spec.endswith(".onnx"):
        path = Path(spec)
        if not path.is_file():
            raise InputError(f"--base: expected an .onnx file with its card beside it, got {path} (no such file)")
        beside = path.parent / "checkpoint.pt"
        return path, (beside if beside.is_file() else None), registry
    named, version = parse_model_spec(spec)
    if named != task:
        raise InputError(f"--base: expected a {task} version, got {spec!r}")
    if registry is None:
        raise InputError(f"--base {spec}: expected --registry DIR or ${REGISTRY_ENV_VAR} to find it")
    info = registry.get(named, version)
    return info.model_path, info.checkpoint, registry


def _whoami() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"

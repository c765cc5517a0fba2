"""From a training run directory to a published, parity-checked model version."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelloop.errors import ModelloopError
from modelloop.export.metadata import build_metadata
from modelloop.export.onnx import MIN_OPSET, export_onnx
from modelloop.export.publish import PublishError, publish_version, staging_dir, validate_model_name
from modelloop.export.saved_model import export_saved_model
from modelloop.export.verify import DEFAULT_ATOL, DEFAULT_RTOL, ParityReport, verify_export
from modelloop.export.warmup import write_warmup_requests
from modelloop.layout import (
    BASELINE_FILE,
    ONNX_FILE,
    RUN_FILES,
    RUN_INFO_FILE,
    RUN_METRICS_FILE,
    RUN_MODEL_FILE,
    RUN_SPLIT_FILE,
    SAVED_MODEL_DIR,
    write_model_card,
)


class ExportError(ModelloopError):
    """The run cannot be exported, or the export failed its parity check."""


@dataclass(frozen=True)
class ExportResult:
    """A published version and the parity report it passed.

    Attributes:
        version_dir: The published directory.
        version: Its version.
        parity: Keras against the SavedModel against ONNX Runtime.
        model_py: For a version served by its ``model.py``: that code against Keras on
            the spec's samples (``passed``, ``max_abs_diff``, ``rows``). Defaults to None.
    """

    version_dir: Path
    version: int
    parity: ParityReport
    model_py: dict[str, Any] | None = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"run file {str(path)!r} is unreadable or corrupt: {exc}") from exc
    if not isinstance(data, dict):
        raise ExportError(f"run file {str(path)!r} is not a JSON object")
    return data


def read_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Checks a run directory and returns its ``run.json`` and ``metrics.json``.

    Raises:
        ExportError: The directory is missing, incomplete or corrupt.
    """
    if not run_dir.is_dir():
        raise ExportError(f"run directory {str(run_dir)!r} does not exist")
    missing = [f for f in RUN_FILES if not (run_dir / f).exists()]
    if missing:
        raise ExportError(f"run directory {str(run_dir)!r} is incomplete: missing {', '.join(missing)}")
    run_info = _read_json(run_dir / RUN_INFO_FILE)
    metrics = _read_json(run_dir / RUN_METRICS_FILE)
    for key in ("run_id", "spec", "input", "output"):
        if key not in run_info:
            raise ExportError(f"run file {str(run_dir / RUN_INFO_FILE)!r} lacks {key!r}")
    return run_info, metrics


def _load_model(run_dir: Path, run_info: dict[str, Any]) -> Any:
    import keras

    from modelloop.training.spec import SpecError, load_spec

    # Importing the spec registers any custom layers or model classes it defines.
    with contextlib.suppress(SpecError):
        load_spec(run_info["spec"]["source"])
    try:
        return keras.saving.load_model(run_dir / RUN_MODEL_FILE, compile=False)
    except Exception as exc:
        raise ExportError(
            f"cannot load {str(run_dir / RUN_MODEL_FILE)!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from exc


@dataclass(frozen=True)
class StagedExport:
    """A complete, parity-checked version directory under ``<repo>/.staging/``, not yet published.

    Attributes:
        path: The staged directory (``saved_model/``, ``model.onnx``, ``baseline.json``).
        name: The model name it will be published under.
        run_info: The run's ``run.json``.
        metrics: The run's ``metrics.json``.
        parity: The parity report it passed.
        opset: The ONNX opset it was exported with.
        card: Keys of ``model.json`` that replace the ones built from the run (a version
            served by its ``model.py`` declares that code's inputs and outputs). Defaults
            to empty.
    """

    path: Path
    name: str
    run_info: dict[str, Any]
    metrics: dict[str, Any]
    parity: ParityReport
    opset: int
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def onnx_path(self) -> Path:
        """The staged ``model.onnx``, for evaluating the candidate before it is published."""
        return self.path / ONNX_FILE


def stage_export(
    run_dir: Path,
    staged: Path,
    *,
    name: str,
    opset: int = MIN_OPSET,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> StagedExport:
    """Exports a run to SavedModel and ONNX into ``staged`` and checks parity; publishes nothing.

    Args:
        run_dir: A run directory written by ``modelloop train``.
        staged: An empty directory from :func:`modelloop.export.publish.staging_dir`.
        name: Model name in the repository (validated).
        opset: ONNX opset. Defaults to 17.
        atol: Absolute parity tolerance. Defaults to 1e-5.
        rtol: Relative parity tolerance. Defaults to 1e-6.

    Returns:
        The staged export, ready for :func:`publish_staged`.

    Raises:
        ExportError: Bad run directory, unloadable model or failed parity check.
    """
    run_info, metrics = read_run(run_dir)
    name = validate_model_name(name)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    model = _load_model(run_dir, run_info)
    try:
        split = np.load(run_dir / RUN_SPLIT_FILE)
        rows = np.asarray(split["x_test"], dtype=np.float32)
        # Warm-up samples come from the validation split (a run written before it was
        # saved there has only the test split).
        val_rows = np.asarray(split["x_val"] if "x_val" in split.files else rows, dtype=np.float32)
    except Exception as exc:
        raise ExportError(
            f"run file {str(run_dir / RUN_SPLIT_FILE)!r} is unreadable or corrupt: {exc}"
        ) from exc

    input_name = run_info["input"]["name"]
    output_name = run_info["output"]["name"]
    export_saved_model(
        model,
        staged / SAVED_MODEL_DIR,
        input_name=input_name,
        output_name=output_name,
        n_features=int(run_info["input"]["shape"][1]),
    )
    export_onnx(staged / SAVED_MODEL_DIR, staged / ONNX_FILE, opset=opset)
    parity = verify_export(
        model,
        staged / SAVED_MODEL_DIR,
        staged / ONNX_FILE,
        rows,
        input_name=input_name,
        output_name=output_name,
        atol=atol,
        rtol=rtol,
    )
    if not parity.passed:
        raise ExportError(f"parity check failed, nothing published: {parity.summary()}")
    card: dict[str, Any] = {}
    if run_info.get("runtime") == "python":
        card = _stage_python_model(run_dir, staged, run_info, model, parity, atol=atol, rtol=rtol)
    else:
        shutil.copyfile(run_dir / BASELINE_FILE, staged / BASELINE_FILE)
        write_warmup_requests(staged, {input_name: val_rows if len(val_rows) else rows})
    return StagedExport(
        path=staged, name=name, run_info=run_info, metrics=metrics, parity=parity, opset=opset, card=card
    )


def _stage_python_model(
    run_dir: Path,
    staged: Path,
    run_info: dict[str, Any],
    model: Any,
    parity: ParityReport,
    *,
    atol: float,
    rtol: float,
) -> dict[str, Any]:
    """Adds the spec's ``model.py`` to a staged version, checks it and returns its card keys."""
    from modelloop.export import python_model as staging
    from modelloop.training.spec import SpecError, load_spec

    source = run_info["spec"]["source"]
    try:
        spec = load_spec(source)
    except SpecError as exc:
        raise ExportError(
            f"the run is served by its spec's model.py, but the spec cannot be loaded: {exc}"
        ) from exc
    if spec.python_model is None:
        raise ExportError(
            f"the run is served by a model.py, but spec {source!r} no longer declares PYTHON_MODEL"
        )
    staging.stage_python_model(staged, run_info, spec.python_model)
    try:
        python = staging.verify_python_model(
            model, staged, spec.python_model, run_info["output"]["name"], atol=atol, rtol=rtol
        )
    except staging.PythonModelExportError as exc:
        raise ExportError(f"{exc}; nothing published") from exc
    if not python.passed:
        raise ExportError(
            f"parity check of model.py failed, nothing published: max abs diff {python.max_abs_diff:.3g} "
            f"against Keras (atol {atol:g}, rtol {rtol:g})"
        )
    # model.py takes what clients send, not the split's feature rows: it warms up on the
    # spec's raw samples.
    write_warmup_requests(staged, spec.python_model.sample_inputs()[0])
    # model.py runs model.onnx; the SavedModel was only the way to it.
    shutil.rmtree(staged / SAVED_MODEL_DIR)
    baseline = json.loads((run_dir / BASELINE_FILE).read_text())
    input_name = str(spec.python_model.inputs[0]["name"])
    reference = staging.baseline_without_features(baseline, input_name)
    (staged / BASELINE_FILE).write_text(json.dumps(reference, indent=2) + "\n")
    return staging.card_overrides(spec.python_model, parity.to_dict(), python)


def publish_staged(
    staged: StagedExport, repo: Path, *, extra_metadata: dict[str, Any] | None = None
) -> ExportResult:
    """Publishes a staged export as the next version, writing its ``model.json`` under the lock.

    Args:
        staged: What :func:`stage_export` returned; its directory must be under ``<repo>/.staging/``.
        repo: The model repository root.
        extra_metadata: Keys merged into ``model.json`` (a retrain's gate result, say).
            Defaults to None.

    Returns:
        The published version.

    Raises:
        PublishError: Unwritable repository or the rename failed.
    """

    def finalize(path: Path, version: int) -> None:
        meta = build_metadata(
            name=staged.name,
            version=version,
            run_info=staged.run_info,
            metrics=staged.metrics,
            parity=staged.parity.to_dict(),
            opset=staged.opset,
        )
        meta.update(staged.card)
        meta.update(extra_metadata or {})
        write_model_card(path, meta)

    version_dir = publish_version(staged.path, repo, staged.name, finalize=finalize)
    return ExportResult(
        version_dir=version_dir,
        version=int(version_dir.name),
        parity=staged.parity,
        model_py=staged.card.get("parity", {}).get("model_py"),
    )


def export_run(
    run_dir: Path,
    repo: Path,
    *,
    name: str | None = None,
    opset: int = MIN_OPSET,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> ExportResult:
    """Exports a run to SavedModel and ONNX, checks parity, and publishes the next version.

    Args:
        run_dir: A run directory written by ``modelloop train``.
        repo: The model repository root; created if missing.
        name: Model name in the repository. Defaults to the spec's name.
        opset: ONNX opset. Defaults to 17.
        atol: Absolute parity tolerance. Defaults to 1e-5.
        rtol: Relative parity tolerance. Defaults to 1e-6.

    Returns:
        The published version.

    Raises:
        ExportError: Bad run directory, unloadable model or failed parity check.
        PublishError: Bad name or unwritable repository.
    """
    run_info, _ = read_run(run_dir)
    name = validate_model_name(run_info["spec"]["name"] if name is None else name)
    try:
        repo.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PublishError(f"repository {str(repo)!r} cannot be created: {exc.strerror}") from exc
    with staging_dir(repo) as staged:
        export = stage_export(run_dir, staged, name=name, opset=opset, atol=atol, rtol=rtol)
        return publish_staged(export, repo)

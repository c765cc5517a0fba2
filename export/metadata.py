"""``model.json``: what a server needs to know about one published version."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from modelloop.layout import VERSION_FILES


def build_metadata(
    *,
    name: str,
    version: int,
    run_info: dict[str, Any],
    metrics: dict[str, Any],
    parity: dict[str, Any],
    opset: int,
) -> dict[str, Any]:
    """Builds the content of ``model.json``.

    Tensor shapes use -1 for the batch dimension; dtypes are NumPy names
    (``float32``), which the serving side maps to TF Serving and OIP datatypes.
    """
    return {
        "name": name,
        "version": version,
        "task": run_info["spec"]["task"],
        "signature_name": "serving_default",
        "inputs": [run_info["input"]],
        "outputs": [run_info["output"]],
        "labels": run_info.get("class_labels", []),
        "feature_names": run_info.get("feature_names", []),
        "metrics": {
            "main_metric": metrics.get("main_metric"),
            "higher_is_better": metrics.get("higher_is_better"),
            "test": metrics.get("test"),
            "baselines": metrics.get("baselines"),
            "strongest_baseline": metrics.get("strongest_baseline"),
            "robustness": (metrics.get("robustness") or {}).get("model"),
            "kfold": metrics.get("kfold"),
            "hparams": metrics.get("hparams"),
            "best_epoch": metrics.get("best_epoch"),
        },
        "training_run": {
            "run_id": run_info["run_id"],
            "spec": run_info["spec"],
            "created": run_info["created"],
            "seed": run_info.get("seed"),
            "versions": run_info.get("versions", {}),
            "feedback_rows": metrics.get("feedback_rows", 0),
        },
        "files": dict(VERSION_FILES),
        "onnx_opset": opset,
        "parity": parity,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }

"""Numerical parity of an export: Keras against the SavedModel against ONNX Runtime."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_ATOL = 1e-5
# float32 carries about 7 significant digits: a regressor's output of 250 cannot be
# compared to 1e-5 absolutely (its spacing there is 1.5e-5). The bound is
# |a - b| <= atol + rtol * |b|, so outputs in [0, 1] (probabilities) keep an effective
# absolute bound of 1.1e-5 and large outputs get a few float32 ulps.
DEFAULT_RTOL = 1e-6
DEFAULT_BATCH_SIZES = (1, 64)


@dataclass(frozen=True)
class ParityReport:
    """Largest absolute differences between the three forms of one model.

    Attributes:
        passed: Every difference is within ``atol + rtol * |reference|``.
        atol: The absolute tolerance.
        rtol: The relative tolerance.
        batch_sizes: Batch sizes the rows were sent in.
        rows: Rows compared at each batch size.
        max_abs_diff: Per pair (``keras_vs_saved_model``, ``keras_vs_onnx``,
            ``saved_model_vs_onnx``), the largest difference over all batch sizes.
        per_batch_size: The same, per batch size.
    """

    passed: bool
    atol: float
    rtol: float
    batch_sizes: list[int]
    rows: dict[str, int]
    max_abs_diff: dict[str, float]
    per_batch_size: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-serialisable data."""
        return asdict(self)

    def summary(self) -> str:
        """One line with the worst difference of each pair."""
        diffs = ", ".join(f"{k}={v:.3g}" for k, v in self.max_abs_diff.items())
        return f"max abs diff {diffs} (atol {self.atol:g}, rtol {self.rtol:g})"


def _batches(x: np.ndarray, size: int) -> list[np.ndarray]:
    return [x[i : i + size] for i in range(0, len(x), size)]


def verify_export(
    model: Any,
    saved_model_dir: Path,
    onnx_path: Path,
    rows: np.ndarray,
    *,
    input_name: str,
    output_name: str,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    single_rows: int = 16,
) -> ParityReport:
    """Runs real rows through the Keras model, the reloaded SavedModel and ONNX Runtime.

    Args:
        model: The Keras model that was exported.
        saved_model_dir: The exported SavedModel.
        onnx_path: The exported ONNX file.
        rows: Real input rows (test split), float32 ``[n, n_features]``.
        input_name: Served input name.
        output_name: Served output name.
        atol: Absolute part of the allowed difference. Defaults to 1e-5.
        rtol: Relative part of the allowed difference. Defaults to 1e-6.
        batch_sizes: Batch sizes to compare at. Defaults to (1, 64).
        single_rows: Rows sent one at a time for batch size 1. Defaults to 16.

    Returns:
        The report; ``passed`` is False if any difference exceeds
        ``atol + rtol * |reference|``, the reference being the first of each pair.
    """
    import onnxruntime as ort
    import tensorflow as tf

    from modelloop.export.saved_model import load_signature

    signature = load_signature(saved_model_dir)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    pairs = ("keras_vs_saved_model", "keras_vs_onnx", "saved_model_vs_onnx")
    worst = dict.fromkeys(pairs, 0.0)
    passed = True
    per_size: dict[str, dict[str, float]] = {}
    counted: dict[str, int] = {}
    x = np.asarray(rows, dtype=np.float32)
    for size in batch_sizes:
        sample = x[: single_rows if size == 1 else max(size, len(x))]
        diffs = dict.fromkeys(pairs, 0.0)
        for batch in _batches(sample, size):
            k = np.asarray(model(batch, training=False), dtype=np.float32)
            s = signature(**{input_name: tf.constant(batch)})[output_name].numpy()
            o = session.run([output_name], {input_name: batch})[0]
            for pair, (a, b) in zip(pairs, ((k, s), (k, o), (s, o)), strict=True):
                diffs[pair] = max(diffs[pair], float(np.max(np.abs(a - b))))
                passed = passed and bool(np.all(np.abs(a - b) <= atol + rtol * np.abs(a)))
        per_size[str(size)] = diffs
        counted[str(size)] = len(sample)
        for pair in pairs:
            worst[pair] = max(worst[pair], diffs[pair])
    return ParityReport(
        passed=passed,
        atol=atol,
        rtol=rtol,
        batch_sizes=list(batch_sizes),
        rows=counted,
        max_abs_diff=worst,
        per_batch_size=per_size,
    )

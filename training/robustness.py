"""Test metrics under input perturbations that fit the task, for the model and the baselines.

A model that is right on clean rows but confidently wrong on slightly noisy ones is what
the drift and accuracy monitors then have to catch in production; these figures catch it
at training time. Every perturbation is seeded and applied to the test rows once, so the
model and each baseline are scored on exactly the same perturbed rows:

- ``noise_<level>``: Gaussian noise with a standard deviation of ``level`` times each
  feature's range (the pixel range for image specs, the training range otherwise),
  clipped to that range, at each of :data:`NOISE_LEVELS`. For digits, level 0.125 is
  σ = 2 on the 0..16 pixel scale.
- ``out_of_range``: one value per row outside what training saw. Where features were
  constant in training, one of them per row (chosen at random) is moved off its constant
  by the data's typical range (the median training range over features: 16 for digits).
  Where none was, the feature nearest to constant (smallest std relative to its range)
  is set one training range above its training maximum.
- ``stray_pixel`` (image specs only): one pixel per row, chosen at random, set to the top
  of the pixel range.

Example:

```python
suite = perturbation_suite(x_test, scaling, feature_names, image=True, seed=42)
report = robustness_report("multiclass", y_test, suite, {"model": model_outputs})
```
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelloop.training.evaluation import main_metric, score
from modelloop.training.preprocessing import InputScaling
from modelloop.training.spec import TaskType

NOISE_LEVELS: tuple[float, ...] = (0.0625, 0.125)
"""The two noise levels in ``metrics.json``, as a share of each feature's range."""
CURVE_LEVELS: tuple[float, ...] = (0.0, 0.025, 0.05, 0.0625, 0.1, 0.125, 0.175, 0.25)
"""The noise levels of the metric-against-noise plot."""
GATE_NOISE_LEVEL = NOISE_LEVELS[-1]
"""The level the retrain gate compares candidate and serving version at."""

Predict = Callable[[np.ndarray], np.ndarray]


def noise_key(level: float) -> str:
    """The ``metrics.json`` key of one noise level, e.g. ``noise_0.125``."""
    return f"noise_{level:g}"


def gaussian_noise(
    x: np.ndarray, low: np.ndarray, high: np.ndarray, level: float, rng: np.random.Generator
) -> np.ndarray:
    """Adds noise of ``level`` times each feature's range and clips to the range.

    Args:
        x: Raw rows, ``[n, n_features]``.
        low: Per feature, the low end of its range.
        high: Per feature, the high end.
        level: Standard deviation as a share of ``high - low``.
        rng: The random generator (seeded by the caller).

    Returns:
        Float32 rows of the same shape.
    """
    width = np.asarray(high, dtype=np.float64) - np.asarray(low, dtype=np.float64)
    noisy = np.asarray(x, dtype=np.float64) + rng.normal(size=x.shape) * (level * width)
    return np.clip(noisy, low, high).astype(np.float32)


@dataclass(frozen=True)
class PerturbationSuite:
    """The perturbed copies of one set of rows, and what was done to them.

    Attributes:
        sets: Name (``noise_0.0625``, ``out_of_range``, ...) -> perturbed rows.
        curve: Noise level -> noisy rows, for the plot (level 0 is the clean rows).
        described: Name -> what the perturbation did, for ``metrics.json``.
    """

    sets: dict[str, np.ndarray]
    curve: dict[float, np.ndarray]
    described: dict[str, Any] = field(default_factory=dict)


def out_of_range(
    x: np.ndarray, scaling: InputScaling, feature_names: list[str], rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, Any]]:
    """One value per row outside the training range (see the module docstring).

    Returns:
        The rows and a description: the candidate features, the offset or value, and
        whether they were constant in training.
    """
    rows = np.array(x, dtype=np.float32, copy=True)
    constant = np.flatnonzero(scaling.constant)
    spread = scaling.train_max - scaling.train_min
    if len(constant):
        typical = float(np.median(spread[~scaling.constant])) if (~scaling.constant).any() else 1.0
        typical = typical or 1.0
        chosen = rng.choice(constant, size=len(rows))
        rows[np.arange(len(rows)), chosen] = (scaling.train_max[chosen] + typical).astype(np.float32)
        return rows, {
            "features": [feature_names[i] for i in constant],
            "constant_in_training": True,
            "offset": typical,
        }
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(spread > 0, scaling.train_std / spread, np.inf)
    j = int(np.argmin(relative)) if len(relative) else 0
    value = float(scaling.train_max[j] + spread[j])
    rows[:, j] = value
    return rows, {"features": [feature_names[j]], "constant_in_training": False, "value": value}


def stray_pixel(x: np.ndarray, high: float, rng: np.random.Generator) -> np.ndarray:
    """Sets one pixel per row, chosen at random, to ``high``."""
    rows = np.array(x, dtype=np.float32, copy=True)
    rows[np.arange(len(rows)), rng.integers(0, rows.shape[1], size=len(rows))] = high
    return rows


def perturbation_suite(
    x: np.ndarray, scaling: InputScaling, feature_names: list[str], *, image: bool, seed: int
) -> PerturbationSuite:
    """Builds every perturbed copy of ``x`` once, seeded.

    Args:
        x: Clean raw rows (the test split).
        scaling: The run's input scaling: its ``low``/``high`` are the noise ranges.
        feature_names: One name per column.
        image: Whether the spec's inputs are pixels (adds ``stray_pixel``).
        seed: Seed of every draw.

    Returns:
        The suite.
    """
    rng = np.random.default_rng(seed)
    sets: dict[str, np.ndarray] = {}
    described: dict[str, Any] = {}
    for level in NOISE_LEVELS:
        sets[noise_key(level)] = gaussian_noise(x, scaling.low, scaling.high, level, rng)
        described[noise_key(level)] = {"sigma_share_of_range": level, "clipped_to_range": True}
    sets["out_of_range"], described["out_of_range"] = out_of_range(x, scaling, feature_names, rng)
    if image:
        top = float(np.max(scaling.high))
        sets["stray_pixel"] = stray_pixel(x, top, rng)
        described["stray_pixel"] = {"value": top}
    curve: dict[float, np.ndarray] = {}
    for level in CURVE_LEVELS:
        key = noise_key(level)
        if level == 0.0:
            curve[level] = np.asarray(x, dtype=np.float32)
        elif key in sets:
            curve[level] = sets[key]
        else:
            curve[level] = gaussian_noise(x, scaling.low, scaling.high, level, rng)
    return PerturbationSuite(sets=sets, curve=curve, described=described)


def robustness_report(
    task: TaskType, y: np.ndarray, suite: PerturbationSuite, predictors: Mapping[str, Predict]
) -> dict[str, Any]:
    """Scores each predictor on every perturbed set and along the noise curve.

    Args:
        task: The task type.
        y: True targets of the rows the suite perturbed.
        suite: The perturbed rows.
        predictors: Name -> a function from raw rows to outputs (probabilities or values),
            e.g. ``{"model": ..., "logistic_regression": ...}``.

    Returns:
        ``{"perturbations": ..., "scores": {name: {set: metrics}}, "curve": {"levels":
        [...], "metric": ..., name: [...]}}``.
    """
    metric = main_metric(task)
    scores: dict[str, dict[str, dict[str, float]]] = {}
    curve: dict[str, Any] = {"levels": list(suite.curve), "metric": metric}
    # One call per predictor over every perturbed copy: a Keras predict has a fixed cost per call.
    blocks = [*suite.sets.values(), *suite.curve.values()]
    bounds = np.cumsum([0, *(len(rows) for rows in blocks)])
    stacked = np.concatenate(blocks)
    for name, predict in predictors.items():
        outputs = predict(stacked)
        parts = [outputs[bounds[i] : bounds[i + 1]] for i in range(len(blocks))]
        named = dict(zip(suite.sets, parts[: len(suite.sets)], strict=True))
        scores[name] = {key: score(task, y, out) for key, out in named.items()}
        curve[name] = [score(task, y, out)[metric] for out in parts[len(suite.sets) :]]
    return {"perturbations": suite.described, "scores": scores, "curve": curve}


def plot_robustness(
    curve: Mapping[str, Any], path: Path, *, title: str = "Metric against input noise"
) -> None:
    """Writes the metric-against-noise plot: one line per predictor, the model drawn bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = curve["levels"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in curve.items():
        if name in ("levels", "metric"):
            continue
        bold = name == "model"
        ax.plot(
            levels, values, marker="o", linewidth=2.5 if bold else 1.2, label=name, zorder=3 if bold else 2
        )
    ax.set_xlabel("Gaussian noise σ (share of each feature's range)")
    ax.set_ylabel(f"test {curve['metric']}")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)

"""The retrain's settings, per model from ``config.json``'s ``"retrain"`` block, and its start-up error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelloop import layout
from modelloop.errors import ModelloopError


class RetrainError(ModelloopError):
    """The retrain cannot start: unknown model, no version, unreadable metadata or settings."""


class RetrainSettings(BaseModel):
    """Gate and training knobs; per model from ``<repo>/<name>/config.json`` key ``"retrain"``.

    Example:

    ```json
    {"retrain": {"epochs": 5, "accuracy_floor": 0.85, "tolerance": 0.01}}
    ```
    """

    model_config = ConfigDict(extra="forbid")

    epochs: int | None = Field(default=None, ge=1)
    """Most epochs of the retrain; None = the spec's own."""
    accuracy_floor: float | None = Field(default=None, ge=0, le=1)
    """Classifiers: lowest accuracy on the fixed evaluation set; None = beat the majority class."""
    mae_ceiling: float | None = Field(default=None, gt=0)
    """Regressors: highest MAE on the fixed evaluation set; None = beat the mean predictor."""
    tolerance: float = Field(default=0.01, ge=0)
    """How much worse than the serving version (in metric units) a candidate may be."""
    holdout_fraction: float = Field(default=0.3, ge=0, lt=1)
    """Share of the most recent trusted labelled rows kept out of training, for the evaluation set."""
    max_feedback_rows: int = Field(default=100_000, ge=0)
    """Most recent labelled rows used at all; older ones are ignored."""
    max_source_share: float = Field(default=0.5, gt=0, le=1)
    """Most of the training rows (spec rows included) one labeler source may contribute; 1 = no cap.

    0.5: a single source, one leaked token or one buggy pipeline, never outweighs the
    curated data and every other source together, yet one labelling team stays useful."""
    class_margin: float = Field(default=0.05, ge=0, le=1)
    """Classifiers: most a class's recall on the trusted set may fall against the serving version."""
    decile_margin: float = Field(default=0.25, ge=0)
    """Regressors: most a target decile's MAE may grow, as a share of the serving version's."""
    min_slice_rows: int = Field(default=20, ge=1)
    """Slices (classes, deciles) with fewer evaluation rows are reported but not gated.

    20: below it one row moves a recall by more than the 0.05 margin."""
    much_worse_accuracy: float = Field(default=0.05, ge=0, le=1)
    """Classifiers: accuracy points by which a candidate is "much worse" (robustness checks)."""
    much_worse_mae_ratio: float = Field(default=0.10, ge=0)
    """Regressors: share of the reference MAE by which a candidate is "much worse"."""
    baseline_check: bool = False
    """Reject a candidate much worse than the strongest shallow baseline on the same rows.

    Off by default: the comparison is always made and a candidate much worse than the
    shallow model is named so in the verdict, but rejecting it would keep a serving version
    that is usually worse still (after drift, a few epochs of the network catch up more
    slowly than an SVC refitted on the same rows)."""

    @classmethod
    def for_model(cls, model_dir: Path, **overrides: Any) -> RetrainSettings:
        """Reads ``config.json``'s ``"retrain"`` block and applies ``overrides`` on top.

        Raises:
            RetrainError: ``config.json`` is unreadable or its ``"retrain"`` block is invalid.
        """
        values: dict[str, Any] = {}
        config = model_dir / layout.CONFIG_FILE
        if config.exists():
            try:
                raw = json.loads(config.read_text())
            except (OSError, ValueError) as exc:
                raise RetrainError(f"{str(config)!r} is unreadable: {exc}") from exc
            block = raw.get("retrain", {}) if isinstance(raw, dict) else {}
            if not isinstance(block, dict):
                raise RetrainError(f'{str(config)!r}: "retrain" must be an object')
            values.update(block)
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise RetrainError(f"invalid retrain setting {where}: {first['msg']}") from None

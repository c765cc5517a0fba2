"""Monitoring settings: where predictions and labels go, windows, and drift thresholds.

``MonitoringSettings`` is built once by the CLI (from arguments, then
``MODELLOOP_MONITORING_*`` environment variables) and passed in. A model may override the
thresholds in the ``"drift"`` key of its ``config.json``; :func:`resolve_model_settings`
applies those overrides.

Example:

```python
settings = MonitoringSettings(state_dir=Path("/var/lib/modelloop"))
settings.resolved_store_url()  # 'sqlite:////var/lib/modelloop/modelloop.db'
per_model = resolve_model_settings(settings, {"psi_threshold": 0.1})
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SQLITE_FILE = "modelloop.db"
_SCHEMES = ("sqlite://", "postgresql://", "postgres://")


class MonitoringSettings(BaseSettings):
    """Server-wide monitoring settings; environment variables use ``MODELLOOP_MONITORING_``."""

    model_config = SettingsConfigDict(env_prefix="MODELLOOP_MONITORING_", extra="ignore")

    enabled: bool = True
    """Log predictions, accept feedback and evaluate drift and accuracy."""
    state_dir: Path = Path(".modelloop")
    """Directory of the embedded SQLite store."""
    store_url: str | None = None
    """``sqlite:///path`` or ``postgresql://...``; None = SQLite under ``state_dir``."""
    queue_size: int = Field(default=10_000, ge=1)
    """Answered requests waiting to be logged; more are dropped and counted."""
    sample_features: int = Field(default=64, ge=1)
    """Input columns kept per logged row (the window keeps every column)."""
    retention_rows: int = Field(default=1_000_000, ge=1)
    """Most logged predictions kept; older ones are pruned with their labels."""
    retention_days: float = Field(default=30.0, gt=0)
    """Logged predictions older than this are pruned with their labels."""
    prune_interval_s: float = Field(default=300.0, gt=0)
    """Seconds between retention passes."""
    window_size: int = Field(default=1000, ge=1)
    """Recent input rows per model version that drift is computed on."""
    min_rows: int = Field(default=200, ge=1)
    """Rows in the window before any drift verdict."""
    eval_interval_s: float = Field(default=5.0, gt=0)
    """Seconds between evaluations."""
    psi_threshold: float = Field(default=0.2, gt=0)
    """A feature drifts when its PSI reaches this."""
    ks_pvalue: float = Field(default=0.01, gt=0, lt=1)
    """A feature drifts when its KS p-value is below this."""
    drift_share: float = Field(default=0.5, gt=0, le=1)
    """The dataset drifts when this share of features drifts (Evidently's default)."""
    accuracy_window: int = Field(default=500, ge=1)
    """Most recent labelled rows accuracy (or MAE) is computed over."""
    min_labels: int = Field(default=50, ge=1)
    """Labelled rows needed before accuracy is exported."""
    accuracy_floor: float | None = Field(default=None, ge=0, le=1)
    """Accuracy below which in-process rules call for a retrain; None = no floor."""
    retrain_cooldown_s: float = Field(default=900.0, ge=0)
    """Least seconds between two retrains of one model."""
    alertmanager_url: str | None = None
    """Alertmanager in charge of alerts; None = rules run in-process."""
    trigger: Literal["subprocess", "kubernetes", "none"] = "subprocess"
    """How a retrain is started."""
    history_retention_days: float = Field(default=7.0, gt=0)
    """Evaluation history older than this is pruned."""
    history_max_points: int = Field(default=17_280, ge=1)
    """Most history points kept per version (a day of evaluations every 5 s)."""

    @field_validator("store_url")
    @classmethod
    def _check_store_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(_SCHEMES):
            raise ValueError(f"store URL {url!r} must start with sqlite:/// or postgresql://")
        return url

    def resolved_store_url(self) -> str:
        """The store URL, with the SQLite default under ``state_dir`` filled in."""
        if self.store_url is not None:
            return self.store_url
        return f"sqlite:///{(self.state_dir / SQLITE_FILE).absolute()}"


class ModelMonitoringOverrides(BaseModel):
    """The ``"drift"`` key of a model's ``config.json``: per-model thresholds.

    Example:

    ```json
    {"drift": {"psi_threshold": 0.1, "min_rows": 100, "accuracy_floor": 0.9}}
    ```
    """

    model_config = ConfigDict(extra="forbid")

    min_rows: int | None = Field(default=None, ge=1)
    psi_threshold: float | None = Field(default=None, gt=0)
    ks_pvalue: float | None = Field(default=None, gt=0, lt=1)
    drift_share: float | None = Field(default=None, gt=0, le=1)
    accuracy_window: int | None = Field(default=None, ge=1)
    min_labels: int | None = Field(default=None, ge=1)
    accuracy_floor: float | None = Field(default=None, ge=0, le=1)
    retrain_cooldown_s: float | None = Field(default=None, ge=0)


def resolve_model_settings(base: MonitoringSettings, overrides: dict[str, Any]) -> MonitoringSettings:
    """The settings of one model: ``base`` with its ``config.json`` overrides applied.

    Args:
        base: Server-wide settings.
        overrides: The model config's ``"drift"`` dict.

    Returns:
        A copy of ``base`` with the given fields replaced.

    Raises:
        ValueError: Unknown keys or out-of-range values, with pydantic's message.
    """
    if not overrides:
        return base
    try:
        parsed = ModelMonitoringOverrides.model_validate(overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"invalid drift settings: {problems}") from None
    return base.model_copy(update=parsed.model_dump(exclude_unset=True))

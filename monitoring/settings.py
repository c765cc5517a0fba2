"""Monitoring settings: where predictions and labels go, windows, drift thresholds, label checks, labelers.

``MonitoringSettings`` is built once by the CLI (from arguments, then
``MODELLOOP_MONITORING_*`` environment variables) and passed in. A model may override the
thresholds in the ``"drift"`` key of its ``config.json``; :func:`resolve_model_settings`
applies those overrides. The label checks (:class:`QuarantineSettings`) come from
``MODELLOOP_MONITORING_QUARANTINE__*`` and, per model, from the ``"feedback"`` key
(:func:`resolve_quarantine`). ``LabelerSettings`` holds the labelers' feedback tokens
(``MODELLOOP_FEEDBACK_TOKEN[S][_FILE]``).

Example:

```python
settings = MonitoringSettings(state_dir=Path("/var/lib/modelloop"))
settings.resolved_store_url()  # 'sqlite:////var/lib/modelloop/modelloop.db'
per_model = resolve_model_settings(settings, {"psi_threshold": 0.1})
```
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from modelloop.tokens import (
    DEFAULT_SOURCE,
    TokenMatcher,
    check_token,
    merge_token_maps,
    parse_token_map,
    read_token_file,
)

SQLITE_FILE = "modelloop.db"
FEEDBACK_TOKEN_FILE = "feedback.token"
"""The labeler token ``modelloop up`` creates under the state directory when none is configured."""
_SCHEMES = ("sqlite://", "postgresql://", "postgres://")


class QuarantineSettings(BaseModel):
    """When a labeler source is quarantined: its labels then leave training, the gate and accuracy.

    Every check looks at the labels a source gave to the champion's *confident* predictions
    (top-class probability at least ``confidence``), where an honest label rarely disagrees.
    A source is quarantined when, with at least ``min_labels`` such labels, any of these
    holds (rates are judged by their 99 % Wilson lower bound, so a small sample cannot
    trip them by chance):

    * it disagrees more than ``error_factor`` x the champion's test error plus
      ``label_noise`` (what the champion's validation error allows);
    * it disagrees more than ``relative_factor`` x the other sources' pooled rate, and by
      at least ``label_noise`` (far more than the other sources do);
    * it relabels at least ``pair_rate`` of the champion's confident predictions of one
      class as one other class, in at least ``min_pair_labels`` labels, while the other
      sources (when they labelled that class) do not (its disagreements concentrate on
      one class pair).

    The first two are suspended for a source whose predicted-class mix has moved away from
    the champion's baseline (PSI at least ``prediction_psi``): under input drift the
    champion is confidently wrong, and an honest labeler disagrees with it everywhere.

    Defaults, and why: ``confidence`` 0.9 keeps about 96 % of the digits champion's
    predictions and none of its errors on clean data; ``label_noise`` 0.05 tolerates a
    sloppy human labeler; ``error_factor`` 2 doubles the champion's measured test error;
    ``relative_factor`` 3 and ``pair_rate`` 0.5 ask for a gross, not a marginal, excess;
    ``min_labels`` 50 and ``min_pair_labels`` 10 keep verdicts off tiny samples;
    ``prediction_psi`` 0.2 is the drift threshold PSI is conventionally read with.

    Example:

    ```json
    {"feedback": {"pair_rate": 0.6, "min_labels": 100}}
    ```
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    """Quarantine sources at all; off, every source is trusted (labels are still checked and reported)."""
    confidence: float = Field(default=0.9, ge=0.5, le=1.0)
    """The champion's top-class probability from which a prediction counts as confident."""
    min_labels: int = Field(default=50, ge=1)
    """Labels on confident predictions a source needs before any verdict."""
    error_factor: float = Field(default=2.0, ge=0)
    """A source may disagree this many times the champion's test error (plus ``label_noise``)."""
    label_noise: float = Field(default=0.05, ge=0, le=1)
    """Disagreement an honest labeler is allowed on top of the champion's own error."""
    relative_factor: float = Field(default=3.0, ge=1)
    """A source may disagree this many times the other sources' pooled rate."""
    pair_rate: float = Field(default=0.5, gt=0, le=1)
    """Share of the champion's confident predictions of one class relabelled as one other class."""
    min_pair_labels: int = Field(default=10, ge=1)
    """Relabels of one class pair needed before the pair check applies."""
    prediction_psi: float = Field(default=0.2, gt=0)
    """PSI of a source's predicted classes against the baseline from which the rate checks pause."""


def resolve_quarantine(base: QuarantineSettings, overrides: dict[str, Any]) -> QuarantineSettings:
    """The label checks of one model: ``base`` with its ``config.json`` ``"feedback"`` block applied.

    Raises:
        ValueError: Unknown keys or out-of-range values, in one line.
    """
    if not overrides:
        return base
    try:
        return QuarantineSettings.model_validate({**base.model_dump(), **overrides})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"invalid feedback settings: {problems}") from None


class LabelerSettings(BaseSettings):
    """The labelers' feedback tokens; environment variables use the prefix ``MODELLOOP_``.

    ``MODELLOOP_FEEDBACK_TOKENS`` maps source names to tokens (a JSON object),
    ``MODELLOOP_FEEDBACK_TOKEN`` is one token for the source ``default``; each has a
    ``..._FILE`` twin naming a file that holds the same (a mounted Secret). Both kinds may
    be set together. Without any, feedback is unauthenticated and its source is
    ``anonymous``. Everything is read and checked once, when the settings are built, and a
    malformed configuration fails then, with a message that names no token.

    Example:

    ```python
    labelers = LabelerSettings(feedback_tokens='{"team-a": "t0k3n-a", "team-b": "t0k3n-b"}')
    labelers.matcher().match("t0k3n-b")  # 'team-b'
    ```
    """

    model_config = SettingsConfigDict(env_prefix="MODELLOOP_", extra="ignore")

    feedback_token: SecretStr | None = None
    """The token of the source ``default`` (``MODELLOOP_FEEDBACK_TOKEN``)."""
    feedback_token_file: Path | None = None
    """A file holding the ``default`` source's token (``MODELLOOP_FEEDBACK_TOKEN_FILE``)."""
    feedback_tokens: SecretStr | None = None
    """A JSON object source -> token (``MODELLOOP_FEEDBACK_TOKENS``)."""
    feedback_tokens_file: Path | None = None
    """A file holding that JSON object (``MODELLOOP_FEEDBACK_TOKENS_FILE``)."""

    _tokens: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _resolve(self) -> LabelerSettings:
        single: dict[str, str] = {}
        if self.feedback_token is not None and self.feedback_token_file is not None:
            raise ValueError("set MODELLOOP_FEEDBACK_TOKEN or MODELLOOP_FEEDBACK_TOKEN_FILE, not both")
        if self.feedback_token is not None:
            token = check_token(self.feedback_token.get_secret_value(), "MODELLOOP_FEEDBACK_TOKEN")
            single = {DEFAULT_SOURCE: token}
        elif self.feedback_token_file is not None:
            what = "MODELLOOP_FEEDBACK_TOKEN_FILE"
            single = {DEFAULT_SOURCE: check_token(read_token_file(self.feedback_token_file, what), what)}
        named: dict[str, str] = {}
        if self.feedback_tokens is not None and self.feedback_tokens_file is not None:
            raise ValueError("set MODELLOOP_FEEDBACK_TOKENS or MODELLOOP_FEEDBACK_TOKENS_FILE, not both")
        if self.feedback_tokens is not None:
            named = parse_token_map(self.feedback_tokens.get_secret_value(), "MODELLOOP_FEEDBACK_TOKENS")
        elif self.feedback_tokens_file is not None:
            what = "MODELLOOP_FEEDBACK_TOKENS_FILE"
            named = parse_token_map(read_token_file(self.feedback_tokens_file, what), what)
        self._tokens = merge_token_maps(named, single)
        return self

    @property
    def configured(self) -> bool:
        """Whether any labeler token is configured (else feedback is unauthenticated)."""
        return bool(self._tokens)

    def sources(self) -> list[str]:
        """The configured source names, sorted."""
        return sorted(self._tokens)

    def matcher(self) -> TokenMatcher:
        """The tokens, ready for constant-time matching."""
        return TokenMatcher(self._tokens)


def ensure_feedback_token_file(state_dir: Path) -> Path:
    """Creates a random labeler token under ``state_dir`` unless one is there; returns its path.

    ``modelloop up`` uses it so that feedback is authenticated on a laptop too; the file is
    readable by its owner only, and ``modelloop simulate`` reads it by default.

    Raises:
        OSError: The directory or the file cannot be written.
    """
    path = state_dir / FEEDBACK_TOKEN_FILE
    if path.is_file() and path.read_text(encoding="utf-8").strip():
        return path
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")
    return path


class MonitoringSettings(BaseSettings):
    """Server-wide monitoring settings; environment variables use ``MODELLOOP_MONITORING_``.

    The nested label checks read ``MODELLOOP_MONITORING_QUARANTINE__PAIR_RATE`` and so on.
    """

    model_config = SettingsConfigDict(
        env_prefix="MODELLOOP_MONITORING_", env_nested_delimiter="__", extra="ignore"
    )

    enabled: bool = True
    """Log predictions, accept feedback and evaluate drift and accuracy."""
    state_dir: Path = Path(".modelloop")
    """Directory of the embedded SQLite store, the labeler token ``up`` makes and retrain records.
    The CLI fills in the repository's own directory unless this is set
    (:func:`modelloop.storage.default_state_dir`); ``.modelloop`` is only for code that builds
    settings without a repository."""
    store_url: str | None = None
    """``sqlite:///path`` or ``postgresql://...``; None = SQLite under ``state_dir``."""
    log_url: str | None = None
    """Where the prediction log goes: ``s3://bucket/prefix`` or a directory (``file://``), one
    object per segment; None = the store's ``prediction_log`` table."""
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
    drift_for_s: float = Field(default=60.0, gt=0)
    """Seconds input drift must last before the in-process drift rule fires (the Prometheus
    rule's ``for: 1m``; a test or a demo shortens it)."""
    alertmanager_url: str | None = None
    """Alertmanager in charge of alerts; None = rules run in-process."""
    trigger: Literal["subprocess", "kubernetes", "none"] = "subprocess"
    """How a retrain is started."""
    quarantine: QuarantineSettings = Field(default_factory=QuarantineSettings)
    """When a labeler source is quarantined (server-wide; per model in config.json ``"feedback"``)."""
    history_retention_days: float = Field(default=7.0, gt=0)
    """Evaluation history older than this is pruned."""
    history_max_points: int = Field(default=17_280, ge=1)
    """Most history points kept per version (a day of evaluations every 5 s)."""
    rollout_interval_s: float = Field(default=1.0, gt=0)
    """Seconds between two passes of the rollout controller (flush, read the state, judge)."""

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

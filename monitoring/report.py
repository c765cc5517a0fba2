"""What one evaluation of one model version found: drift, accuracy, the estimate, data quality, traffic.

The control plane's monitoring loop (:mod:`~modelloop.control.service`) makes one per
version every ``eval_interval_s`` and hands it to its listeners, the history and the
health page.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from modelloop.monitoring.accuracy import AccuracyReport
from modelloop.monitoring.drift import DriftReport
from modelloop.monitoring.estimation import EstimateReport
from modelloop.monitoring.histogram import FeatureHistogram
from modelloop.monitoring.history import TrafficReport
from modelloop.monitoring.quality import QualityReport
from modelloop.monitoring.settings import MonitoringSettings


@dataclass(frozen=True, slots=True)
class EvaluationReport:
    """One evaluation of one model version.

    Attributes:
        model: Model name.
        version: Version.
        task: ``multiclass``, ``binary`` or ``regression``.
        evaluated_at: Unix time.
        window_rows: Rows in the drift window.
        min_rows: Rows needed before a drift verdict.
        drift: The drift report, or None before ``min_rows`` or without a baseline.
        drift_error: Why there is no drift report when there should be one (no
            baseline, wrong width), else "".
        accuracy: Accuracy or MAE over recent labels, or None when the store failed.
        labels: Labelled rows of this version in the store, or None when it failed.
        store_error: The store's error, else "".
        settings: The model's resolved settings (thresholds, ``accuracy_floor``, cooldown).
        estimate: The label-free accuracy estimate, or None (see ``estimate_note``).
        estimate_note: Why there is no estimate ("no label-free estimate for
            regressors", no calibrator, too few rows), else "".
        quality: Data quality of the window, or None before ``min_rows`` or without a baseline.
        histograms: Baseline and current histograms of the top drifted features.
        traffic: Requests since the previous evaluation, or None before the second one.
    """

    model: str
    version: int
    task: str
    evaluated_at: float
    window_rows: int
    min_rows: int
    drift: DriftReport | None
    drift_error: str
    accuracy: AccuracyReport | None
    labels: int | None
    store_error: str
    settings: MonitoringSettings = field(repr=False)
    estimate: EstimateReport | None = None
    estimate_note: str = ""
    quality: QualityReport | None = None
    histograms: tuple[FeatureHistogram, ...] = field(default=(), repr=False)
    traffic: TrafficReport | None = None

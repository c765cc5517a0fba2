"""Prometheus metrics of monitoring and retraining, on an injected registry.

The composition root passes the server's own ``CollectorRegistry``, so ``/metrics`` shows
these beside the serving metrics. Names follow DESIGN.md; no label holds a request id,
and ``feature`` takes only the baseline's fixed feature names.

Example:

```python
registry = CollectorRegistry()
metrics = MonitoringMetrics(registry)
metrics.drift_detected.labels(model="digits", version="1").set(1)
registry.get_sample_value("modelloop_drift_detected", {"model": "digits", "version": "1"})  # 1.0
```
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge


class MonitoringMetrics:
    """The ``modelloop_*`` monitoring metrics.

    Attributes:
        feature_drift: ``{model,version,feature,method}``: PSI (``method="psi"``) or KS
            distance (``method="ks"``) of each feature.
        drift_detected: ``{model,version}``: 1 when the share of drifted features reaches
            ``drift_share``.
        drift_share: ``{model,version}``: share of drifted features (0..1).
        prediction_drift: ``{model,version}``: PSI of the prediction distribution.
        accuracy: ``{model,version}``: accuracy of classifiers over the last labelled rows,
            set once ``min_labels`` rows exist.
        mean_absolute_error: ``{model,version}``: the same for regressors.
        feedback: ``{model,version,source,outcome}``: labelled rows this process took in,
            by labeler source and outcome: ``accepted``, ``quarantined`` (stored, from a
            quarantined source), ``duplicate``, ``invalid``, ``ambiguous`` (the id answered
            different inputs) or ``unknown`` (version "").
        source_quarantined: ``{model,source}``: 1 while a labeler source is quarantined.
        source_agreement: ``{model,source}``: share of a source's labels on the champion's
            confident predictions that agree with them.
        retrain_runs: ``{model,outcome}``: retrains by outcome (blessed, rejected, failed).
        dropped: ``{model}``: answered requests not logged (queue full or store down).
        window_rows: ``{model,version}``: rows in the drift window.
        estimated_accuracy: ``{model,version}``: accuracy estimated without labels (CBPE),
            with ``estimated_accuracy_lower`` and ``estimated_accuracy_upper``, its 95 % band.
        feature_missing_share: ``{model,version,feature}``: share of NaN or Inf values.
        feature_out_of_range_share: ``{model,version,feature}``: share outside the training range.
        features_became_constant: ``{model,version}``: features that varied in training and
            are constant now.

    With several workers (prometheus_client's multiprocess mode) each worker evaluates the
    rows it served; the drift and accuracy gauges report the highest value of any live
    worker (drift anywhere is drift), the window rows their sum.

    Args:
        registry: Where the metrics are registered.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.feature_drift = Gauge(
            "modelloop_feature_drift",
            "Drift of one input feature against the baseline: PSI or KS distance.",
            ["model", "version", "feature", "method"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.drift_detected = Gauge(
            "modelloop_drift_detected",
            "1 when the share of drifted features reaches drift_share, else 0.",
            ["model", "version"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.drift_share = Gauge(
            "modelloop_drift_share",
            "Share of input features that drifted (0..1).",
            ["model", "version"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.prediction_drift = Gauge(
            "modelloop_prediction_drift",
            "PSI of the prediction distribution against the baseline.",
            ["model", "version"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.accuracy = Gauge(
            "modelloop_accuracy",
            "Accuracy over the most recent labelled predictions (classifiers).",
            ["model", "version"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.mean_absolute_error = Gauge(
            "modelloop_mean_absolute_error",
            "Mean absolute error over the most recent labelled predictions (regressors).",
            ["model", "version"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.feedback = Counter(
            "modelloop_feedback",
            "Labelled rows received through the feedback route, by labeler source and outcome.",
            ["model", "version", "source", "outcome"],
            registry=registry,
        )
        self.source_quarantined = Gauge(
            "modelloop_feedback_source_quarantined",
            "1 while a labeler source is quarantined: its labels leave training, the gate and accuracy.",
            ["model", "source"],
            registry=registry,
        )
        self.source_agreement = Gauge(
            "modelloop_feedback_source_agreement",
            "Share of a source's labels on the champion's confident predictions that agree with them.",
            ["model", "source"],
            registry=registry,
        )
        self.retrain_runs = Counter(
            "modelloop_retrain_runs",
            "Retraining runs by outcome: blessed, rejected or failed.",
            ["model", "outcome"],
            registry=registry,
        )
        self.retrain_skipped = Counter(
            "modelloop_retrain_skipped",
            "Drift alerts that started no retrain: no new trusted labels since the last retrain.",
            ["model", "reason"],
            registry=registry,
        )
        self.log_segments_skipped = Counter(
            "modelloop_log_segments_skipped",
            "Prediction log segments the control plane could not decode (another version wrote them).",
            registry=registry,
        )
        self.dropped = Counter(
            "modelloop_monitoring_dropped",
            "Answered requests that were not logged: queue full or store unavailable.",
            ["model"],
            registry=registry,
        )
        self.window_rows = Gauge(
            "modelloop_monitoring_window_rows",
            "Rows in the drift window of a model version.",
            ["model", "version"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        # The label-free accuracy estimate (CBPE) and its 95 % band.
        self.estimated_accuracy = Gauge(
            "modelloop_estimated_accuracy",
            "Accuracy estimated without labels: mean calibrated probability of the predicted class.",
            ["model", "version"],
            registry=registry,
        )
        self.estimated_accuracy_lower = Gauge(
            "modelloop_estimated_accuracy_lower",
            "Lower end of the 95 % band of the estimated accuracy (from the window size).",
            ["model", "version"],
            registry=registry,
        )
        self.estimated_accuracy_upper = Gauge(
            "modelloop_estimated_accuracy_upper",
            "Upper end of the 95 % band of the estimated accuracy (from the window size).",
            ["model", "version"],
            registry=registry,
        )
        # Data quality of the input window, per feature.
        self.feature_missing_share = Gauge(
            "modelloop_feature_missing_share",
            "Share of NaN or infinite values of one input feature in the window.",
            ["model", "version", "feature"],
            registry=registry,
        )
        self.feature_out_of_range_share = Gauge(
            "modelloop_feature_out_of_range_share",
            "Share of values of one input feature outside its training range, in the window.",
            ["model", "version", "feature"],
            registry=registry,
        )
        self.features_became_constant = Gauge(
            "modelloop_features_became_constant",
            "Input features that varied in training and are constant in the window.",
            ["model", "version"],
            registry=registry,
        )

    def forget_version(self, model: str, version: int, features: list[str]) -> None:
        """Removes the gauges of a version that is no longer loaded.

        Args:
            model: Model name.
            version: The unloaded version.
            features: Its feature names.
        """
        v = str(version)
        for gauge in (
            self.drift_detected,
            self.drift_share,
            self.prediction_drift,
            self.accuracy,
            self.mean_absolute_error,
            self.window_rows,
        ):
            with contextlib.suppress(KeyError):
                gauge.remove(model, v)
        for feature in features:
            for method in ("psi", "ks"):
                with contextlib.suppress(KeyError):
                    self.feature_drift.remove(model, v, feature, method)
        for gauge in (
            self.estimated_accuracy,
            self.estimated_accuracy_lower,
            self.estimated_accuracy_upper,
            self.features_became_constant,
        ):
            with contextlib.suppress(KeyError):
                gauge.remove(model, v)
        for feature in features:
            for gauge in (self.feature_missing_share, self.feature_out_of_range_share):
                with contextlib.suppress(KeyError):
                    gauge.remove(model, v, feature)

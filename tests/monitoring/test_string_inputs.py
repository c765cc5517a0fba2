"""Monitoring of a model whose input is strings (BYTES): predictions logged, no feature drift.

Such a version's baseline lists no features (the exporter writes it so for a model served
by its ``model.py``); the recorder stores each prediction with no input columns, so accuracy
from labels, prediction drift and the label-free estimate work as for any classifier.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from modelloop.control.service import MonitoringService
from modelloop.monitoring.drift import DriftDetector
from modelloop.monitoring.settings import MonitoringSettings
from modelloop.monitoring.stores.records import FeedbackItem
from modelloop.serving.types import InferRequest, InferResponse, ModelState, Protocol
from tests.monitoring.monhelpers import FakeCatalog, logged

LABELS = ["debugging", "formatting"]
BASELINE = {
    "schema_version": 1,
    "input": "text",
    "rows": 100,
    "bins": 10,
    "features": [],
    "reference_sample": [],
    "predictions": {"kind": "class", "labels": LABELS, "proportions": [0.5, 0.5]},
}


def write_text_version(repo: Path) -> None:
    vdir = repo / "topics" / "1"
    vdir.mkdir(parents=True)
    card = {
        "task": "multiclass",
        "labels": LABELS,
        "inputs": [{"name": "text", "dtype": "object", "shape": [-1]}],
        "outputs": [
            {"name": "probabilities", "dtype": "float32", "shape": [-1, 2]},
            {"name": "label", "dtype": "object", "shape": [-1]},
        ],
    }
    (vdir / "model.json").write_text(json.dumps(card))
    (vdir / "baseline.json").write_text(json.dumps(BASELINE))


def answered(texts: list[bytes], classes: list[int], rid: str) -> tuple[InferRequest, InferResponse]:
    probabilities = np.full((len(texts), 2), 0.1, np.float32)
    probabilities[np.arange(len(texts)), classes] = 0.9
    label = np.array([LABELS[c].encode() for c in classes], dtype=object)
    request = InferRequest(
        model="topics", inputs={"text": np.array(texts, dtype=object)}, protocol=Protocol.V2_REST, id=rid
    )
    response = InferResponse(
        model="topics", version=1, outputs={"probabilities": probabilities, "label": label}, id=rid
    )
    return request, response


def test_string_requests_are_logged_and_give_prediction_drift_and_accuracy(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_text_version(repo)
    registry = CollectorRegistry()
    settings = MonitoringSettings(state_dir=tmp_path / "state", min_rows=20, min_labels=5)
    service = MonitoringService(
        settings,
        repo=repo,
        catalog=FakeCatalog({"topics": {1: ModelState.AVAILABLE}}),
        registry=registry,
    )
    try:
        # Every prediction is "debugging": the prediction distribution moved off 50/50.
        ids = []
        for i in range(10):
            rid = f"r{i}"
            service.recorder.write(
                [logged(*answered([b"set a breakpoint", "ünï".encode(), b""], [0, 0, 0], rid))]
            )
            ids.append(rid)
        report = service.evaluate_once()[0]
        assert report.window_rows == 30
        assert report.drift_error == ""
        assert report.drift is not None
        assert report.drift.features == () and not report.drift.drifted and report.drift.share == 0.0
        labels = {"model": "topics", "version": "1"}
        assert registry.get_sample_value("modelloop_prediction_drift", labels) > 1.0
        assert registry.get_sample_value("modelloop_drift_detected", labels) == 0

        # Late labels join the logged predictions: two of three rows were right.
        result = service.add_feedback("topics", [FeedbackItem(rid, [0, 0, 1]) for rid in ids])
        assert len(result.accepted) == 10
        service.evaluate_once()
        assert abs(registry.get_sample_value("modelloop_accuracy", labels) - 2 / 3) < 1e-9
    finally:
        service.stores.close()


def test_a_baseline_without_features_measures_prediction_drift_only() -> None:
    detector = DriftDetector(BASELINE)
    report = detector.evaluate(np.zeros((4, 0)), np.array([0, 1, 0, 1]))
    assert report.rows == 4 and report.features == () and report.share == 0.0
    assert report.prediction_psi == 0.0
    assert DriftDetector(BASELINE).prediction_drift(np.zeros(4)) > 1.0

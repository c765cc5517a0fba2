"""Retraining: feedback-augmented training, the blessing gate, publication and counting."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter

from modelloop.control.retraining.gate import (
    bless,
    check_robustness,
    format_gate_report,
    much_worse,
    slice_table,
    slice_verdict,
)
from modelloop.control.retraining.job import retrain, source_caps
from modelloop.control.retraining.settings import RetrainError, RetrainSettings
from modelloop.export.publish import list_versions

TESTDATA = Path(__file__).resolve().parent / "testdata"
SPEC = TESTDATA / "specs" / "functional_spec.py"
CRASH_SPEC = TESTDATA / "specs" / "crash_in_fit_spec.py"
NAME = "blobs"


class FakeFeedback:
    """A prediction store that holds labelled rows in memory, oldest first, and keeps gate reports."""

    def __init__(self, x: np.ndarray, y: np.ndarray, sources: list[str] | None = None) -> None:
        self.x, self.y = x, y
        self.sources = np.asarray(sources if sources is not None else ["anonymous"] * len(y), dtype=object)
        self.calls: list[str] = []
        self.reports: list[tuple[str, str, str, dict]] = []

    def feedback_rows(self, model: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        self.calls.append(model)
        return self.x, self.y, self.sources, np.asarray([f"r{i}/0" for i in range(len(self.y))], dtype=object)

    def record_retrain(self, model: str, run_id: str, outcome: str, report: dict) -> None:
        self.reports.append((model, run_id, outcome, report))


@pytest.fixture(scope="module")
def blobs_repo(tmp_path_factory: pytest.TempPathFactory, train_run: Callable[..., Path]) -> Path:
    from modelloop.export.exporter import export_run

    repo = tmp_path_factory.mktemp("blobs-repo")
    export_run(train_run(str(SPEC)), repo, name=NAME)
    return repo


@pytest.fixture
def repo(tmp_path: Path, blobs_repo: Path) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(blobs_repo, copy)
    return copy


@pytest.fixture
def runs_total() -> Counter:
    return Counter(
        "modelloop_retrain_runs", "Retrain runs", ["model", "outcome"], registry=CollectorRegistry()
    )


def _count(counter: Counter, outcome: str) -> float:
    return counter.labels(model=NAME, outcome=outcome)._value.get()


def _blob_rows(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    # The specs' shared data module, loaded from its file as the specs' own folder holds it.
    spec = importlib.util.spec_from_file_location("_blobs", TESTDATA / "specs" / "_blobs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = module.blobs()
    idx = np.random.default_rng(seed).integers(0, len(data.y), n)
    return data.x[idx], data.y[idx].astype(np.float64)


def test_blessed_candidate_is_published_as_next_version(repo: Path, tmp_path: Path, runs_total: Counter):
    x, y = _blob_rows(40)
    # Rows the gate cannot use: a label outside the classes, a NaN label, a NaN feature.
    x = np.concatenate([x, x[:3]])
    y = np.concatenate([y, [7.0, np.nan, 1.0]])
    x[-1, 0] = np.nan
    store = FakeFeedback(x, y)
    result = retrain(repo, NAME, store, reports=store, state_dir=tmp_path / "state", runs_total=runs_total)

    assert result.outcome == "blessed", result.reason
    assert result.version == 2 and list_versions(repo / NAME) == [1, 2]
    assert store.calls == [NAME]
    assert result.feedback_rows == {"train": 28, "holdout": 12, "quarantined": 0}
    for who in ("serving", "candidate", "baseline"):
        assert set(result.metrics[who]) == {"eval", "test_split", "feedback_holdout", "eval_noisy"}
        assert result.metrics[who]["eval"]["rows"] == result.metrics[who]["eval_noisy"]["rows"] == 60 + 12
    # The noisy rows are the same for both models, so a model scores differently only by noise.
    assert (
        result.metrics["serving"]["eval_noisy"]["accuracy"] <= result.metrics["serving"]["eval"]["accuracy"]
    )
    assert result.baseline in {"logistic_regression", "hist_gradient_boosting", "svc_rbf"}
    meta = json.loads((repo / NAME / "2" / "model.json").read_text())
    assert meta["version"] == 2 and meta["training_run"]["feedback_rows"] == 28
    assert meta["blessing"]["blessed"] is True and meta["blessing"]["serving_version"] == 1
    record = json.loads(result.record.read_text())
    assert record["outcome"] == "blessed" and record["version"] == 2
    assert result.record.parent == tmp_path / "state" / "retrain" / NAME
    assert _count(runs_total, "blessed") == 1 and _count(runs_total, "failed") == 0
    assert not any((repo / ".staging").iterdir())


def test_rejected_below_the_floor_publishes_nothing(repo: Path, tmp_path: Path, runs_total: Counter):
    x, y = _blob_rows(40)
    y = (y + 1) % 3  # wrong labels: nothing reaches a perfect score on them
    result = retrain(
        repo,
        NAME,
        FakeFeedback(x, y),
        state_dir=tmp_path / "state",
        settings=RetrainSettings(accuracy_floor=1.0),
        runs_total=runs_total,
    )
    assert result.outcome == "rejected"
    assert "below the floor 1.0000" in result.reason
    assert result.version is None and list_versions(repo / NAME) == [1]
    assert json.loads(result.record.read_text())["outcome"] == "rejected"
    assert _count(runs_total, "rejected") == 1


def test_rejected_when_worse_than_the_serving_version(repo: Path, tmp_path: Path, runs_total: Counter):
    # Mostly mislabelled feedback teaches the candidate the wrong classes; the eval set is
    # (almost) the original test split, on which the serving version is right.
    x, y = _blob_rows(600)
    result = retrain(
        repo,
        NAME,
        FakeFeedback(x, (y + 1) % 3),
        state_dir=tmp_path / "state",
        settings=RetrainSettings(accuracy_floor=0.0, holdout_fraction=0.01),
        runs_total=runs_total,
    )
    assert result.outcome == "rejected", result.reason
    assert "worse than serving" in result.reason
    cand, serv = result.metrics["candidate"]["eval"], result.metrics["serving"]["eval"]
    assert cand["accuracy"] < serv["accuracy"] - 0.01
    assert list_versions(repo / NAME) == [1]


def test_training_crash_is_failed_counted_and_publishes_nothing(
    repo: Path, tmp_path: Path, runs_total: Counter
):
    meta_path = repo / NAME / "1" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["training_run"]["spec"]["source"] = str(CRASH_SPEC)
    meta_path.write_text(json.dumps(meta))
    result = retrain(repo, NAME, None, state_dir=tmp_path / "state", runs_total=runs_total)

    assert result.outcome == "failed"
    assert "training crashed on purpose" in result.reason
    assert result.version is None and list_versions(repo / NAME) == [1]
    assert not (repo / ".staging").exists() or not any((repo / ".staging").iterdir())
    assert json.loads(result.record.read_text())["outcome"] == "failed"
    assert _count(runs_total, "failed") == 1 and _count(runs_total, "blessed") == 0


def test_unknown_model_or_version_cannot_start(tmp_path: Path, repo: Path):
    with pytest.raises(RetrainError, match="has no version"):
        retrain(repo, "nope", state_dir=tmp_path)
    with pytest.raises(RetrainError, match="invalid model name"):
        retrain(repo, "../etc", state_dir=tmp_path)
    (repo / NAME / "1" / "model.json").write_text("{}")
    with pytest.raises(RetrainError, match="does not say which spec"):
        retrain(repo, NAME, state_dir=tmp_path)


def test_settings_come_from_config_json(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"retrain": {"epochs": 5, "tolerance": 0.02}}))
    settings = RetrainSettings.for_model(tmp_path, tolerance=0.05)
    assert settings.epochs == 5 and settings.tolerance == 0.05
    (tmp_path / "config.json").write_text(json.dumps({"retrain": {"epochz": 5}}))
    with pytest.raises(RetrainError, match="invalid retrain setting epochz"):
        RetrainSettings.for_model(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(RetrainError, match="unreadable"):
        RetrainSettings.for_model(tmp_path)


@pytest.mark.parametrize(
    ("task", "candidate", "serving", "threshold", "blessed", "reason"),
    [
        ("multiclass", 0.95, 0.96, 0.8, True, "blessed"),
        ("multiclass", 0.94, 0.96, 0.8, False, "worse than serving"),
        ("multiclass", 0.79, 0.70, 0.8, False, "below the floor"),
        ("multiclass", float("nan"), 0.9, 0.8, False, "NaN"),
        ("regression", 41.0, 40.995, 50.0, True, "blessed"),
        ("regression", 41.0, 40.0, 50.0, False, "worse than serving"),
        ("regression", 51.0, 60.0, 50.0, False, "above the ceiling"),
    ],
)
def test_bless(task, candidate, serving, threshold, blessed, reason):
    verdict = bless(task, candidate, serving, threshold=threshold, tolerance=0.01)
    assert verdict.blessed is blessed
    assert reason in verdict.reason


class Verdict:
    """A label-check verdict, as the monitoring package's SourceVerdict answers."""

    def __init__(self, quarantined: bool) -> None:
        self.quarantined = quarantined

    def as_dict(self) -> dict:
        return {"quarantined": self.quarantined, "reasons": ["planted"] if self.quarantined else []}


class FakeScreen:
    """Label checks that quarantine the named sources."""

    def __init__(self, *quarantined: str) -> None:
        self.quarantined = set(quarantined)
        self.asked: list[tuple[str, str]] = []

    def assess(self, model: str, version_dir: Path) -> dict[str, Verdict]:
        self.asked.append((model, version_dir.name))
        return {s: Verdict(s in self.quarantined) for s in ("honest", "mallory")}


def test_source_caps_hold_for_every_source_at_once():
    assert source_caps(100, {"a": 500, "b": 20}, 0.5) == {"a": 120, "b": 20}
    assert source_caps(100, {"a": 500}, 1.0) == {"a": 500}
    caps = source_caps(60, {"a": 300, "b": 300, "c": 10}, 0.4)
    total = 60 + sum(caps.values())
    assert all(v <= 0.4 * total + 1e-9 for v in caps.values()) and caps["c"] == 10
    assert source_caps(0, {"a": 5}, 0.5) == {"a": 0}  # alone, a source would be all of it


def test_slice_table_per_class_and_per_decile():
    y = np.array([0] * 30 + [1] * 30 + [2] * 5)
    serving = np.eye(3)[y]
    candidate = serving.copy()
    candidate[:3] = np.eye(3)[1]  # three 0s now read as 1: recall 0.9
    candidate[30:31] = np.eye(3)[0]  # one 1 as 0: recall 0.967
    candidate[60:65] = np.eye(3)[0]  # every 2 lost, but only 5 rows: reported, not gated
    table = slice_table("multiclass", y, serving, candidate, class_labels=["a", "b", "c"], margin=0.05)
    rows = {r["slice"]: r for r in table["rows"]}
    assert rows["a"]["delta"] == pytest.approx(-0.1) and not rows["a"]["passed"]
    assert (
        rows["b"]["passed"] and rows["c"]["candidate"] == 0 and not rows["c"]["gated"] and rows["c"]["passed"]
    )
    assert slice_verdict(table) == "recall of class 'a' falls from 1.000 to 0.900, more than the margin 0.05"
    # A serving version that answers "a" for everything: losing some "a" recall for
    # precision is no lost class (F1 rises), and passes.
    y2 = np.array([0] * 30 + [1] * 30)
    degenerate = np.eye(3)[np.zeros(60, np.int64)]
    better = np.eye(3)[y2]
    better[:3] = np.eye(3)[1]
    excused = slice_table("multiclass", y2, degenerate, better, class_labels=["a", "b", "c"])["rows"][0]
    assert excused["delta"] == pytest.approx(-0.1) and excused["passed"] and excused["excused"]
    assert excused["candidate_f1"] > excused["serving_f1"]
    assert "precision bought it" in format_gate_report(
        {
            "outcome": "blessed",
            "reason": "ok",
            "overall": {
                "metric": "accuracy",
                "rows": 60,
                "serving": 0.5,
                "candidate": 0.95,
                "threshold": 0.5,
                "tolerance": 0.01,
            },
            "slices": slice_table("multiclass", y2, degenerate, better),
        }
    )
    values = np.linspace(0, 100, 400)
    off = values + 1.0
    off[values > 90] += 5.0  # the top decile gets worse
    deciles = slice_table("regression", values, off[:, None] * 0 + values[:, None] + 1.0, off[:, None])
    assert deciles["kind"] == "target_decile" and len(deciles["rows"]) == 10
    assert [r["passed"] for r in deciles["rows"]] == [True] * 9 + [False]
    assert slice_verdict(deciles).startswith("MAE of decile 10 (90.")


def test_quarantined_sources_are_left_out_and_one_source_is_capped(repo: Path, tmp_path: Path):
    x, y = _blob_rows(300, seed=3)
    sources = ["mallory"] * 100 + ["honest"] * 200
    # mallory's labels are all wrong.
    store = FakeFeedback(x, np.concatenate([(y[:100] + 1) % 3, y[100:]]), sources)
    screen = FakeScreen("mallory")
    result = retrain(
        repo,
        NAME,
        store,
        reports=store,
        state_dir=tmp_path / "state",
        settings=RetrainSettings(max_source_share=0.25, holdout_fraction=0.2, accuracy_floor=0.0),
        screen=screen,
    )
    assert screen.asked == [(NAME, "1")]
    gate = result.gate
    assert gate is not None and result.gate_report is not None
    used = {s["source"]: s for s in gate["sources"]}
    assert used["mallory"]["quarantined"] and used["mallory"]["train_rows_used"] == 0
    assert used["mallory"]["holdout_rows"] == 0 and used["mallory"]["reasons"] == ["planted"]
    # 200 honest rows: 40 held out, 160 for training, capped to a quarter of the training set:
    # 195 spec training rows -> at most 65 (65 / 260 = 0.25), the most recent ones.
    assert used["honest"]["holdout_rows"] == 40 and used["honest"]["train_rows"] == 160
    assert used["honest"]["train_rows_used"] == 65
    assert result.feedback_rows == {"train": 65, "holdout": 40, "quarantined": 100}
    assert gate["eval_rows"] == {"test_split": 60, "feedback_holdout": 40}
    on_disk = json.loads(result.gate_report.read_text())
    assert on_disk == json.loads(json.dumps(gate)) and on_disk["outcome"] == result.outcome
    assert result.gate_report.parent == result.run_dir
    ((model, run_id, outcome, stored),) = store.reports
    assert (model, outcome, stored["run_id"]) == (NAME, result.outcome, run_id)
    assert [r["slice"] for r in stored["slices"]["rows"]] == ["red", "green", "blue"]
    text = format_gate_report(gate)
    assert "mallory: quarantined, 100 rows left out (planted)" in text
    assert "honest: 65 training rows (capped from 160), 40 evaluation rows" in text


def test_a_class_that_collapses_is_refused_whatever_the_aggregate(repo: Path, tmp_path: Path):
    # Many labels that call every "red" blob "green": the aggregate checks are switched
    # off (floor 0, any loss tolerated), the per-class check alone refuses the candidate.
    x, y = _blob_rows(900, seed=4)
    y = np.where(y == 0, 1.0, y)
    result = retrain(
        repo,
        NAME,
        FakeFeedback(x, y),
        state_dir=tmp_path / "state",
        settings=RetrainSettings(
            accuracy_floor=0.0, tolerance=1.0, holdout_fraction=0.01, max_source_share=1.0
        ),
    )
    assert result.outcome == "rejected", result.reason
    assert result.reason.startswith("recall of class 'red' falls from 1.000")
    assert result.gate is not None and result.gate["overall"]["passed"] is True
    assert list_versions(repo / NAME) == [1]


@pytest.mark.parametrize(
    ("task", "value", "reference", "expected"),
    [
        ("multiclass", 0.91, 0.96, False),  # exactly 0.05 below: not "much"
        ("multiclass", 0.90, 0.96, True),
        ("multiclass", float("nan"), 0.96, True),
        ("regression", 54.9, 50.0, False),  # 9.8 % higher
        ("regression", 55.1, 50.0, True),
    ],
)
def test_much_worse_is_five_accuracy_points_or_ten_percent_of_mae(task, value, reference, expected):
    assert much_worse(task, value, reference, RetrainSettings()) is expected


def _gate_metrics(
    candidate: float, serving: float, cand_noisy: float, serv_noisy: float, shallow: float
) -> dict:
    return {
        "candidate": {"eval": {"accuracy": candidate}, "eval_noisy": {"accuracy": cand_noisy}},
        "serving": {"eval": {"accuracy": serving}, "eval_noisy": {"accuracy": serv_noisy}},
        "baseline": {"eval": {"accuracy": shallow}},
    }


@pytest.mark.parametrize(
    ("numbers", "settings", "blessed", "reason"),
    [
        ((0.97, 0.96, 0.93, 0.94, 0.98), {}, True, "blessed"),
        # No worse clean, much worse under noise: the case the noise check exists for.
        ((0.97, 0.96, 0.85, 0.94, 0.98), {}, False, "under noise accuracy 0.8500 is much worse than serving"),
        # Much worse than the shallow model: named, and rejected only when the check is on.
        (
            (0.90, 0.89, 0.88, 0.88, 0.97),
            {},
            True,
            "blessed; note: accuracy 0.9000 is much worse than the shallow",
        ),
        (
            (0.90, 0.89, 0.88, 0.88, 0.97),
            {"baseline_check": True},
            False,
            "much worse than the shallow baseline's 0.9700",
        ),
        ((0.97, 0.96, 0.85, 0.94, 0.98), {"much_worse_accuracy": 0.2}, True, "blessed"),
    ],
)
def test_check_robustness(numbers, settings, blessed, reason):
    candidate, serving = numbers[:2]
    verdict = bless("multiclass", candidate, serving, threshold=0.5, tolerance=0.01)
    checked = check_robustness(verdict, "multiclass", _gate_metrics(*numbers), RetrainSettings(**settings))
    assert checked.blessed is blessed
    assert reason in checked.reason
    assert (checked.candidate, checked.serving) == (candidate, serving)


def test_check_robustness_keeps_a_rejection_and_works_for_regressors():
    rejected = bless("multiclass", 0.5, 0.9, threshold=0.8, tolerance=0.01)
    assert (
        check_robustness(rejected, "multiclass", _gate_metrics(0.5, 0.9, 0, 0.9, 0.9), RetrainSettings())
        is rejected
    )
    verdict = bless("regression", 44.0, 44.5, threshold=80.0, tolerance=1.0)
    metrics = {
        "candidate": {"eval": {"mae": 44.0}, "eval_noisy": {"mae": 58.0}},
        "serving": {"eval": {"mae": 44.5}, "eval_noisy": {"mae": 50.0}},
        "baseline": {"eval": {"mae": 43.0}},
    }
    checked = check_robustness(verdict, "regression", metrics, RetrainSettings())
    assert not checked.blessed and "by more than 10%" in checked.reason

"""The alert rules: promtool accepts them, and their unit tests fire and stay quiet as designed."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.tools import require_tool

REPO_ROOT = Path(__file__).resolve().parents[2]
RULES = REPO_ROOT / "monitoring" / "rules" / "modelloop.rules.yml"
RULE_TESTS = sorted((REPO_ROOT / "monitoring" / "rules" / "tests").glob("*.yml"))

# Other parts of the project (the webhook, the in-process rules, the README) use these names.
ALERTS = {
    "ModelDriftDetected",
    "ModelAccuracyBelowFloor",
    "ModelHighErrorRate",
    "ModelHighLatencyP99",
    "ModelLoadFailures",
    "FeedbackStarvation",
    "FeedbackSourceQuarantined",
    "ModelEstimatedAccuracyBelowFloor",
    "ModelInputMissingValues",
    "ModelInputOutOfRange",
    "ModelInputFeatureConstant",
    "ModelRolloutRolledBack",
    "ModelPredictionDrift",
}
RETRAIN_ALERTS = {"ModelDriftDetected", "ModelAccuracyBelowFloor", "ModelPredictionDrift"}


def promtool() -> str:
    return require_tool("promtool", "Debian package prometheus")


def _alerts() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules() -> None:
    result = subprocess.run(
        [
            require_tool("promtool", "Debian package prometheus"),
            "check",
            "rules",
            "--lint=all",
            "--lint-fatal",
            str(RULES),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout


def test_promtool_test_rules() -> None:
    assert RULE_TESTS, "no promtool unit tests in monitoring/rules/tests/"
    result = subprocess.run(
        [promtool(), "test", "rules", *map(str, RULE_TESTS)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS), result.stdout


def test_every_alert_is_named_labelled_and_annotated() -> None:
    alerts = _alerts()
    assert {a["alert"] for a in alerts} == ALERTS
    for alert in alerts:
        labels, annotations = alert.get("labels", {}), alert.get("annotations", {})
        assert labels.get("severity") in {"critical", "warning", "info"}, alert["alert"]
        assert annotations.get("summary") and annotations.get("description"), alert["alert"]
        # The webhook routes on the model label, so every expression must keep it.
        assert "model" in alert["expr"], alert["alert"]
        assert (labels.get("action") == "retrain") == (alert["alert"] in RETRAIN_ALERTS), alert["alert"]


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        doc = yaml.safe_load(path.read_text())
        for case in doc["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == ALERTS, f"no firing case for {ALERTS - firing}"
    assert quiet == ALERTS, f"no quiet case for {ALERTS - quiet}"

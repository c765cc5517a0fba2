"""Retrain triggers: a real child process, a Kubernetes Job rendered from the template, a dry run."""

from __future__ import annotations

import asyncio
import stat
import sys
from pathlib import Path

import pytest

from modelloop.control.retraining.trigger import (
    DryRunTrigger,
    KubernetesJobTrigger,
    RetrainRun,
    SubprocessTrigger,
    TriggerError,
    job_name,
    outcome_of,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = REPO_ROOT / "k8s" / "base" / "retrain-job-template.yaml"


def fake_python(tmp_path: Path, body: str) -> str:
    """An executable that stands in for ``python -m modelloop retrain``: it logs its argv."""
    script = tmp_path / "fake-python"
    script.write_text(f"#!{sys.executable}\nimport json, os, sys, time\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


async def test_subprocess_trigger_reports_the_outcome_without_blocking(tmp_path: Path):
    # The child finishes only once the test opens its gate, which the test does after start()
    # returned: a start() that waited for the child would never return (the bound says so).
    gate = tmp_path / "gate"
    python = fake_python(
        tmp_path,
        "deadline = time.monotonic() + 120\n"
        f"while not os.path.exists({str(gate)!r}) and time.monotonic() < deadline: time.sleep(0.01)\n"
        "print('training...')\n"
        "print(json.dumps({'outcome': 'blessed', 'version': 2, 'argv': sys.argv[1:]}))\n"
        "sys.exit(0)",
    )
    finished: list[RetrainRun] = []
    trigger = SubprocessTrigger(
        tmp_path / "repo",
        store_url="sqlite:///x.db",
        state_dir=tmp_path / "s",
        python=python,
        on_finish=finished.append,
    )
    await asyncio.wait_for(trigger.start("digits", reason="ModelDriftDetected"), timeout=30)
    assert trigger.running() == ["digits"]
    with pytest.raises(TriggerError, match="already running"):
        await trigger.start("digits")
    gate.touch()
    runs = await trigger.wait_idle(timeout=60)
    assert [r.outcome for r in runs] == ["blessed"] and finished == runs
    assert runs[0].result["argv"] == [
        "-m",
        "modelloop",
        "retrain",
        "--repo",
        str(tmp_path / "repo"),
        "--name",
        "digits",
        "--store",
        "sqlite:///x.db",
        "--state-dir",
        str(tmp_path / "s"),
    ]
    assert trigger.running() == []


@pytest.mark.parametrize(
    ("body", "outcome", "code"),
    [
        ("print(json.dumps({'outcome': 'rejected'})); sys.exit(3)", "rejected", 3),
        ("sys.exit(3)", "rejected", 3),
        ("raise SystemExit(1)", "failed", 1),
        ("import os; os.kill(os.getpid(), 9)", "failed", -9),
        ("print('{not json'); sys.exit(0)", "blessed", 0),
    ],
)
async def test_subprocess_trigger_outcomes(tmp_path: Path, body: str, outcome: str, code: int):
    finished: list[RetrainRun] = []
    trigger = SubprocessTrigger(tmp_path, python=fake_python(tmp_path, body), on_finish=finished.append)
    await trigger.start("m")
    await trigger.wait_idle(timeout=10)
    assert [(r.outcome, r.returncode) for r in finished] == [(outcome, code)]


async def test_subprocess_trigger_close_stops_running_children(tmp_path: Path):
    finished: list[RetrainRun] = []
    trigger = SubprocessTrigger(
        tmp_path, python=fake_python(tmp_path, "time.sleep(60)"), on_finish=finished.append
    )
    await trigger.start("m")
    await trigger.close(timeout=5)
    assert [r.outcome for r in finished] == ["failed"] and trigger.running() == []


async def test_subprocess_trigger_unspawnable(tmp_path: Path):
    trigger = SubprocessTrigger(tmp_path, python=str(tmp_path / "missing"))
    with pytest.raises(TriggerError, match="cannot start"):
        await trigger.start("m")
    assert trigger.running() == []


def test_outcome_of_prefers_the_json_line():
    assert outcome_of(1, {"outcome": "rejected"}) == "rejected"
    assert outcome_of(0, {"outcome": "weird"}) == "blessed"
    assert outcome_of(None, {}) == "failed"


class FakeBatchV1Api:
    """Records create_namespaced_job calls; raises what it is told to."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.created: list[tuple[str, dict]] = []

    def create_namespaced_job(self, namespace: str, body: dict) -> dict:
        if self.error is not None:
            raise self.error
        self.created.append((namespace, body))
        return body


def test_job_names_are_valid_and_deterministic():
    a = job_name("Digits_v2.model", "g|t0")
    assert a == job_name("Digits_v2.model", "g|t0") != job_name("Digits_v2.model", "g|t1")
    assert a.startswith("retrain-digits-v2-model-") and len(a) <= 63
    long = job_name("x" * 128, "k")
    assert len(long) <= 63 and long.replace("-", "").isalnum()


def test_rendered_job_is_a_valid_batch_v1_job():
    import kubernetes_validate

    trigger = KubernetesJobTrigger(FakeBatchV1Api(), TEMPLATE, "ml", image="registry.example/modelloop:1.2")
    body = trigger.render("digits", reason="ModelDriftDetected", key="g|t0")
    kubernetes_validate.validate(body, "1.29.0", strict=True)
    assert body["metadata"]["name"] == job_name("digits", "g|t0")
    assert body["metadata"]["namespace"] == "ml"
    assert body["metadata"]["annotations"] == {
        "modelloop.dev/reason": "ModelDriftDetected",
        "modelloop.dev/cause": "g|t0",
    }
    (container,) = body["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example/modelloop:1.2"
    # command, not args: args would be appended to the image's `modelloop serve` entrypoint.
    assert "args" not in container
    assert container["command"][:6] == ["modelloop", "retrain", "--repo", "/models", "--name", "digits"]
    assert body["spec"]["backoffLimit"] == 0


async def test_kubernetes_trigger_creates_the_job_through_the_api():
    api = FakeBatchV1Api()
    trigger = KubernetesJobTrigger(api, TEMPLATE, "ml")
    await trigger.start("digits", reason="ModelAccuracyBelowFloor", key="g|t0")
    ((namespace, body),) = api.created
    assert namespace == "ml" and body["metadata"]["labels"]["modelloop.dev/model"] == "digits"


async def test_kubernetes_trigger_conflict_is_started_and_other_errors_fail():
    from kubernetes.client.exceptions import ApiException

    await KubernetesJobTrigger(FakeBatchV1Api(ApiException(status=409)), TEMPLATE, "ml").start("digits")
    forbidden = KubernetesJobTrigger(
        FakeBatchV1Api(ApiException(status=403, reason="Forbidden")), TEMPLATE, "ml"
    )
    with pytest.raises(TriggerError, match=r"cannot create Job retrain-digits-.*403"):
        await forbidden.start("digits")


def test_kubernetes_trigger_bad_template_or_name(tmp_path: Path):
    with pytest.raises(TriggerError, match="cannot read Job template"):
        KubernetesJobTrigger(FakeBatchV1Api(), tmp_path / "none.yaml", "ml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Job\nmetadata: {name: ${WHO}}\n")
    with pytest.raises(TriggerError, match="cannot be rendered: KeyError"):
        KubernetesJobTrigger(FakeBatchV1Api(), bad, "ml").render("digits")
    pod = tmp_path / "pod.yaml"
    pod.write_text("kind: Pod\nmetadata: {name: ${JOB_NAME}}\n")
    with pytest.raises(TriggerError, match="one batch/v1 Job"):
        KubernetesJobTrigger(FakeBatchV1Api(), pod, "ml").render("digits")
    with pytest.raises(TriggerError, match="invalid model name"):
        KubernetesJobTrigger(FakeBatchV1Api(), TEMPLATE, "ml").render("a: b\nkind: Pod")


async def test_dry_run_records_and_fails_on_demand():
    trigger = DryRunTrigger()
    await trigger.start("digits", reason="r", key="k")
    assert trigger.calls == [("digits", "r", "k")]
    with pytest.raises(TriggerError, match="nope"):
        await DryRunTrigger(error="nope").start("digits")

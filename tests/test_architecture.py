"""The package boundaries of ARCHITECTURE.md, checked on every import (lazy and TYPE_CHECKING too).

Each rule is a test of its own, so a failure names the rule and every import that breaks it.
The checks parse the source with ``ast``; nothing is imported.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("training", "export", "serving", "monitoring", "control")
LEAVES = (
    "modelloop.errors",
    "modelloop.layout",
    "modelloop.logformat",
    "modelloop.storage",
    "modelloop.tokens",
    "modelloop.web",
)
FRAMEWORKS = ("fastapi", "starlette", "grpc", "grpc_health", "grpc_reflection", "uvicorn", "httptools", "h11")
LAYOUT_NAMES = {
    "config.json",
    "model.json",
    "baseline.json",
    "model.onnx",
    "model.py",
    "saved_model",
    ".staging",
    ".publish.lock",
    ".publish.claim",
    "model.keras",
    "run.json",
    "metrics.json",
    "split.npz",
    "gate.json",
}


@dataclass(frozen=True)
class Import:
    """One imported module name, where it is imported."""

    source: str  # the importing file, relative to the root
    package: str  # the importing package: a folder of PACKAGES, or the module name under modelloop/
    target: str  # the imported module, absolute (``modelloop.serving.types``)
    line: int


def _package_of(rel: Path) -> str:
    if rel.parts[0] == "modelloop":
        return "modelloop." + rel.stem
    return rel.parts[0]


def _module_of(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["modelloop", *parts]) if parts[0] != "modelloop" else ".".join(parts)


def _generated(rel: Path) -> bool:
    return rel.name.endswith(("_pb2.py", "_pb2_grpc.py"))


def sources() -> Iterator[tuple[Path, ast.Module]]:
    """Every project module with its syntax tree (generated protobuf code excluded)."""
    for folder in ("modelloop", *PACKAGES):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if not _generated(rel):
                yield rel, ast.parse(path.read_text(), str(rel))


def imports() -> list[Import]:
    """Every import of every project module, relative ones resolved."""
    found = []
    for rel, tree in sources():
        module = _module_of(rel).split(".")
        package = module if rel.name == "__init__.py" else module[:-1]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                # `from modelloop import layout` imports modelloop.layout.
                names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for name in names:
                found.append(Import(str(rel), _package_of(rel), name, node.lineno))
    return found


def ours(target: str, prefix: str) -> bool:
    """Whether ``target`` is ``prefix`` or inside it."""
    return target == prefix or target.startswith(prefix + ".")


def violations(rule: str, bad: list[Import]) -> str:
    return f"{rule}:\n" + "\n".join(f"  {i.source}:{i.line} imports {i.target}" for i in bad)


ALL = imports()


def test_the_checks_see_lazy_and_type_checking_imports() -> None:
    # modelloop/cli.py imports the server inside a function; serving/rest/app.py imports the
    # data plane under TYPE_CHECKING. If these go missing, the parser lost them.
    targets = {(i.source, i.target) for i in ALL}
    assert ("modelloop/cli.py", "modelloop.server") in targets
    assert ("serving/rest/app.py", "modelloop.serving.dataplane") in targets


def test_serving_never_imports_monitoring_control_training_or_export() -> None:
    bad = [
        i
        for i in ALL
        if i.package == "serving"
        and any(ours(i.target, f"modelloop.{p}") for p in ("monitoring", "control", "training", "export"))
    ]
    assert not bad, violations("serving/ imports monitoring/, control/, training/ or export/", bad)


def test_monitoring_reaches_serving_only_through_types() -> None:
    # Answered requests reach monitoring only through the prediction log (its record format
    # is the leaf modelloop/logformat.py): no observer hook, no serving internals.
    allowed = ("modelloop.serving.types",)
    bad = [
        i
        for i in ALL
        if i.package == "monitoring"
        and ours(i.target, "modelloop.serving")
        and i.target != "modelloop.serving"
        and not any(ours(i.target, a) for a in allowed)
    ]
    bad += [i for i in ALL if i.package == "monitoring" and i.target == "modelloop.serving"]
    assert not bad, violations("monitoring/ imports serving/ beyond types", bad)


def test_the_stores_hold_data_and_sql_only() -> None:
    # monitoring/stores/: one small store per kind of data on one engine. Of our code it
    # imports its own modules, the history point it keeps, and the leaves; no analysis, no
    # serving, no control plane.
    allowed = ("modelloop.monitoring.stores", "modelloop.monitoring.history.HistoryPoint")
    bad = [
        i
        for i in ALL
        if i.source.startswith("monitoring/stores/")
        and ours(i.target, "modelloop")
        and not any(ours(i.target, leaf) for leaf in LEAVES)
        and not any(ours(i.target, a) for a in allowed)
        and i.target not in ("modelloop", "modelloop.monitoring", "modelloop.monitoring.history")
    ]
    assert not bad, violations("monitoring/stores/ imports beyond its own modules and the leaves", bad)


def test_monitoring_never_imports_the_control_plane() -> None:
    # monitoring/ is the analysis and the stores; control/ (the monitor loop, rollout judging,
    # retraining, their HTTP surface) is built on it, never the other way round.
    bad = [i for i in ALL if i.package == "monitoring" and ours(i.target, "modelloop.control")]
    assert not bad, violations("monitoring/ imports control/", bad)


def test_the_control_plane_reaches_serving_only_through_types() -> None:
    allowed = ("modelloop.serving.types",)
    bad = [
        i
        for i in ALL
        if i.package == "control"
        and ours(i.target, "modelloop.serving")
        and not any(ours(i.target, a) for a in allowed)
    ]
    assert not bad, violations("control/ imports serving/ beyond types", bad)


def test_only_the_retrain_job_uses_training_and_export_together() -> None:
    # The job (train, export, gate, publish) and its gate; the rest of the control plane, which
    # every server without --control-plane loads, reads training and export as monitoring does.
    job = ("control/retraining/job.py", "control/retraining/gate.py", "control/retraining/settings.py")
    light = ("modelloop.training.baseline", "modelloop.training.calibration", "modelloop.export.publish")
    bad = [
        i
        for i in ALL
        if i.package == "control"
        and i.source not in job
        and any(ours(i.target, f"modelloop.{p}") for p in ("training", "export"))
        and not any(ours(i.target, a) for a in light)
    ]
    assert not bad, violations("control/ imports training or export outside the retrain job", bad)


def test_training_imports_none_of_the_other_packages() -> None:
    bad = [
        i
        for i in ALL
        if i.package == "training"
        and any(ours(i.target, f"modelloop.{p}") for p in ("export", "serving", "monitoring", "control"))
    ]
    bad += [i for i in ALL if i.package == "training" and ours(i.target, "modelloop.server")]
    assert not bad, violations("training/ imports export/, serving/ or monitoring/", bad)


def test_export_imports_only_training_and_the_leaves() -> None:
    bad = [
        i
        for i in ALL
        if i.package == "export"
        and any(ours(i.target, f"modelloop.{p}") for p in ("serving", "monitoring", "control"))
    ]
    assert not bad, violations("export/ imports serving/, monitoring/ or control/", bad)


def test_the_leaves_import_nothing_of_ours_but_each_other() -> None:
    bad = [
        i
        for i in ALL
        if i.package in LEAVES
        and ours(i.target, "modelloop")
        and i.target != "modelloop"
        and not any(ours(i.target, leaf) for leaf in LEAVES)
    ]
    assert not bad, violations("a shared leaf imports a package", bad)


def test_only_the_roots_wire_serving_with_monitoring() -> None:
    # Two composition roots: the server (modelloop/server.py) and the control plane
    # (modelloop/monitor.py), and the prediction log both open the same way
    # (modelloop/logwiring.py).
    wiring = {
        i.package
        for i in ALL
        if i.package.startswith("modelloop.")
        and (ours(i.target, "modelloop.monitoring") or ours(i.target, "modelloop.control"))
        and i.package not in ("modelloop.cli",)
    }
    roots = {"modelloop.server", "modelloop.monitor", "modelloop.logwiring"}
    assert wiring <= roots, f"modules other than the roots import monitoring or control: {wiring}"
    job = ("control/retraining/job.py", "control/retraining/gate.py", "control/retraining/settings.py")
    retrain_serving = [i for i in ALL if i.source in job and ours(i.target, "modelloop.serving")]
    assert not retrain_serving, violations("the retrain pipeline imports serving", retrain_serving)


def test_the_serving_core_imports_no_web_or_rpc_framework() -> None:
    def core(source: str) -> bool:
        parts = Path(source).parts
        return parts[0] == "serving" and (len(parts) == 2 or parts[1] in ("runtimes", "codecs"))

    bad = [i for i in ALL if core(i.source) and i.target.split(".")[0] in FRAMEWORKS]
    assert not bad, violations("the serving core imports a web or RPC framework", bad)


def test_only_the_savedmodel_runtime_imports_tensorflow_in_serving() -> None:
    # A server of ONNX models never loads TensorFlow: the TF Serving protocol comes from
    # serving/protos/tfserving, and TensorFlow loads only with a SavedModel runtime.
    heavy = ("tensorflow", "tensorflow_serving", "keras", "tf2onnx")
    bad = [
        i
        for i in ALL
        if i.package == "serving"
        and i.target.split(".")[0] in heavy
        and i.source != "serving/runtimes/savedmodel.py"
    ]
    bad += [
        i
        for i in ALL
        if i.package in ("modelloop.server", "monitoring", "control") and i.target.split(".")[0] in heavy
    ]
    assert not bad, violations("serving imports TensorFlow outside the SavedModel runtime", bad)


def test_no_import_cycle_between_packages() -> None:
    edges: dict[str, set[str]] = {}
    for i in ALL:
        if i.package not in PACKAGES:
            continue
        for target in PACKAGES:
            if target != i.package and ours(i.target, f"modelloop.{target}"):
                edges.setdefault(i.package, set()).add(target)

    def reaches(start: str, goal: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(
            n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in edges.get(start, ())
        )

    cycles = [p for p in PACKAGES if reaches(p, p)]
    assert not cycles, f"packages on an import cycle: {cycles}; edges: {edges}"


def test_repository_and_run_file_names_are_spelled_in_the_layout_module_only() -> None:
    homes: dict[str, set[str]] = {}
    for rel, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in LAYOUT_NAMES:
                homes.setdefault(str(rel), set()).add(str(node.value))
    assert set(homes) == {"modelloop/layout.py"}, f"file names spelled outside modelloop/layout.py: {homes}"


@pytest.mark.parametrize(
    ("source", "line", "rule"),
    [
        ("serving/dataplane.py", "import modelloop.monitoring", "serving_never_imports"),
        ("monitoring/drift.py", "from modelloop.serving.registry import ModelRegistry", "monitoring_reaches"),
        ("monitoring/window.py", "from modelloop.serving.observer import NullObserver", "monitoring_reaches"),
        ("training/train.py", "from modelloop.export import publish", "training_imports_none"),
        ("serving/batching.py", "import fastapi", "serving_core"),
        ("serving/grpc/servicers.py", "from tensorflow_serving.apis import predict_pb2", "tensorflow"),
        ("monitoring/stores/feedback.py", "from modelloop.monitoring.drift import psi", "stores"),
        ("monitoring/stores/engine.py", "from modelloop.serving import types", "stores"),
        (
            "monitoring/drift.py",
            "from modelloop.control.service import MonitoringService",
            "monitoring_control",
        ),
        (
            "control/rollout/controller.py",
            "from modelloop.serving.registry import ModelRegistry",
            "control_serving",
        ),
        ("control/retraining/policy.py", "from modelloop.training.train import train", "control_training"),
    ],
)
def test_each_rule_catches_a_planted_import(
    monkeypatch: pytest.MonkeyPatch, source: str, line: str, rule: str
) -> None:
    """The rules are not vacuous: an import planted in the source breaks the right one."""
    original = ast.parse

    def planted(text: str, filename: str = "<unknown>", *args: object, **kwargs: object) -> ast.Module:
        if filename == source:
            text = f"{text}\n{line}\n"
        return original(text, filename, *args, **kwargs)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(ast, "parse", planted)
    found = imports()
    checks = {
        "serving_never_imports": test_serving_never_imports_monitoring_control_training_or_export,
        "monitoring_reaches": test_monitoring_reaches_serving_only_through_types,
        "training_imports_none": test_training_imports_none_of_the_other_packages,
        "serving_core": test_the_serving_core_imports_no_web_or_rpc_framework,
        "tensorflow": test_only_the_savedmodel_runtime_imports_tensorflow_in_serving,
        "stores": test_the_stores_hold_data_and_sql_only,
        "monitoring_control": test_monitoring_never_imports_the_control_plane,
        "control_serving": test_the_control_plane_reaches_serving_only_through_types,
        "control_training": test_only_the_retrain_job_uses_training_and_export_together,
    }
    monkeypatch.setattr(f"{__name__}.ALL", found)
    with pytest.raises(AssertionError, match=source.replace(".", r"\.")):
        checks[rule]()

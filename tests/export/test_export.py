"""Export: SavedModel and ONNX forms, parity, metadata, atomic publish and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from modelloop.export.exporter import ExportError, export_run
from modelloop.export.publish import PublishError

SPECS = Path(__file__).resolve().parents[1] / "testdata" / "specs"


def _version_dirs(repo: Path) -> list[Path]:
    return sorted(p for p in repo.glob("*/*") if p.is_dir() and p.name.isdigit())


def test_published_version_holds_every_file(digits_repo):
    v1 = digits_repo / "digits" / "1"
    assert (v1 / "model.onnx").is_file()
    assert (v1 / "saved_model" / "saved_model.pb").is_file()
    assert (v1 / "model.json").is_file()
    assert (v1 / "baseline.json").is_file()
    assert not any((digits_repo / ".staging").iterdir())


def test_the_version_ships_warmup_requests_from_the_validation_split(digits_repo, digits_run):
    requests = json.loads((digits_repo / "digits" / "1" / "warmup.json").read_text())
    x_val = np.load(digits_run / "split.npz")["x_val"].astype(np.float32)
    assert [r["inputs"][0]["shape"] for r in requests] == [[1, 64], [8, 64]]
    batch = requests[1]["inputs"][0]
    assert (batch["name"], batch["datatype"]) == ("pixels", "FP32")
    np.testing.assert_array_equal(np.asarray(batch["data"], np.float32).reshape(8, 64), x_val[:8])


def test_model_json_describes_the_version(digits_repo, digits_run):
    meta = json.loads((digits_repo / "digits" / "1" / "model.json").read_text())
    run = json.loads((digits_run / "run.json").read_text())
    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert meta["name"] == "digits" and meta["version"] == 1
    assert meta["task"] == "multiclass"
    assert meta["inputs"] == [{"name": "pixels", "dtype": "float32", "shape": [-1, 64]}]
    assert meta["outputs"] == [{"name": "probabilities", "dtype": "float32", "shape": [-1, 10]}]
    assert meta["labels"] == [str(i) for i in range(10)]
    assert meta["metrics"]["test"] == metrics["test"]
    assert meta["training_run"]["run_id"] == run["run_id"]
    assert meta["onnx_opset"] >= 17
    assert meta["parity"]["passed"] is True
    assert meta["parity"]["batch_sizes"] == [1, 64]
    assert max(meta["parity"]["max_abs_diff"].values()) <= 1e-5
    assert meta["created"].endswith("+00:00")


def test_baseline_is_copied_unchanged(digits_repo, digits_run):
    assert (digits_repo / "digits" / "1" / "baseline.json").read_bytes() == (
        digits_run / "baseline.json"
    ).read_bytes()


def test_onnx_has_opset_17_a_dynamic_batch_and_the_spec_names(digits_repo):
    import onnx

    model = onnx.load(str(digits_repo / "digits" / "1" / "model.onnx"))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == "pixels" and out.name == "probabilities"
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert inp.type.tensor_type.shape.dim[1].dim_value == 64
    assert out.type.tensor_type.shape.dim[1].dim_value == 10


def test_saved_model_signature_uses_the_spec_names(digits_repo):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(digits_repo / "digits" / "1" / "saved_model"))
    fn = loaded.signatures["serving_default"]
    _, kwargs = fn.structured_input_signature
    assert list(kwargs) == ["pixels"]
    assert kwargs["pixels"].shape.as_list() == [None, 64]
    assert list(fn.structured_outputs) == ["probabilities"]


@pytest.mark.parametrize("batch", [1, 64])
def test_all_three_forms_agree_on_real_rows(digits_repo, digits_run, batch):
    import keras
    import onnxruntime as ort
    import tensorflow as tf

    x = np.load(digits_run / "split.npz")["x_test"][:batch]
    expected = keras.saving.load_model(digits_run / "model.keras").predict(x, verbose=0)
    session = ort.InferenceSession(
        str(digits_repo / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    onnx_out = session.run(["probabilities"], {"pixels": x})[0]
    fn = tf.saved_model.load(str(digits_repo / "digits" / "1" / "saved_model")).signatures["serving_default"]
    tf_out = fn(pixels=tf.constant(x))["probabilities"].numpy()
    np.testing.assert_allclose(onnx_out, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(tf_out, expected, atol=1e-5, rtol=0)
    assert onnx_out.shape == (batch, 10)


@pytest.mark.parametrize("api", ["sequential", "functional", "subclassed"])
def test_each_keras_api_exports_with_parity(train_run, tmp_path, api):
    run = train_run(str(SPECS / f"{api}_spec.py"))
    result = export_run(run, tmp_path / "repo", name=f"blobs-{api}")
    assert result.version == 1
    assert result.parity.passed
    meta = json.loads((result.version_dir / "model.json").read_text())
    assert meta["name"] == f"blobs-{api}"
    assert len(meta["outputs"][0]["shape"]) == 2


@pytest.mark.slow
def test_regressor_in_score_units_passes_parity(train_run, tmp_path):
    result = export_run(train_run("diabetes"), tmp_path / "repo")
    meta = json.loads((result.version_dir / "model.json").read_text())
    assert meta["parity"]["passed"] is True
    assert meta["parity"]["rtol"] == 1e-6
    assert meta["outputs"] == [{"name": "prediction", "dtype": "float32", "shape": [-1, 1]}]


def test_next_export_gets_the_next_version(digits_repo, digits_run, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(digits_repo, repo)
    result = export_run(digits_run, repo)
    assert result.version == 2
    assert json.loads((result.version_dir / "model.json").read_text())["version"] == 2
    assert (repo / "digits" / "1" / "model.onnx").read_bytes() == (
        digits_repo / "digits" / "1" / "model.onnx"
    ).read_bytes()


def test_failed_parity_publishes_nothing(digits_run, tmp_path):
    repo = tmp_path / "repo"
    with pytest.raises(ExportError, match=r"parity check failed, nothing published: max abs diff keras_vs_"):
        export_run(digits_run, repo, atol=1e-12, rtol=0.0)
    assert _version_dirs(repo) == []
    assert not any((repo / ".staging").iterdir())


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda run: shutil.rmtree(run), "does not exist"),
        (lambda run: (run / "model.keras").unlink(), "incomplete: missing model.keras"),
        (lambda run: (run / "run.json").write_text("{not json"), "run.json' is unreadable or corrupt"),
        (lambda run: (run / "run.json").write_text("[]"), "is not a JSON object"),
        (lambda run: (run / "run.json").write_text('{"run_id": "x"}'), "lacks 'spec'"),
        (lambda run: (run / "model.keras").write_bytes(b"garbage"), "cannot load"),
        (lambda run: (run / "split.npz").write_bytes(b"garbage"), "split.npz' is unreadable or corrupt"),
    ],
    ids=[
        "missing",
        "incomplete",
        "corrupt-json",
        "json-list",
        "json-fields",
        "corrupt-model",
        "corrupt-split",
    ],
)
def test_bad_run_directories_are_refused_and_leave_the_repo_alone(digits_run, tmp_path, damage, message):
    run = _copy_run(digits_run, tmp_path / "run")
    damage(run)
    repo = tmp_path / "repo"
    with pytest.raises(ExportError, match=message):
        export_run(run, repo)
    assert _version_dirs(repo) == []


@pytest.mark.parametrize("name", ["a/b", "..", "../escape", "", ".hidden", "has space", "x" * 200, "/abs"])
def test_bad_model_names_are_refused(digits_run, tmp_path, name):
    repo = tmp_path / "repo"
    with pytest.raises(PublishError, match="invalid model name"):
        export_run(digits_run, repo, name=name)
    assert not repo.exists() or _version_dirs(repo) == []
    assert not (tmp_path / "escape").exists()


def test_unwritable_repo_is_refused(digits_run, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(PublishError, match="cannot be created"):
        export_run(digits_run, blocker / "repo")

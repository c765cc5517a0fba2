"""OnnxRuntime and SavedModelRuntime on a real exported digits model; provider choice."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from modelloop.serving.repository import ModelRepository
from modelloop.serving.runtimes.onnx import PLATFORM as ONNX_PLATFORM
from modelloop.serving.runtimes.onnx import OnnxRuntime, choose_providers
from modelloop.serving.runtimes.savedmodel import PLATFORM as SAVEDMODEL_PLATFORM
from modelloop.serving.runtimes.savedmodel import SavedModelRuntime
from modelloop.serving.types import ModelMetadata, TensorSpec

ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
CPU = ["CPUExecutionProvider"]


def test_default_order_is_tensorrt_cuda_cpu() -> None:
    assert choose_providers(list(reversed(ALL))) == ALL


def test_filters_by_availability() -> None:
    assert choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"]) == ALL[1:]
    assert choose_providers(CPU) == CPU
    assert choose_providers(["CPUExecutionProvider", "CoreMLExecutionProvider"]) == CPU


def test_config_overrides_the_order() -> None:
    requested = ["CPUExecutionProvider", "CUDAExecutionProvider"]
    assert choose_providers(ALL, requested) == requested
    assert choose_providers(CPU, ["TensorrtExecutionProvider", "CPUExecutionProvider"]) == CPU
    assert choose_providers(ALL, ["CUDAExecutionProvider", "CUDAExecutionProvider"]) == [
        "CUDAExecutionProvider"
    ]


def test_no_gpu_driver_drops_gpu_providers_from_the_default_only() -> None:
    assert choose_providers(ALL, gpu=False) == CPU
    assert choose_providers(ALL, ["CUDAExecutionProvider"], gpu=False) == ["CUDAExecutionProvider"]


def test_nothing_available_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"none of the ONNX Runtime providers.*available"):
        choose_providers(CPU, ["CUDAExecutionProvider"])


def _metadata(repo: Path, platform: str) -> ModelMetadata:
    return ModelRepository.read_metadata(repo / "digits" / "1", "digits", 1, platform)


def _rows(n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    return rng.integers(0, 17, size=(n, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def runtimes(digits_repo: Path) -> tuple[OnnxRuntime, SavedModelRuntime]:
    version = digits_repo / "digits" / "1"
    onnx = OnnxRuntime(
        version / "model.onnx", _metadata(digits_repo, ONNX_PLATFORM), providers=CPU, intra_op_num_threads=1
    )
    saved = SavedModelRuntime(version / "saved_model", _metadata(digits_repo, SAVEDMODEL_PLATFORM))
    onnx.load()
    saved.load()
    return onnx, saved


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_onnx_and_savedmodel_agree(runtimes: tuple[OnnxRuntime, SavedModelRuntime], batch: int) -> None:
    onnx, saved = runtimes
    x = {"pixels": _rows(batch)}
    a, b = onnx.predict(x), saved.predict(x)
    assert list(a) == list(b) == ["probabilities"]
    assert a["probabilities"].shape == (batch, 10) and a["probabilities"].dtype == np.float32
    assert b["probabilities"].dtype == np.float32
    np.testing.assert_allclose(a["probabilities"], b["probabilities"], atol=1e-5, rtol=0)
    assert onnx.providers == CPU and saved.providers == []


def test_onnx_logs_its_providers(digits_repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    runtime = OnnxRuntime(
        digits_repo / "digits" / "1" / "model.onnx", _metadata(digits_repo, ONNX_PLATFORM), providers=CPU
    )
    with caplog.at_level(logging.INFO, logger="modelloop.serving.runtimes.onnx"):
        runtime.load()
    assert "ONNX Runtime providers ['CPUExecutionProvider']" in caplog.text
    runtime.unload()
    with pytest.raises(RuntimeError, match="not loaded"):
        runtime.predict({"pixels": _rows(1)})


def test_onnx_rejects_a_corrupt_file(tmp_path: Path, digits_repo: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not a protobuf")
    runtime = OnnxRuntime(bad, _metadata(digits_repo, ONNX_PLATFORM), providers=CPU)
    with pytest.raises(Exception, match=r"(?i)protobuf|parse|invalid"):
        runtime.load()
    with pytest.raises(FileNotFoundError):
        OnnxRuntime(tmp_path / "absent.onnx", _metadata(digits_repo, ONNX_PLATFORM), providers=CPU).load()


def test_onnx_rejects_metadata_that_does_not_match(digits_repo: Path) -> None:
    meta = _metadata(digits_repo, ONNX_PLATFORM)
    wrong = ModelMetadata(
        name="digits",
        version=1,
        platform=ONNX_PLATFORM,
        inputs=(TensorSpec("features", np.dtype("float32"), (-1, 64)),),
        outputs=meta.outputs,
    )
    with pytest.raises(ValueError, match="names input 'features', the ONNX graph has \\['pixels'\\]"):
        OnnxRuntime(digits_repo / "digits" / "1" / "model.onnx", wrong, providers=CPU).load()


def test_savedmodel_rejects_a_wrong_signature(digits_repo: Path, tmp_path: Path) -> None:
    meta = _metadata(digits_repo, SAVEDMODEL_PLATFORM)
    other = ModelMetadata(
        name="digits",
        version=1,
        platform=SAVEDMODEL_PLATFORM,
        inputs=meta.inputs,
        outputs=meta.outputs,
        signature_name="predict",
    )
    path = digits_repo / "digits" / "1" / "saved_model"
    with pytest.raises(ValueError, match=r"no signature 'predict'.*serving_default"):
        SavedModelRuntime(path, other).load()
    with pytest.raises(FileNotFoundError):
        SavedModelRuntime(tmp_path / "absent", meta).load()
    broken = tmp_path / "saved_model"
    shutil.copytree(path, broken)
    (broken / "saved_model.pb").write_bytes(b"garbage")
    with pytest.raises(Exception):  # noqa: B017 - TensorFlow raises several types
        SavedModelRuntime(broken, meta).load()

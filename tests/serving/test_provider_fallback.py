"""The GPU provider choice is logged, and a silent CUDA fallback is made loud (docs/performance.md)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from modelloop.serving.repository import ModelRepository
from modelloop.serving.runtimes.onnx import PLATFORM, OnnxRuntime, choose_providers, has_nvidia_driver

GPU_FIRST = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_a_fake_gpu_host_asks_for_cuda_first_and_a_cpu_host_does_not() -> None:
    fake = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(fake, gpu=True)[0] == "TensorrtExecutionProvider"
    assert choose_providers(fake, GPU_FIRST, gpu=True) == GPU_FIRST
    assert choose_providers(fake, gpu=False) == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="none of the ONNX Runtime providers"):
        choose_providers(["CPUExecutionProvider"], ["CUDAExecutionProvider"])


@pytest.mark.skipif(has_nvidia_driver(), reason="with a GPU, CUDA loads and nothing falls back")
def test_requested_cuda_without_a_gpu_logs_the_fallback(
    digits_repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider")
    version_dir = digits_repo / "digits" / "1"
    metadata = ModelRepository.read_metadata(version_dir, "digits", 1, PLATFORM)
    runtime = OnnxRuntime(version_dir / "model.onnx", metadata, providers=GPU_FIRST)
    with caplog.at_level(logging.INFO, logger="modelloop.serving.runtimes.onnx"):
        runtime.load()
    assert "ONNX Runtime providers ['CPUExecutionProvider']" in caplog.text
    assert (
        "requested providers ['CUDAExecutionProvider'] fell back to ['CPUExecutionProvider']" in caplog.text
    )
    assert runtime.providers == ["CPUExecutionProvider"]
    runtime.unload()

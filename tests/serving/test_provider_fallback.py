"""The GPU provider choice is logged, and a silent CUDA fallback is made loud (docs/performance.md)."""

from __future__ import annotations

import logging
import platform
import sys
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


def test_requested_cuda_runs_on_a_gpu_and_its_fallback_is_logged_without_one(
    digits_repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import onnxruntime as ort

    cuda_built = "CUDAExecutionProvider" in ort.get_available_providers()
    # pyproject pins onnxruntime-gpu on Linux x86_64: there CUDA must be built in.
    if sys.platform == "linux" and platform.machine() == "x86_64":
        assert cuda_built, ort.get_available_providers()
    version_dir = digits_repo / "digits" / "1"
    metadata = ModelRepository.read_metadata(version_dir, "digits", 1, PLATFORM)
    runtime = OnnxRuntime(version_dir / "model.onnx", metadata, providers=GPU_FIRST)
    with caplog.at_level(logging.INFO, logger="modelloop.serving.runtimes.onnx"):
        runtime.load()
    try:
        if has_nvidia_driver() and runtime.providers[0] == "CUDAExecutionProvider":
            # A GPU host: CUDA took the model and nothing fell back.
            assert "fell back" not in caplog.text
        elif cuda_built:
            # Asked for, built in, but no GPU to run on: ONNX Runtime would fall back quietly.
            assert runtime.providers == ["CPUExecutionProvider"]
            assert "ONNX Runtime providers ['CPUExecutionProvider']" in caplog.text
            assert (
                "requested providers ['CUDAExecutionProvider'] fell back to ['CPUExecutionProvider']"
                in caplog.text
            )
        else:
            # A CPU-only build: CUDA was never available, so only CPU was asked for.
            assert runtime.providers == ["CPUExecutionProvider"]
            assert "fell back" not in caplog.text
    finally:
        runtime.unload()

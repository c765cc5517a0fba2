"""The Python runtime: a version's own ``model.py``, loaded and served by the real registry.

Each test writes tiny ``model.py`` files into a temporary repository and runs them through
the default runtime factory, the registry and the data plane, as ``modelloop serve`` does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from modelloop.serving.dataplane import DataPlane
from modelloop.serving.errors import InferenceFailed, ModelNotReady
from modelloop.serving.metrics import ServingMetrics
from modelloop.serving.registry import ModelRegistry
from modelloop.serving.repository import ModelRepository
from modelloop.serving.runtimes.python import PythonModelError, PythonRuntime
from modelloop.serving.settings import BatchingSettings, ServingSettings
from modelloop.serving.types import InferRequest, ModelState, Protocol

from .edge_support import tensor, write_config, write_version

# Upper-cases its strings, counts their bytes and records the thread and batch of each call.
UPPER = """
import threading
import numpy as np

CALLS = []

class Model:
    def load(self, version_dir):
        self.suffix = (version_dir / "suffix.txt").read_bytes()

    def predict(self, inputs):
        text = inputs["text"]
        CALLS.append((threading.current_thread().name, len(text)))
        if any(t == b"boom" for t in text):
            raise ValueError("the model cannot read 'boom'")
        upper = [t.upper() + self.suffix for t in text]
        return {"upper": upper, "length": np.array([len(t) for t in text], dtype=np.float64)}
"""


def write_python_version(repo: Path, version: int, source: str, name: str = "m") -> Path:
    path = write_version(
        repo,
        name,
        version,
        [tensor("text", "object", (-1,))],
        [tensor("upper", "object", (-1,)), tensor("length", "float32", (-1,))],
    )
    (path / "model.py").write_text(textwrap.dedent(source))
    (path / "suffix.txt").write_bytes(b"!")
    return path


def make_registry(repo: Path, **settings: object) -> tuple[ModelRegistry, CollectorRegistry]:
    prom = CollectorRegistry()
    registry = ModelRegistry(
        ModelRepository(repo),
        ServingSettings(repo=repo, poll_interval_s=3600, **settings),
        metrics=ServingMetrics(prom),
    )
    return registry, prom


def texts(*values: bytes) -> np.ndarray:
    return np.array(values, dtype=object)


async def infer(plane: DataPlane, *values: bytes, version: int | None = None) -> dict[str, np.ndarray]:
    response = await plane.infer(
        InferRequest(model="m", version=version, inputs={"text": texts(*values)}, protocol=Protocol.V2_REST)
    )
    return response.outputs


def test_runtime_loads_predicts_and_casts_to_the_declared_dtypes(tmp_path: Path) -> None:
    path = write_python_version(tmp_path, 1, UPPER)
    metadata = ModelRepository.read_metadata(path, "m", 1, "python")
    runtime = PythonRuntime(path, metadata)
    runtime.load()
    out = runtime.predict({"text": texts(b"ab", "é".encode())})
    assert list(out) == ["upper", "length"]
    assert out["upper"].dtype == object and out["upper"].tolist() == [b"AB!", "é".encode().upper() + b"!"]
    assert out["length"].dtype == np.float32 and out["length"].tolist() == [2.0, 2.0]
    assert runtime.may_run_inline is False
    module = runtime.parameters["module"]
    assert module in sys.modules
    runtime.unload()
    assert module not in sys.modules
    with pytest.raises(RuntimeError, match="not loaded"):
        runtime.predict({"text": texts(b"a")})


def test_the_repository_chooses_python_when_model_py_exists(tmp_path: Path) -> None:
    path = write_python_version(tmp_path, 1, UPPER)
    (path / "model.onnx").write_bytes(b"model.py may call it")
    from modelloop.serving.settings import ModelConfig

    assert ModelRepository.runtime_kind(path, ModelConfig()) == "python"
    assert ModelRepository.runtime_kind(path, ModelConfig(runtime="onnx")) == "onnx"
    (path / "model.py").unlink()
    assert ModelRepository.runtime_kind(path, ModelConfig()) == "onnx"


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        (
            "import numpy as np\nimport not_a_module_anywhere\n",
            r"failed to import: ModuleNotFoundError: "
            r"No module named 'not_a_module_anywhere' \(model.py line 2\)",
        ),
        ("def broken(:\n", r"failed to import: SyntaxError: .*\(model.py line 1\)"),
        ("class Other:\n    pass\n", r"defines no class 'Model'"),
        ("class Model:\n    def load(self, d):\n        pass\n", r"class Model has no method predict"),
        ("import sys\nsys.exit(3)\n", r"failed to import: SystemExit: 3 \(model.py line 2\)"),
        (
            "class Model:\n    def load(self, d):\n        raise SystemExit('bye')\n"
            "    def predict(self, inputs):\n        return inputs\n",
            r"Model.load failed: SystemExit: bye \(model.py line 3\)",
        ),
        (
            "class Model:\n    def load(self, d):\n        raise OSError('weights.bin is missing')\n"
            "    def predict(self, inputs):\n        return inputs\n",
            r"Model.load failed: OSError: weights.bin is missing \(model.py line 3\)",
        ),
    ],
)
def test_a_broken_model_py_fails_to_load_with_the_reason(tmp_path: Path, source: str, reason: str) -> None:
    path = write_python_version(tmp_path, 1, source)
    runtime = PythonRuntime(path, ModelRepository.read_metadata(path, "m", 1, "python"))
    with pytest.raises(PythonModelError, match=reason):
        runtime.load()


async def test_a_failing_new_version_is_failed_with_its_reason_and_the_old_one_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_python_version(tmp_path, 1, UPPER)
    registry, prom = make_registry(tmp_path)
    plane = DataPlane(registry, registry.metrics)
    await plane.start()
    try:
        assert (await infer(plane, b"hi"))["upper"].tolist() == [b"HI!"]
        write_python_version(tmp_path, 2, "import numpy\nraise ImportError('needs tokenizers 0.19')\n")
        with caplog.at_level(logging.ERROR):
            await registry.poll()
        status = registry.status("m", 2)
        assert status.state is ModelState.FAILED
        reason = "failed to import: ImportError: needs tokenizers 0.19 (model.py line 2)"
        assert reason in status.error_message
        assert "needs tokenizers 0.19" in caplog.text
        assert prom.get_sample_value("modelloop_model_load_failures_total", {"model": "m"}) == 1
        # Version 1 still answers the latest requests; version 2 says why it cannot.
        assert registry.status("m", 1).state is ModelState.AVAILABLE
        assert (await infer(plane, b"still")).get("upper").tolist() == [b"STILL!"]
        with pytest.raises(ModelNotReady, match=r"needs tokenizers 0\.19"):
            await infer(plane, b"x", version=2)

        # Fixed in place: the changed directory is retried and replaces version 1.
        (tmp_path / "m" / "2" / "model.py").write_text(UPPER.replace("+ self.suffix", "+ b'?'"))
        later = os.stat(tmp_path / "m" / "2").st_mtime + 5
        os.utime(tmp_path / "m" / "2" / "model.py", (later, later))
        await registry.poll()
        assert registry.status("m", 2).state is ModelState.AVAILABLE
        assert (await infer(plane, b"new")).get("upper").tolist() == [b"NEW?"]
    finally:
        await plane.stop()


async def test_predict_raising_is_internal_with_the_models_text_and_counted(tmp_path: Path) -> None:
    write_python_version(tmp_path, 1, UPPER)
    registry, prom = make_registry(tmp_path)
    plane = DataPlane(registry, registry.metrics)
    await plane.start()
    try:
        with pytest.raises(InferenceFailed, match="ValueError: the model cannot read 'boom'") as caught:
            await infer(plane, b"fine", b"boom")
        assert caught.value.code.value == "INTERNAL"
        labels = {"model": "m", "version": "1", "protocol": "v2_rest", "code": "INTERNAL"}
        assert prom.get_sample_value("modelloop_requests_total", labels) == 1
        # The next request is served: one bad batch does not break the version.
        assert (await infer(plane, b"ok"))["upper"].tolist() == [b"OK!"]
    finally:
        await plane.stop()


async def test_outputs_that_break_model_json_are_internal_errors(tmp_path: Path) -> None:
    wrong = """
    import numpy as np

    class Model:
        def load(self, version_dir):
            pass

        def predict(self, inputs):
            n = len(inputs["text"])
            if inputs["text"][0] == b"exit":
                raise SystemExit(2)
            if inputs["text"][0] == b"list":
                return [1, 2]
            if inputs["text"][0] == b"missing":
                return {"upper": inputs["text"]}
            if inputs["text"][0] == b"rows":
                return {"upper": inputs["text"], "length": np.zeros(n + 1)}
            return {"upper": np.zeros(n), "length": np.zeros(n)}
    """
    write_python_version(tmp_path, 1, wrong)
    registry, _ = make_registry(tmp_path, warmup=False)
    plane = DataPlane(registry, registry.metrics)
    await plane.start()
    try:
        for text, message in [
            (b"exit", "RuntimeError: Model.predict called sys.exit(2)"),
            (b"list", "Model.predict returned list; it must return a dict of arrays"),
            (b"missing", "model.json declares 'length'"),
            (b"rows", "returned output 'length' with shape (2,) for a batch of 1 rows"),
            (b"dtype", "returned output 'upper' with dtype float64; model.json declares object"),
        ]:
            with pytest.raises(InferenceFailed, match=message.replace("(", r"\(").replace(")", r"\)")):
                await infer(plane, text)
    finally:
        await plane.stop()


async def test_predict_runs_on_the_batchers_threads_in_merged_batches(tmp_path: Path) -> None:
    write_python_version(tmp_path, 1, UPPER)
    write_config(
        tmp_path,
        "m",
        {"batching": BatchingSettings(max_batch_size=16, batch_timeout_micros=50_000).model_dump()},
    )
    registry, _ = make_registry(tmp_path)
    plane = DataPlane(registry, registry.metrics)
    await plane.start()
    try:
        servable = registry.resolve("m")
        assert servable.batcher.settings.inline_max_micros == 0
        module = sys.modules[servable.runtime.parameters["module"]]
        module.CALLS.clear()
        # The first request finds the batcher idle and runs at once; the seven sent while
        # it runs arrive under load and are merged.
        results = await asyncio.gather(*(infer(plane, f"r{i}".encode()) for i in range(8)))
        assert [r["upper"].tolist() for r in results] == [[f"R{i}!".encode()] for i in range(8)]
        threads = {name for name, _ in module.CALLS}
        assert threads and all(name.startswith("batch-m-1") for name in threads)
        assert threading.current_thread().name not in threads
        assert sum(n for _, n in module.CALLS) == 8
        assert max(n for _, n in module.CALLS) > 1, module.CALLS
    finally:
        await plane.stop()


# Reads each string as a number, as the model did; b"hold" keeps the thread a while,
# so that the requests behind it queue up and share a batch.
PARSE = """
import threading
import time
import numpy as np

CALLS = []

class Model:
    def load(self, version_dir):
        pass

    def predict(self, inputs):
        text = inputs["text"]
        CALLS.append(len(text))
        if text[0] == b"hold":
            time.sleep(0.5)
            return {"upper": list(text), "length": np.zeros(len(text))}
        values = [float(t) for t in text]
        return {"upper": list(text), "length": np.array(values)}
"""


async def test_one_clients_bad_row_reaches_neither_the_batch_nor_anothers_answer(tmp_path: Path) -> None:
    write_python_version(tmp_path, 1, PARSE)
    write_config(
        tmp_path,
        "m",
        {"batching": BatchingSettings(max_batch_size=8, batch_timeout_micros=100_000).model_dump()},
    )
    registry, _ = make_registry(tmp_path, warmup=False)
    plane = DataPlane(registry, registry.metrics)
    await plane.start()
    try:
        module = sys.modules[registry.resolve("m").runtime.parameters["module"]]
        held = asyncio.ensure_future(infer(plane, b"hold"))
        await asyncio.sleep(0.2)  # the held call runs; the next two queue behind it
        good, bad = await asyncio.gather(
            infer(plane, b"2.0"), infer(plane, b"SSN 078-05-1120"), return_exceptions=True
        )
        await held
    finally:
        await plane.stop()
    assert not isinstance(good, BaseException), good
    assert good["length"].tolist() == [2.0]
    assert isinstance(bad, InferenceFailed)
    assert "SSN 078-05-1120" in str(bad) and "2.0" not in str(bad)
    # The two requests shared a batch that failed; each then ran alone.
    assert module.CALLS == [1, 2, 1, 1]

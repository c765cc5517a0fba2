"""Candidate versions for rollout tests, made from a published digits version.

Each variant copies a version directory and rewrites its ``model.onnx`` with the ``onnx``
helpers: the original output becomes an inner tensor and a few nodes after it make the
variant's ``probabilities``. The version is published like a real one: built under
``.staging`` and renamed in.

- ``same``: the model as it is (a good candidate).
- ``permuted``: the classes are shifted by one, so every answer names the wrong digit.
- ``raises``: answers the all-zero warm-up batch, then fails on every real input (a
  Reshape whose target shape depends on the input).
- ``slow``: the same answers after a block of matrix products that the answer depends on
  (by a zero factor), ``slow_width`` wide.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

OUTPUT = "probabilities"


def _rewire(model: onnx.ModelProto) -> str:
    """Renames the graph's output tensor; returns the inner name the new nodes read."""
    inner = OUTPUT + "_inner"
    for node in model.graph.node:
        node.output[:] = [inner if name == OUTPUT else name for name in node.output]
    return inner


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value, name)


def variant_model(source: Path, kind: str, slow_width: int = 3072) -> onnx.ModelProto:
    """The ONNX model of one variant (see the module docstring)."""
    model = onnx.load(str(source))
    if kind == "same":
        return model
    inner = _rewire(model)
    graph = model.graph
    if kind == "permuted":
        perm = np.array([(i + 1) % 10 for i in range(10)], dtype=np.int64)
        graph.initializer.append(_const("perm", perm))
        graph.node.append(helper.make_node("Gather", [inner, "perm"], [OUTPUT], axis=1))
    elif kind == "raises":
        graph.initializer.extend(
            [
                _const("zero_f", np.array(0.0, dtype=np.float32)),
                _const("ten", np.array([10], dtype=np.int64)),
                _const("minus_one", np.array([-1], dtype=np.int64)),
                _const("axis0", np.array([0], dtype=np.int64)),
            ]
        )
        graph.node.extend(
            [
                helper.make_node("ReduceMax", ["pixels"], ["pmax"], keepdims=0),
                helper.make_node("Greater", ["pmax", "zero_f"], ["nonzero"]),
                helper.make_node("Cast", ["nonzero"], ["flag"], to=onnx.TensorProto.INT64),
                helper.make_node("Unsqueeze", ["flag", "axis0"], ["flag1"]),
                helper.make_node("Add", ["ten", "flag1"], ["width"]),
                helper.make_node("Concat", ["minus_one", "width"], ["shape"], axis=0),
                helper.make_node("Reshape", [inner, "shape"], [OUTPUT]),
            ]
        )
    elif kind == "slow":
        rng = np.random.default_rng(0)
        graph.initializer.extend(
            [
                _const("w1", rng.normal(size=(64, slow_width)).astype(np.float32) / 64),
                _const("w2", rng.normal(size=(slow_width, slow_width)).astype(np.float32) / slow_width),
                _const("zero_s", np.array(0.0, dtype=np.float32)),
            ]
        )
        graph.node.extend(
            [
                helper.make_node("MatMul", ["pixels", "w1"], ["h1"]),
                helper.make_node("MatMul", ["h1", "w2"], ["h2"]),
                helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
                helper.make_node("ReduceSum", ["h3"], ["busy"], keepdims=0),
                helper.make_node("Mul", ["busy", "zero_s"], ["nothing"]),
                helper.make_node("Add", [inner, "nothing"], [OUTPUT]),
            ]
        )
    else:
        raise ValueError(f"unknown variant {kind!r}")
    onnx.checker.check_model(model)
    return model


def publish_variant(repo: Path, kind: str, version: int, *, source: int = 1, model: str = "digits") -> Path:
    """Publishes ``<repo>/<model>/<version>`` as a variant of version ``source``."""
    staging = repo / ".staging" / f"{model}-{version}-{kind}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(repo / model / str(source), staging)
    onnx.save(variant_model(staging / "model.onnx", kind), str(staging / "model.onnx"))
    if kind == "raises":
        # A version whose shipped warm-up samples fail never loads (as in TF Serving): this
        # variant must load and then fail under live traffic, so it ships none.
        (staging / "warmup.json").unlink(missing_ok=True)
    target = repo / model / str(version)
    os.rename(staging, target)
    return target

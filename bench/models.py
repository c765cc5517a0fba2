"""The models the suite serves, generated on first use and cached in ``bench/.cache``.

- ``digits``: the built-in task, trained for a few epochs and exported with
  ``modelloop train`` / ``modelloop export`` (the project's own path, parity-checked).
- ``heavy``: a Keras dense net 784 -> 1024 -> 1024 -> 1024 -> 10 with random weights
  (speed does not depend on training), exported with the project's SavedModel and ONNX
  exporters. It is published twice in its own repository: ``heavy`` with dynamic
  batching and ``heavy_unbatched`` with batching off.

Run ``python -m bench.models heavy DIR`` to write just the heavy version directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"
DIGITS_EPOCHS = 5
HEAVY_LAYERS = (1024, 1024, 1024)
HEAVY_FEATURES = 784
# Written out rather than left to the server's defaults, so the table states what it measured.
HEAVY_BATCHING = {"enabled": True, "max_batch_size": 32, "batch_timeout_micros": 1000, "num_batch_threads": 1}


@dataclass(frozen=True)
class Assets:
    """Paths of everything the suite serves."""

    digits_run: Path
    digits_repo: Path
    heavy_repo: Path

    @property
    def digits_onnx(self) -> Path:
        """The digits ONNX file."""
        return self.digits_repo / "digits" / "1" / "model.onnx"

    @property
    def digits_keras(self) -> Path:
        """The digits Keras file (for the tutorial baseline)."""
        return self.digits_run / "model.keras"

    @property
    def heavy_onnx(self) -> Path:
        """The heavy model's ONNX file."""
        return self.heavy_repo / "heavy" / "1" / "model.onnx"


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "CUDA_VISIBLE_DEVICES": os.environ.get("BENCH_TF_GPU", ""),
    }


def _run(args: list[str], what: str) -> None:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_env())
    if proc.returncode != 0:
        raise RuntimeError(
            f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )


def ensure_digits(cache: Path = CACHE) -> tuple[Path, Path]:
    """Trains and exports digits unless the cache has it; returns (run dir, repo)."""
    run, repo = cache / "digits-run", cache / "digits-repo"
    if (repo / "digits" / "1" / "model.onnx").is_file() and (run / "model.keras").is_file():
        return run, repo
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(repo, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    _run(
        ["-m", "modelloop", "train", "digits", "--out", str(run), "--epochs", str(DIGITS_EPOCHS)],
        "train digits",
    )
    _run(["-m", "modelloop", "export", str(run), "--repo", str(repo)], "export digits")
    return run, repo


def ensure_heavy(cache: Path = CACHE) -> Path:
    """Builds the heavy model's repository unless the cache has it; returns the repo."""
    repo = cache / "heavy-repo"
    if (repo / "heavy" / "1" / "model.onnx").is_file() and (
        repo / "heavy_unbatched" / "1" / "model.onnx"
    ).is_file():
        return repo
    shutil.rmtree(repo, ignore_errors=True)
    staged = cache / "heavy-staging"
    shutil.rmtree(staged, ignore_errors=True)
    _run(["-m", "bench.models", "heavy", str(staged / "1")], "export heavy model")
    for name, batching in (("heavy", HEAVY_BATCHING), ("heavy_unbatched", {"enabled": False})):
        model_dir = repo / name
        shutil.copytree(staged, model_dir)
        meta_path = model_dir / "1" / "model.json"
        meta = json.loads(meta_path.read_text())
        meta["name"] = name
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        (model_dir / "config.json").write_text(json.dumps({"batching": batching}, indent=2) + "\n")
    shutil.rmtree(staged, ignore_errors=True)
    return repo


def ensure_assets(cache: Path = CACHE) -> Assets:
    """Everything the suite serves, generated when missing."""
    run, digits_repo = ensure_digits(cache)
    return Assets(digits_run=run, digits_repo=digits_repo, heavy_repo=ensure_heavy(cache))


def write_heavy_version(version_dir: Path) -> None:
    """Builds the heavy Keras model and writes ``saved_model/``, ``model.onnx`` and ``model.json``.

    Uses the project's exporters (the same SavedModel signature and tf2onnx conversion as
    ``modelloop export``), then checks ONNX against Keras on a few rows.
    """
    import keras
    import numpy as np
    import onnxruntime as ort

    from modelloop.export.onnx import MIN_OPSET, export_onnx
    from modelloop.export.saved_model import export_saved_model

    keras.utils.set_random_seed(0)
    layers = [keras.Input((HEAVY_FEATURES,), name="pixels")]
    layers += [keras.layers.Dense(width, activation="relu") for width in HEAVY_LAYERS]
    layers.append(keras.layers.Dense(10, activation="softmax"))
    model = keras.Sequential(layers)
    version_dir.mkdir(parents=True, exist_ok=True)
    export_saved_model(
        model,
        version_dir / "saved_model",
        input_name="pixels",
        output_name="probabilities",
        n_features=HEAVY_FEATURES,
    )
    export_onnx(version_dir / "saved_model", version_dir / "model.onnx")
    rows = np.random.default_rng(0).random((8, HEAVY_FEATURES), dtype=np.float32)
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"pixels": rows})[0]
    diff = float(np.max(np.abs(got - model.predict(rows, verbose=0))))
    if diff > 1e-4:
        raise RuntimeError(f"heavy model: ONNX differs from Keras by {diff}")
    meta = {
        "name": "heavy",
        "version": 1,
        "task": "multiclass",
        "signature_name": "serving_default",
        "inputs": [{"name": "pixels", "dtype": "float32", "shape": [-1, HEAVY_FEATURES]}],
        "outputs": [{"name": "probabilities", "dtype": "float32", "shape": [-1, 10]}],
        "labels": [str(i) for i in range(10)],
        "onnx_opset": MIN_OPSET,
        "parity": {"keras_vs_onnx": diff},
        "benchmark": "random weights; speed only",
    }
    (version_dir / "model.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "heavy":
        sys.exit("usage: python -m bench.models heavy VERSION_DIR")
    write_heavy_version(Path(sys.argv[2]))

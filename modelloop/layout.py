"""The model repository and the run directory as files: every name spelled once.

The model repository follows TF Serving's layout::

    <repo>/<model>/config.json            optional per-model settings (serving, drift, retrain)
    <repo>/<model>/<version>/model.json   the model card: inputs, outputs, labels, task, ...
    <repo>/<model>/<version>/model.onnx   ONNX (served by ONNX Runtime when present)
    <repo>/<model>/<version>/saved_model/ TF SavedModel
    <repo>/<model>/<version>/model.py     Python model code (served by the Python runtime when present)
    <repo>/<model>/<version>/baseline.json the drift reference
    <repo>/.staging/                      versions being built (hidden)
    <repo>/.modelloop-repository-id       the repository's identity (hidden; see repository_id)
    <repo>/<model>/.publish.lock          serialises publishers of one model
    <repo>/<model>/<version>/.publish.claim in object storage: a publisher's claim on the number

A version directory is a plain decimal integer from 1 up, without leading zeros
(:func:`is_version_name`); every other entry is ignored, names starting with ``.``
included. A training run directory holds :data:`RUN_FILES` and the history files.

This module imports nothing of the project but :mod:`modelloop.errors`, so every package
may use it. ``model.json`` is read through one typed loader, :func:`read_model_card`.

Example:

```python
for version, path in list_versions(repo / "digits").items():
    card = read_model_card(path)
    print(version, card.task, [t.name for t in card.inputs])
```
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelloop.errors import ModelloopError

# -- the model repository ----------------------------------------------------------------
CONFIG_FILE = "config.json"
MODEL_CARD_FILE = "model.json"
ONNX_FILE = "model.onnx"
SAVED_MODEL_DIR = "saved_model"
BASELINE_FILE = "baseline.json"
PYTHON_MODEL_FILE = "model.py"
"""A version's own Python code: a class ``Model`` with ``load`` and ``predict``. It runs in
the server, so the repository must be trusted as the server's own code is."""
PYTHON_SETTINGS_FILE = "model_settings.json"
"""What the exporter tells a built-in spec's ``model.py`` (its ONNX file, labels, featurizer)."""
WARMUP_JSON_FILE = "warmup.json"
"""A version's warm-up samples: a JSON array of OIP infer requests (the export writes it)."""
TF_SERVING_WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
"""TF Serving's warm-up samples: a TFRecord of ``PredictionLog`` records."""
STAGING_DIR = ".staging"
PUBLISH_LOCK_FILE = ".publish.lock"
VERSION_CLAIM_FILE = ".publish.claim"
"""In object storage: created (create-only) in ``<model>/<version>/`` to claim the number."""
REPOSITORY_ID_FILE = ".modelloop-repository-id"
"""A random id written once into a local repository: the monitoring store records it, so a
store never describes one repository's versions while serving another's."""
VERSION_FILES = {"onnx": ONNX_FILE, "saved_model": SAVED_MODEL_DIR, "baseline": BASELINE_FILE}
"""The ``"files"`` entry of ``model.json``: what a version directory holds, by role."""
PYTHON_VERSION_FILES = {
    "python": PYTHON_MODEL_FILE,
    "settings": PYTHON_SETTINGS_FILE,
    "onnx": ONNX_FILE,
    "baseline": BASELINE_FILE,
}
"""The ``"files"`` entry of a version served by the Python runtime (``model.py`` calls ``model.onnx``)."""

# -- a training run directory ------------------------------------------------------------
RUN_MODEL_FILE = "model.keras"
RUN_INFO_FILE = "run.json"
RUN_METRICS_FILE = "metrics.json"
RUN_SPLIT_FILE = "split.npz"
RUN_HISTORY_CSV = "history.csv"
RUN_HISTORY_PLOT = "history.png"
RUN_ROBUSTNESS_PLOT = "robustness.png"
RUN_TUNING_DIR = "tuning"
RUN_TENSORBOARD_DIR = "tensorboard"
RUN_GATE_FILE = "gate.json"
"""The retrain gate's report, written into the candidate's run directory."""
RUN_FILES = (RUN_MODEL_FILE, RUN_INFO_FILE, RUN_METRICS_FILE, BASELINE_FILE, RUN_SPLIT_FILE)
"""What a run must hold to be exported; the run's baseline is copied into the version."""

# Keys of model.json that ModelCard holds in its own fields; the rest go to ``extra``.
_CARD_FIELDS = ("name", "version", "inputs", "outputs", "signature_name", "labels", "task")


class LayoutError(ModelloopError):
    """A file of the repository or of a run is missing or malformed; the message names it."""


def is_version_name(name: str) -> bool:
    """Whether a directory name is a version: ASCII decimal digits from 1 up, no leading zero.

    ``"²"`` passes ``str.isdigit`` but is no version, and ``"01"`` would claim version 1
    beside ``"1"`` (Triton ignores both too); ``"0"`` is no version since TF Serving's
    versions start at 1.

    Example:

    >>> [is_version_name(n) for n in ("3", "03", "0", "²", ".staging")]
    [True, False, False, False, False]
    """
    return name.isascii() and name.isdigit() and not name.startswith("0")


def list_versions(model_dir: Path) -> dict[int, Path]:
    """The version directories of one model by version, ascending; empty if there is none.

    Args:
        model_dir: ``<repo>/<model>``; it may not exist.

    Returns:
        Version -> directory.
    """
    try:
        entries = list(os.scandir(model_dir))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    found = {int(e.name): Path(e.path) for e in entries if is_version_name(e.name) and e.is_dir()}
    return dict(sorted(found.items()))


def model_names(repo: Path) -> list[str]:
    """Model directories of a repository, sorted; hidden names are skipped."""
    try:
        entries = list(os.scandir(repo))
    except FileNotFoundError:
        return []
    return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


def repository_id(repo: Path, *, create: bool = True) -> str | None:
    """The identity of a local repository: the id in :data:`REPOSITORY_ID_FILE`.

    The first caller that finds no id writes a random one, create-only (a temporary file
    hard-linked into place), so processes starting together on one repository agree.

    Args:
        repo: The repository directory.
        create: Whether to write an id when there is none. Defaults to True.

    Returns:
        The id, or None when there is none and it cannot be written (a read-only
        repository), or ``create`` is False.
    """
    path = repo / REPOSITORY_ID_FILE
    for _ in range(2):
        try:
            text = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            text = ""
        except OSError:
            return None
        if text:
            return text
        if not create:
            return None
        temporary = repo / f"{REPOSITORY_ID_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            temporary.write_text(secrets.token_hex(16) + "\n", encoding="utf-8")
            try:
                os.link(temporary, path)
            except FileExistsError:
                pass  # another process wrote it first: read theirs
            finally:
                temporary.unlink(missing_ok=True)
        except OSError:
            return None
    return None


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One input or output as ``model.json`` declares it.

    Attributes:
        name: Tensor name.
        dtype: NumPy dtype name (``float32``), known to NumPy.
        shape: Dimensions; -1 is the batch or a free dimension.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelCard:
    """The content of one version's ``model.json``.

    Attributes:
        inputs: Input tensors; never empty.
        outputs: Output tensors; never empty.
        task: ``multiclass``, ``binary``, ``regression`` or ``""`` when not given.
        signature_name: The served signature. Defaults to ``serving_default``.
        labels: Class labels in output order; empty for regression.
        name: The name the exporter wrote (the directory, not this, names the model).
        version: The version the exporter wrote (likewise informational).
        extra: Every other key (metrics, training run, parity, ...).
    """

    inputs: tuple[TensorEntry, ...]
    outputs: tuple[TensorEntry, ...]
    task: str = ""
    signature_name: str = "serving_default"
    labels: tuple[str, ...] = ()
    name: str = ""
    version: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _tensor_entries(raw: Any, path: Path, key: str) -> tuple[TensorEntry, ...]:
    if not isinstance(raw, list) or not raw:
        raise LayoutError(f"{path}: {key!r} must be a non-empty list of tensors")
    entries = []
    for i, item in enumerate(raw):
        try:
            name, dtype = item["name"], item["dtype"]
            shape = tuple(int(d) for d in item["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise LayoutError(
                f"{path}: {key}[{i}] needs 'name', a NumPy 'dtype' and an integer 'shape' ({exc})"
            ) from exc
        if not isinstance(name, str) or not name:
            raise LayoutError(f"{path}: {key}[{i}] has no name")
        try:
            np.dtype(dtype)
        except TypeError as exc:
            raise LayoutError(f"{path}: {key}[{i}] {name!r} has an unknown dtype ({exc})") from exc
        if not shape or any(d < -1 or d == 0 for d in shape):
            raise LayoutError(f"{path}: {key}[{i}] {name!r} has shape {list(shape)}; use -1 for free dims")
        entries.append(TensorEntry(name=name, dtype=dtype, shape=shape))
    return tuple(entries)


def read_model_card(version_dir: Path) -> ModelCard:
    """Reads and checks the ``model.json`` of one version.

    Args:
        version_dir: ``<repo>/<model>/<version>``.

    Returns:
        The card.

    Raises:
        LayoutError: The file is missing, unreadable, not a JSON object, or lacks valid
            inputs and outputs; the message names the file and the problem.
    """
    path = version_dir / MODEL_CARD_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise LayoutError(f"{path} is missing") from None
    except (OSError, ValueError) as exc:
        raise LayoutError(f"{path} is unreadable or not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise LayoutError(f"{path} must hold a JSON object")
    version = raw.get("version")
    return ModelCard(
        inputs=_tensor_entries(raw.get("inputs"), path, "inputs"),
        outputs=_tensor_entries(raw.get("outputs"), path, "outputs"),
        task=str(raw.get("task") or ""),
        signature_name=str(raw.get("signature_name") or "serving_default"),
        labels=tuple(str(label) for label in raw.get("labels") or []),
        name=str(raw.get("name") or ""),
        version=version if isinstance(version, int) else None,
        extra={k: v for k, v in raw.items() if k not in _CARD_FIELDS},
    )


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """Reads ``<repo>/<model>/config.json`` as a plain JSON object; ``{}`` when there is none.

    The serving package validates the whole file; other packages read their own section
    (``"retrain"``, ``"feedback"``) through this.

    Raises:
        LayoutError: The file exists but is unreadable or not a JSON object.
    """
    path = model_dir / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise LayoutError(f"{path} is unreadable or not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise LayoutError(f"{path} must hold a JSON object")
    return raw


def write_model_card(version_dir: Path, content: dict[str, Any]) -> Path:
    """Writes ``model.json`` into a (staged) version directory.

    Args:
        version_dir: The directory.
        content: The card as a JSON object (see ``export/metadata.py``).

    Returns:
        The file written.
    """
    path = version_dir / MODEL_CARD_FILE
    path.write_text(json.dumps(content, indent=2) + "\n")
    return path

"""Task specifications: what to learn, from which data, with which model.

A spec bundles a data loader, the task type, a model builder and the names of the
served input and output. Built-in specs live in :mod:`modelloop.training.specs`; a
user's spec is a Python file that defines the same parts at module level.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from modelloop.errors import ModelloopError

if TYPE_CHECKING:
    import keras

TaskType = Literal["multiclass", "binary", "regression"]
TASK_TYPES: tuple[str, ...] = ("multiclass", "binary", "regression")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


class SpecError(ModelloopError):
    """A spec name or spec file that cannot be used."""


@dataclass(frozen=True)
class Dataset:
    """Features and targets of a task, before any split.

    Attributes:
        x: Raw features, float32 of shape ``[n, n_features]``.
        y: Targets: integer class ids for classification, float32 values for regression.
        feature_names: One name per feature column.
        class_labels: Class names in class-id order; empty for regression.
    """

    x: np.ndarray
    y: np.ndarray
    feature_names: list[str]
    class_labels: list[str] = field(default_factory=list)


ModelBuilder = Callable[["keras.layers.Layer", Mapping[str, Any]], "keras.Model"]

TUNABLE_HPARAMS: tuple[str, ...] = ("units", "layers", "dropout", "l2", "learning_rate")
"""The hyperparameters a spec's ``SEARCH_SPACE`` may name: width, depth, dropout, L2, learning rate."""


@dataclass(frozen=True)
class Choice:
    """A search dimension over listed values, e.g. ``Choice(64, 128, 256)`` for a width.

    Attributes:
        values: The candidates, all ints or all floats.
    """

    values: tuple[float, ...]

    def __init__(self, *values: float) -> None:
        object.__setattr__(self, "values", tuple(values))


@dataclass(frozen=True)
class IntRange:
    """A search dimension over the integers ``low..high`` (both included), e.g. a depth.

    Attributes:
        low: Smallest value.
        high: Largest value.
    """

    low: int
    high: int


@dataclass(frozen=True)
class FloatRange:
    """A search dimension over ``[low, high]``; ``log=True`` samples evenly in log space.

    Attributes:
        low: Smallest value.
        high: Largest value.
        log: Sample on a log scale (learning rates, L2 factors). Defaults to False.
    """

    low: float
    high: float
    log: bool = False


SearchDimension = Choice | IntRange | FloatRange


@dataclass(frozen=True)
class PythonModel:
    """A spec whose versions are served by their own ``model.py`` around the network.

    The network still trains on float features (the :class:`Dataset`); the ``model.py``
    it ships turns what clients send (strings, say) into those features, runs the exported
    ``model.onnx`` and shapes the answer. ``modelloop export`` copies ``model_file`` into the
    version as ``model.py``, writes ``settings`` (with the ONNX file, its input and output
    names and the class labels) beside it, declares ``inputs`` and ``outputs`` in
    ``model.json``, and checks that ``model.py`` on ``sample_inputs`` answers what the Keras
    model answers on their features.

    Attributes:
        model_file: The ``model.py`` to ship. It defines ``class Model`` with
            ``load(version_dir)`` and ``predict(inputs)``, and imports nothing of modelloop:
            it runs in the server from the repository.
        inputs: The served inputs as ``model.json`` entries (``object`` is BYTES).
        outputs: The served outputs; the first is the network's output, which monitoring reads.
        sample_inputs: ``() -> (inputs, features)``: raw inputs for the parity check and the
            feature rows the network sees for them.
        settings: Extra JSON settings for ``model.py`` (a featurizer's size, say). Defaults to
            empty.
    """

    model_file: Path
    inputs: tuple[dict[str, Any], ...]
    outputs: tuple[dict[str, Any], ...]
    sample_inputs: Callable[[], tuple[dict[str, np.ndarray], np.ndarray]]
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskSpec:
    """Everything a training job needs to know about one task.

    Attributes:
        name: Spec name, also the default model name in the repository.
        task: ``"multiclass"``, ``"binary"`` or ``"regression"``.
        load_data: Returns the whole :class:`Dataset`.
        build_model: ``build_model(normalizer, hparams)`` returns an uncompiled Keras
            model whose input is the raw features and whose first step is
            ``normalizer`` (a ``Normalization`` layer already adapted on the training
            rows), so that clients send raw values.
        input_name: Name of the served input tensor. Defaults to ``"features"``.
        output_name: Name of the served output tensor. Defaults to
            ``"probabilities"``.
        hparams: Hyperparameters (``epochs``, ``batch_size``, ``learning_rate``,
            ``dropout``, ``l2``, ``patience``, ``units``, ``layers``) merged over
            :data:`DEFAULT_HPARAMS`.
        source: Where the spec came from: a built-in name or a file path.
        pixel_range: ``(low, high)`` of every input when the features are image pixels
            with a known range (``(0, 16)`` for scikit-learn's digits); the model then
            scales by that range instead of by statistics of the training rows, and
            the robustness evaluation adds a stray pixel. Defaults to None (tabular).
        search_space: What ``--tune`` searches: a dimension per name of
            :data:`TUNABLE_HPARAMS`. Defaults to empty (the spec cannot be tuned).
        python_model: Set when the versions are served by a ``model.py`` around the
            network (see :class:`PythonModel`). Defaults to None (the network itself).
    """

    name: str
    task: TaskType
    load_data: Callable[[], Dataset]
    build_model: ModelBuilder
    input_name: str = "features"
    output_name: str = "probabilities"
    hparams: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    pixel_range: tuple[float, float] | None = None
    search_space: Mapping[str, SearchDimension] = field(default_factory=dict)
    python_model: PythonModel | None = None

    def hp(self, key: str) -> Any:
        """Returns one hyperparameter, falling back to :data:`DEFAULT_HPARAMS`."""
        return {**DEFAULT_HPARAMS, **self.hparams}[key]


DEFAULT_HPARAMS: dict[str, Any] = {
    "epochs": 60,
    "batch_size": 32,
    "learning_rate": 1e-3,
    "dropout": 0.2,
    "l2": 1e-4,
    "patience": 8,
    "units": 64,
    "layers": 1,
}
"""Hyperparameters every spec gets unless its ``HPARAMS`` says otherwise. ``units`` (width)
and ``layers`` (depth) are read by the builders that use them; the others by the trainer
or by every builder."""

BUILTIN_SPECS: dict[str, str] = {
    "digits": "modelloop.training.specs.digits",
    "digits-cnn": "modelloop.training.specs.digits_cnn",
    "breast-cancer": "modelloop.training.specs.breast_cancer",
    "diabetes": "modelloop.training.specs.diabetes",
    "text-topics": "modelloop.training.specs.text_topics",
}

_REQUIRED = ("TASK", "load_data", "build_model")


def load_spec(ref: str) -> TaskSpec:
    """Loads a built-in spec by name or a user's spec from a ``.py`` file.

    A spec file defines at module level ``TASK`` (``"multiclass"``, ``"binary"`` or
    ``"regression"``), ``load_data()`` returning a :class:`Dataset`, and
    ``build_model(normalizer, hparams)``. It may define ``NAME``, ``INPUT_NAME``,
    ``OUTPUT_NAME``, ``HPARAMS``, ``PIXEL_RANGE`` (image inputs of a known range) and
    ``SEARCH_SPACE`` (what ``--tune`` searches; see :class:`Choice`, :class:`IntRange`
    and :class:`FloatRange`) and ``PYTHON_MODEL`` (a :class:`PythonModel`: the versions are
    served by a ``model.py`` around the network).

    Args:
        ref: A built-in name (``digits``, ``digits-cnn``, ``breast-cancer``,
            ``diabetes``, ``text-topics``) or a path to a Python file.

    Returns:
        The validated spec.

    Raises:
        SpecError: The name is unknown, the file is missing, fails to import or lacks
            a required part.

    Example:
        >>> load_spec("digits").input_name
        'pixels'
    """
    if ref in BUILTIN_SPECS:
        module = importlib.import_module(BUILTIN_SPECS[ref])
        return _from_module(module, default_name=ref, source=ref)
    path = Path(ref)
    if path.suffix != ".py":
        known = ", ".join(sorted(BUILTIN_SPECS))
        raise SpecError(f"unknown spec {ref!r}: use one of {known} or a path to a .py file")
    if not path.is_file():
        raise SpecError(f"spec file {ref!r} does not exist")
    module = _import_file(path)
    return _from_module(module, default_name=path.stem.replace("_", "-"), source=str(path.resolve()))


def _import_file(path: Path) -> ModuleType:
    module_name = f"modelloop_user_spec_{abs(hash(str(path.resolve())))}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise SpecError(f"spec file {str(path)!r} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise SpecError(f"spec file {str(path)!r} failed to import: {type(exc).__name__}: {exc}") from exc
    return module


def _from_module(module: ModuleType, default_name: str, source: str) -> TaskSpec:
    missing = [part for part in _REQUIRED if not hasattr(module, part)]
    if missing:
        raise SpecError(f"spec {source!r} lacks required part(s): {', '.join(missing)}")
    task = module.TASK
    if task not in TASK_TYPES:
        raise SpecError(f"spec {source!r} has TASK={task!r}; expected one of {', '.join(TASK_TYPES)}")
    for part in ("load_data", "build_model"):
        if not callable(getattr(module, part)):
            raise SpecError(f"spec {source!r}: {part} must be callable")
    default_output = "prediction" if task == "regression" else "probabilities"
    input_name = getattr(module, "INPUT_NAME", "features")
    output_name = getattr(module, "OUTPUT_NAME", default_output)
    for label, value in (("INPUT_NAME", input_name), ("OUTPUT_NAME", output_name)):
        if not isinstance(value, str) or not _NAME.match(value):
            raise SpecError(f"spec {source!r}: {label}={value!r} is not a valid tensor name")
    hparams = getattr(module, "HPARAMS", {})
    if not isinstance(hparams, Mapping):
        raise SpecError(f"spec {source!r}: HPARAMS must be a mapping")
    unknown = set(hparams) - set(DEFAULT_HPARAMS)
    if unknown:
        raise SpecError(f"spec {source!r}: unknown HPARAMS key(s): {', '.join(sorted(unknown))}")
    return TaskSpec(
        name=getattr(module, "NAME", default_name),
        pixel_range=_pixel_range(module, source),
        search_space=_search_space(module, source),
        python_model=_python_model(module, source),
        task=task,
        load_data=module.load_data,
        build_model=module.build_model,
        input_name=input_name,
        output_name=output_name,
        hparams=dict(hparams),
        source=source,
    )


def _pixel_range(module: ModuleType, source: str) -> tuple[float, float] | None:
    value = getattr(module, "PIXEL_RANGE", None)
    if value is None:
        return None
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise SpecError(f"spec {source!r}: PIXEL_RANGE must be a pair (low, high), got {value!r}") from None
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise SpecError(f"spec {source!r}: PIXEL_RANGE must have low < high, got {value!r}")
    return (low, high)


def _python_model(module: ModuleType, source: str) -> PythonModel | None:
    value = getattr(module, "PYTHON_MODEL", None)
    if value is None:
        return None
    if not isinstance(value, PythonModel):
        raise SpecError(f"spec {source!r}: PYTHON_MODEL must be a PythonModel, got {type(value).__name__}")
    if not Path(value.model_file).is_file():
        raise SpecError(
            f"spec {source!r}: PYTHON_MODEL's model file {str(value.model_file)!r} does not exist"
        )
    if not value.inputs or not value.outputs:
        raise SpecError(f"spec {source!r}: PYTHON_MODEL must declare its inputs and outputs")
    return value


def _search_space(module: ModuleType, source: str) -> dict[str, SearchDimension]:
    space = getattr(module, "SEARCH_SPACE", {})
    if not isinstance(space, Mapping):
        raise SpecError(f"spec {source!r}: SEARCH_SPACE must be a mapping")
    unknown = set(space) - set(TUNABLE_HPARAMS)
    if unknown:
        raise SpecError(
            f"spec {source!r}: SEARCH_SPACE names {', '.join(sorted(unknown))}; "
            f"tunable are {', '.join(TUNABLE_HPARAMS)}"
        )
    for key, dim in space.items():
        if isinstance(dim, Choice):
            ok = len(dim.values) >= 1 and all(isinstance(v, int | float) for v in dim.values)
        elif isinstance(dim, IntRange | FloatRange):
            ok = dim.low < dim.high and (not isinstance(dim, FloatRange) or not dim.log or dim.low > 0)
        else:
            ok = False
        if not ok:
            raise SpecError(f"spec {source!r}: SEARCH_SPACE[{key!r}] = {dim!r} is not a valid dimension")
    return dict(space)


def check_dataset(data: Dataset, spec: TaskSpec) -> Dataset:
    """Validates what a spec's loader returned and normalises dtypes.

    Raises:
        SpecError: Shapes or types do not fit the task.
    """
    if not isinstance(data, Dataset):
        raise SpecError(f"spec {spec.source!r}: load_data() must return a Dataset, got {type(data).__name__}")
    x = np.asarray(data.x, dtype=np.float32)
    y = np.asarray(data.y)
    if x.ndim != 2 or x.shape[0] < 10:
        raise SpecError(
            f"spec {spec.source!r}: features must be a 2-D array with at least 10 rows, got {x.shape}"
        )
    if y.shape[:1] != x.shape[:1]:
        raise SpecError(f"spec {spec.source!r}: {x.shape[0]} feature rows but {y.shape[0]} targets")
    if len(data.feature_names) != x.shape[1]:
        raise SpecError(
            f"spec {spec.source!r}: {x.shape[1]} features but {len(data.feature_names)} feature names"
        )
    if not np.isfinite(x).all():
        raise SpecError(f"spec {spec.source!r}: features contain NaN or infinite values")
    if spec.task == "regression":
        y = y.astype(np.float32)
    else:
        y = y.astype(np.int64)
        n_classes = int(y.max()) + 1
        if spec.task == "binary" and (set(np.unique(y)) - {0, 1}):
            raise SpecError(f"spec {spec.source!r}: binary targets must be 0 or 1")
        labels = list(data.class_labels) or [str(i) for i in range(n_classes)]
        if len(labels) < n_classes:
            raise SpecError(f"spec {spec.source!r}: {n_classes} classes but {len(labels)} class labels")
        return Dataset(x, y, list(data.feature_names), [str(label) for label in labels])
    return Dataset(x, y, list(data.feature_names), [])

"""Python runtime: a version directory's own ``model.py``, with its pre- and post-processing.

A version directory that holds ``model.py`` is served by this runtime, even when it also
holds a ``model.onnx`` (which ``model.py`` may run itself). ``model.py`` defines a class
named ``Model``::

    class Model:
        def load(self, version_dir: pathlib.Path) -> None: ...
        def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

``load`` runs once, on the registry's loading thread; ``predict`` is synchronous and runs
on the batcher's threads (never on the event loop, however fast it is), on whole batches:
every input has the same first dimension, and every output must have it too. BYTES inputs
arrive as ``object`` arrays of ``bytes``; a BYTES output may hold ``bytes`` or ``str``.
``model.json`` beside it declares the inputs and outputs as for any other version.
``model.py`` is imported as a module of its own for each load (two versions, or a reload,
never share module state); the directory is not put on ``sys.path``, so ``model.py`` reads
its other files through ``version_dir`` rather than importing them.

The code runs inside the server process with the server's rights: the model repository
must be trusted like the server's own code. Nothing but the repository supplies it (the
repository API loads and unloads, it never takes files).

Failures are the model's, and they say so: an import error, a missing ``Model`` class or
an exception in ``load`` makes the version FAILED with the error and the line of
``model.py`` it came from (the previous version keeps serving); an exception in
``predict`` fails the batch's requests with INTERNAL (HTTP 500) carrying the error text.

Example:

```python
runtime = PythonRuntime(version_dir, metadata)
runtime.load()
runtime.predict({"text": np.array([b"how do I format a float?"], dtype=object)})["label"]
```
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import re
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from modelloop.layout import PYTHON_MODEL_FILE
from modelloop.serving.errors import ServingError
from modelloop.serving.runtime import Runtime
from modelloop.serving.types import ModelMetadata

logger = logging.getLogger(__name__)

PLATFORM = "python"
MODEL_CLASS = "Model"
# Each load gets a module name of its own, so two versions (or a reload of one) never share
# module state, and a module's dataclasses and pickles can find it in sys.modules.
_LOADS = itertools.count(1)
_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


class PythonModelError(ServingError):
    """``model.py`` cannot be imported, has no usable ``Model``, or its ``load`` raised."""


def _where(exc: BaseException, path: Path) -> str:
    """`` (model.py line N)`` for the deepest frame of ``path`` in the traceback, else ""."""
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if Path(frame.filename) == path:
            line = frame.lineno
    if line is None and isinstance(exc, SyntaxError) and exc.filename and Path(exc.filename) == path:
        line = exc.lineno
    return f" ({path.name} line {line})" if line is not None else ""


class PythonRuntime(Runtime):
    """Runs the ``Model`` class of a version's ``model.py``.

    Args:
        version_dir: ``<repo>/<name>/<version>``; ``model.py`` is read from it and
            ``Model.load`` receives it.
        metadata: The version's metadata, from its ``model.json``.
    """

    may_run_inline = False

    def __init__(self, version_dir: Path, metadata: ModelMetadata) -> None:
        super().__init__(metadata)
        self.version_dir = Path(version_dir)
        self.path = self.version_dir / PYTHON_MODEL_FILE
        self._model: Any = None
        self._module_name = ""

    def load(self) -> None:
        """Imports ``model.py``, makes a ``Model`` and calls its ``load``.

        Raises:
            FileNotFoundError: ``model.py`` is missing.
            PythonModelError: The import, ``Model()`` or ``Model.load`` raised, or the
                module has no ``Model`` class with ``load`` and ``predict``; the message
                names the error and the line of ``model.py``.
        """
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist")
        name, version = self.metadata.name, self.metadata.version
        module_name = f"modelloop_model_{_UNSAFE.sub('_', name)}_{version}_{next(_LOADS)}"
        module = self._import(module_name)
        try:
            cls = getattr(module, MODEL_CLASS, None)
            if not isinstance(cls, type):
                raise PythonModelError(f"{self.path} defines no class {MODEL_CLASS!r}")
            missing = [m for m in ("load", "predict") if not callable(getattr(cls, m, None))]
            if missing:
                raise PythonModelError(f"{self.path}: class {MODEL_CLASS} has no method {', '.join(missing)}")
            try:
                model = cls()
                model.load(self.version_dir)
            except (Exception, SystemExit) as exc:  # a model's sys.exit() must not stop the server
                where = _where(exc, self.path)
                raise PythonModelError(
                    f"{self.path}: {MODEL_CLASS}.load failed: {type(exc).__name__}: {exc}{where}"
                ) from exc
        except BaseException:
            sys.modules.pop(module_name, None)
            raise
        self._model, self._module_name = model, module_name
        self.parameters = {"model_file": str(self.path), "module": module_name}
        logger.info("model %s version %s: Python model loaded from %s", name, version, self.path)

    def _import(self, module_name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(module_name, self.path)
        if spec is None or spec.loader is None:
            raise PythonModelError(f"{self.path} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException as exc:
            sys.modules.pop(module_name, None)
            if not isinstance(exc, Exception | SystemExit):
                raise  # KeyboardInterrupt: the operator's, not the model's
            raise PythonModelError(
                f"{self.path} failed to import: {type(exc).__name__}: {exc}{_where(exc, self.path)}"
            ) from exc
        return module

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Calls ``Model.predict`` and checks its outputs against ``model.json``.

        Outputs are returned in the metadata's order, cast to the declared dtypes where that
        loses nothing (``float64`` to ``float32``, ``str`` to BYTES); an exception from the
        model goes up unchanged, for the batcher to report.

        Raises:
            TypeError: The model returned something other than a mapping of arrays, or an
                output whose kind does not fit its declared dtype.
            ValueError: A declared output is missing.
        """
        model = self._model
        if model is None:
            raise RuntimeError(f"model {self.metadata.name} version {self.metadata.version} is not loaded")
        try:
            outputs = model.predict(dict(inputs))
        except SystemExit as exc:  # would end the server's thread or loop, not just this batch
            raise RuntimeError(f"{MODEL_CLASS}.predict called sys.exit({exc.code!r})") from exc
        if not isinstance(outputs, Mapping):
            raise TypeError(
                f"{MODEL_CLASS}.predict returned {type(outputs).__name__}; it must return a dict of arrays "
                "keyed by the output names of model.json"
            )
        result: dict[str, np.ndarray] = {}
        for spec in self.metadata.outputs:
            if spec.name not in outputs:
                raise ValueError(
                    f"{MODEL_CLASS}.predict returned outputs {sorted(map(str, outputs))}; model.json "
                    f"declares {spec.name!r}"
                )
            result[spec.name] = _as_declared(outputs[spec.name], spec.dtype, spec.name)
        return result

    def unload(self) -> None:
        """Drops the model and its module; an ``unload`` method of the model is called first."""
        model, self._model = self._model, None
        hook = getattr(model, "unload", None)
        try:
            if callable(hook):
                hook()
        finally:
            if self._module_name:
                sys.modules.pop(self._module_name, None)


def _as_declared(value: Any, dtype: np.dtype, name: str) -> np.ndarray:
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    if array.dtype == dtype:
        return array
    if dtype.kind == "O":
        if array.dtype.kind in "OSU":
            return array.astype(object)
    elif array.dtype.kind in "biuf" and (array.dtype.kind == "b") == (dtype.kind == "b"):
        return array.astype(dtype)
    raise TypeError(
        f"{MODEL_CLASS}.predict returned output {name!r} with dtype {array.dtype.name}; "
        f"model.json declares {dtype.name}"
    )

"""The model repository on disk: TF Serving's "Source" of servable versions.

Layout: ``<repo>/<name>/<int version>/`` with an optional ``<repo>/<name>/config.json``.
Names starting with ``.`` (``.staging``, ``.publish.lock``) are ignored, and so are
version directories that are not plain decimal integers or that have leading zeros
(Triton ignores those too), so ``01`` and ``1`` never both claim version 1.

The repository only reads: it says what exists, what each model's config wants loaded,
and what a version's ``model.json`` describes. The registry decides when to load.

Example:

```python
repository = ModelRepository(Path("models"))
for name in repository.model_names():
    config = repository.read_config(name)
    print(name, config.version_policy.select(repository.versions(name)))
```
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import ValidationError

from modelloop import layout
from modelloop.errors import ErrorCode
from modelloop.serving.errors import InvalidInput, ServingError
from modelloop.serving.runtimes.onnx import PLATFORM as ONNX_PLATFORM
from modelloop.serving.runtimes.python import PLATFORM as PYTHON_PLATFORM
from modelloop.serving.runtimes.savedmodel import PLATFORM as SAVEDMODEL_PLATFORM
from modelloop.serving.settings import ModelConfig
from modelloop.serving.types import ModelMetadata, TensorSpec

RuntimeKind = Literal["onnx", "savedmodel", "python"]
PLATFORMS: dict[str, str] = {
    "onnx": ONNX_PLATFORM,
    "savedmodel": SAVEDMODEL_PLATFORM,
    "python": PYTHON_PLATFORM,
}


class RepositoryError(ServingError):
    """A file in the repository is missing or malformed; the message names the file."""


class RepositoryUnavailable(ServingError):
    """A remote repository cannot be read now (network, credentials, bucket); says why."""

    code = ErrorCode.UNAVAILABLE


def refuse_load_parameters(names: Iterable[str]) -> None:
    """Refuses parameters on the repository API's load: it never takes files or config.

    Triton's load accepts ``file:<path>`` parameters (model files, code included, uploaded
    in the request) and a ``config`` override. Here models and their code come only from
    the repository directory, which is trusted (a ``model.py`` runs in the server), so such
    a request is an error rather than a load that silently ignores what was sent.

    Args:
        names: The parameter names of the load request.

    Raises:
        InvalidInput: Any parameter was given; the message names them.
    """
    given = sorted(names)
    if given:
        uploads = " (model files cannot be uploaded)" if any(n.startswith("file:") for n in given) else ""
        raise InvalidInput(
            f"repository load takes no parameters, got {', '.join(given)}{uploads}: models and their "
            "code are read only from the repository directory; publish a version there and load it"
        )


def _tensor_specs(entries: tuple[layout.TensorEntry, ...]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(name=e.name, dtype=np.dtype(e.dtype), shape=e.shape) for e in entries)


class ModelRepository:
    """Reads a TF Serving style model repository.

    Args:
        root: The repository directory. It may not exist yet (it then holds no models).
    """

    remote: str | None = None
    """The URL of the remote repository this directory mirrors; None for a local one."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def sync(self) -> None:
        """Fetches what changed in a remote repository; a local one has nothing to fetch.

        Raises:
            RepositoryUnavailable: A remote repository cannot be read now.
        """

    def model_names(self) -> list[str]:
        """Model directories, sorted; hidden names are skipped."""
        return layout.model_names(self.root)

    def versions(self, name: str) -> dict[int, Path]:
        """Version directories of ``name`` by version, ascending; empty if the model is gone."""
        return layout.list_versions(self.root / name)

    def read_config(self, name: str) -> ModelConfig:
        """The model's ``config.json``, or the defaults when there is none.

        Raises:
            RepositoryError: The file is unreadable, not JSON, or has bad or unknown keys.
        """
        path = self.root / name / layout.CONFIG_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            return ModelConfig()
        except OSError as exc:
            raise RepositoryError(f"{path}: cannot read: {exc.strerror}") from exc
        try:
            return ModelConfig.model_validate_json(text)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(file)'}: {err['msg']}" for err in exc.errors()
            )
            raise RepositoryError(f"{path}: invalid model config: {problems}") from exc

    def wanted_versions(self, name: str, config: ModelConfig) -> list[int]:
        """The versions on disk that ``config``'s version policy wants loaded, ascending."""
        return config.version_policy.select(self.versions(name))

    @staticmethod
    def runtime_kind(version_dir: Path, config: ModelConfig) -> RuntimeKind:
        """The runtime a version uses: the config's choice, else Python when ``model.py``
        exists (whatever else the directory holds: ``model.py`` may run a ``model.onnx``),
        else ONNX when ``model.onnx`` exists, else SavedModel."""
        if config.runtime is not None:
            return config.runtime
        if (version_dir / layout.PYTHON_MODEL_FILE).is_file():
            return "python"
        return "onnx" if (version_dir / layout.ONNX_FILE).is_file() else "savedmodel"

    @staticmethod
    def read_metadata(version_dir: Path, name: str, version: int, platform: str) -> ModelMetadata:
        """Reads ``model.json`` of one version.

        The directory, not the file, decides the name and version, so a copied version
        directory serves under its new number.

        Args:
            version_dir: ``<repo>/<name>/<version>``.
            name: The model name.
            version: The version number.
            platform: The runtime platform to report.

        Raises:
            RepositoryError: The file is missing, not JSON, or lacks valid inputs/outputs.
        """
        try:
            card = layout.read_model_card(version_dir)
        except layout.LayoutError as exc:
            raise RepositoryError(str(exc)) from exc
        return ModelMetadata(
            name=name,
            version=version,
            platform=platform,
            inputs=_tensor_specs(card.inputs),
            outputs=_tensor_specs(card.outputs),
            signature_name=card.signature_name,
            labels=card.labels,
            task=card.task,
            extra=card.extra,
        )

    @staticmethod
    def fingerprint(version_dir: Path) -> tuple[float, ...]:
        """Modification times of a version directory and its entries, two levels deep.

        A FAILED version is retried only when this changes, so a broken model is not
        reloaded on every poll, but fixing a file in place is noticed.
        """
        stamps: list[float] = []
        try:
            stamps.append(version_dir.stat().st_mtime)
            for entry in sorted(os.scandir(version_dir), key=lambda e: e.name):
                stamps.append(entry.stat().st_mtime)
                if entry.is_dir():
                    stamps.extend(
                        sub.stat().st_mtime for sub in sorted(os.scandir(entry.path), key=lambda e: e.name)
                    )
        except OSError:
            pass
        return tuple(stamps)

"""Export a run into a model repository in object storage (``s3://bucket/prefix``).

The version is built and checked on local disk exactly as for a local repository
(:func:`~modelloop.export.exporter.stage_export`), then published through
:meth:`modelloop.storage.ObjectRepository.publish`: the number is claimed with a
create-only write, the files go up under the repository's staging prefix and are copied
into the version's prefix, and ``model.json``, the commit marker, is written last.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from modelloop.export.exporter import read_run, stage_export
from modelloop.export.metadata import build_metadata
from modelloop.export.onnx import MIN_OPSET
from modelloop.export.publish import validate_model_name
from modelloop.export.verify import DEFAULT_ATOL, DEFAULT_RTOL, ParityReport
from modelloop.layout import write_model_card
from modelloop.storage import ObjectRepository, RepositoryLocation


def export_run_remote(
    run_dir: Path,
    location: RepositoryLocation,
    *,
    name: str | None = None,
    opset: int = MIN_OPSET,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> tuple[str, ParityReport]:
    """Exports a run, checks parity, and publishes it as the next version in object storage.

    Args:
        run_dir: A run directory written by ``modelloop train``.
        location: The remote repository.
        name: Model name in the repository. Defaults to the spec's name.
        opset: ONNX opset. Defaults to 17.
        atol: Absolute parity tolerance.
        rtol: Relative parity tolerance.

    Returns:
        The published version's URL and the parity report.

    Raises:
        ExportError: Bad run directory, unloadable model or failed parity check.
        PublishError: Bad name.
        StorageError: The store cannot be reached or refused the upload.
    """
    run_info, _ = read_run(run_dir)
    name = validate_model_name(run_info["spec"]["name"] if name is None else name)
    store = ObjectRepository(location)
    with tempfile.TemporaryDirectory(prefix="modelloop-export-") as tmp:
        version_dir = Path(tmp) / "version"
        version_dir.mkdir()
        staged = stage_export(run_dir, version_dir, name=name, opset=opset, atol=atol, rtol=rtol)

        def finalize(path: Path, version: int) -> None:
            write_model_card(
                path,
                build_metadata(
                    name=staged.name,
                    version=version,
                    run_info=staged.run_info,
                    metrics=staged.metrics,
                    parity=staged.parity.to_dict(),
                    opset=staged.opset,
                ),
            )

        url, _version = store.publish(staged.path, name, finalize)
    return url, staged.parity

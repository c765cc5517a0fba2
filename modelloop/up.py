"""``modelloop up``: the main job on embedded defaults."""

from __future__ import annotations

import tempfile
from pathlib import Path

from modelloop.export.publish import list_versions

DEFAULT_SPEC = "digits"


def repo_has_models(repo: Path) -> bool:
    """Whether any model under ``repo`` has at least one integer version."""
    if not repo.is_dir():
        return False
    return any(
        list_versions(child) for child in repo.iterdir() if child.is_dir() and not child.name.startswith(".")
    )


def ensure_default_model(repo: Path, *, epochs: int | None = None, seed: int = 42) -> Path | None:
    """Trains and exports ``digits`` into ``repo`` if the repository holds no model.

    Returns:
        The published version directory, or None when the repo already had models.
    """
    if repo_has_models(repo):
        return None
    from modelloop.export.exporter import export_run
    from modelloop.training.spec import load_spec
    from modelloop.training.train import train

    spec = load_spec(DEFAULT_SPEC)
    with tempfile.TemporaryDirectory(prefix="modelloop-run-") as tmp:
        run = train(spec, Path(tmp) / "run", epochs=epochs, seed=seed)
        metric = run.metrics["main_metric"]
        print(f"trained {spec.name}: test {metric} {run.metrics['test'][metric]:.4f}")
        return export_run(run.run_dir, repo).version_dir

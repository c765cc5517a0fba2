"""A remote model repository (``s3://``) served from a local copy.

The registry loads versions from a directory. For a repository in object storage that
directory is a local cache, and :meth:`MirroredRepository.sync` (run by the registry
before every poll, off the event loop) brings it up to date with one listing of the
prefix:

- each model's ``config.json`` is fetched when its ETag changes, and removed when the
  store drops it;
- the committed versions (those whose ``model.json`` exists) that the model's version
  policy wants are downloaded, each into a hidden temporary directory renamed into
  place, so the registry never sees a half-copied version;
- versions and models gone from the store leave the cache (the registry then unloads
  them, as for a local repository). A version the policy no longer wants stays cached
  until it leaves the store, so the registry still decides when to unload it.

When the store cannot be listed, nothing in the cache changes and
:class:`RepositoryUnavailable` says why: the registry keeps serving what it loaded.

Example:

```python
repository = MirroredRepository(parse_repository("s3://models/prod"), Path("/var/cache/repo"))
repository.sync()  # raises RepositoryUnavailable when the store cannot be listed
repository.model_names()  # read from the cache, like a local repository
```
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from modelloop import layout
from modelloop.serving.repository import ModelRepository, RepositoryUnavailable
from modelloop.serving.settings import ModelConfig
from modelloop.storage import ObjectRepository, RepositoryLocation, StorageError, StoredFile

logger = logging.getLogger(__name__)


class MirroredRepository(ModelRepository):
    """A repository in object storage, read through a local cache directory.

    Args:
        location: The remote repository (``s3://bucket/prefix``).
        cache: The local directory the versions are copied into (created if missing).
        filesystem: An fsspec file system; defaults to the one the URL's scheme opens.
    """

    def __init__(self, location: RepositoryLocation, cache: Path, filesystem: Any = None) -> None:
        super().__init__(cache)
        self.remote = location.url
        self.store = ObjectRepository(location, filesystem)
        self._config_tags: dict[str, str] = {}

    def sync(self) -> None:
        """Brings the cache up to date with the store (see the module docstring).

        Raises:
            RepositoryUnavailable: The store cannot be listed, or a download failed; the
                cache keeps what it had (a failed download leaves nothing behind).
        """
        try:
            listing = self.store.listing()
        except StorageError as exc:
            raise RepositoryUnavailable(str(exc)) from exc
        failures = []
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for name in layout.model_names(self.root):
                if name not in listing:
                    logger.info("model %s left %s; removing its cached copy", name, self.remote)
                    shutil.rmtree(self.root / name, ignore_errors=True)
                    self._config_tags.pop(name, None)
            for name, model in listing.items():
                try:
                    self._sync_model(name, model.config, model.committed())
                except StorageError as exc:
                    failures.append(str(exc))
        except OSError as exc:
            raise RepositoryUnavailable(
                f"{self.remote}: cannot update the local copy in {self.root}: {exc}"
            ) from exc
        if failures:
            raise RepositoryUnavailable("; ".join(failures))

    def _sync_model(
        self, name: str, config: StoredFile | None, committed: dict[int, dict[str, StoredFile]]
    ) -> None:
        model_dir = self.root / name
        model_dir.mkdir(exist_ok=True)
        config_path = model_dir / layout.CONFIG_FILE
        if config is None:
            config_path.unlink(missing_ok=True)
            self._config_tags.pop(name, None)
        elif self._config_tags.get(name) != config.etag or not config_path.is_file():
            temporary = model_dir / f".{layout.CONFIG_FILE}.{uuid.uuid4().hex}"
            try:
                self.store.download(config, temporary)
                os.replace(temporary, config_path)
            finally:
                temporary.unlink(missing_ok=True)
            self._config_tags[name] = config.etag
        try:
            policy = (
                ModelConfig.model_validate_json(config_path.read_text())
                if config_path.is_file()
                else ModelConfig()
            ).version_policy
        except (OSError, ValidationError):
            # The registry reports the bad config and keeps the last good one; fetch no new
            # version until the file is fixed, but still drop versions the store removed.
            wanted: list[int] = []
        else:
            wanted = policy.select(committed)
        cached = layout.list_versions(model_dir)
        for version, path in cached.items():
            if version not in committed:
                logger.info(
                    "model %s version %s left %s; removing its cached copy", name, version, self.remote
                )
                shutil.rmtree(path, ignore_errors=True)
        for version in wanted:
            files = committed[version]
            if version in cached:
                if _sizes(cached[version]) == {rel: f.size for rel, f in files.items()}:
                    continue
                # Files were added or changed after model.json (an upload that wrote the marker
                # early): copy the version again, so a FAILED load is retried on what is there now.
                logger.info("model %s version %s changed in %s; copying it again", name, version, self.remote)
            else:
                logger.info("model %s version %s: copying from %s", name, version, self.remote)
            self.store.download_version(files, model_dir / str(version), replace=version in cached)


def _sizes(version_dir: Path) -> dict[str, int]:
    """The files of a cached version by relative path, with their sizes (hidden names skipped)."""
    return {
        p.relative_to(version_dir).as_posix(): p.stat().st_size
        for p in version_dir.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(version_dir).parts)
    }

"""Atomic publication of a version directory into a TF Serving style repository.

A version is built in ``<repo>/.staging/`` (hidden, on the repository's file system,
so servers never see it), then renamed to ``<repo>/<name>/<v>/`` with ``v`` one above
the highest existing version. A lock file per model serialises concurrent publishers,
and ``rename`` onto a version that already exists fails instead of replacing it, so
two exports never share or clobber a version.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from modelloop.errors import ModelloopError
from modelloop.layout import PUBLISH_LOCK_FILE, STAGING_DIR
from modelloop.layout import list_versions as version_dirs

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class PublishError(ModelloopError):
    """The repository or the model name cannot take a new version."""


def validate_model_name(name: str) -> str:
    """Returns ``name`` if it is a safe model name, else raises :class:`PublishError`.

    Allowed: letters, digits, ``_``, ``-`` and ``.``, starting with a letter or digit,
    at most 128 characters, and never ``..``. So a name can never leave the repository.
    """
    if not _MODEL_NAME.match(name) or ".." in name:
        raise PublishError(
            f"invalid model name {name!r}: use letters, digits, '_', '-' or '.', "
            "starting with a letter or digit, without '..' or '/'"
        )
    return name


def list_versions(model_dir: Path) -> list[int]:
    """Integer version directories of one model, ascending. Other entries are ignored."""
    return list(version_dirs(model_dir))


@contextlib.contextmanager
def staging_dir(repo: Path) -> Iterator[Path]:
    """A fresh directory under ``<repo>/.staging/``, removed on exit unless moved away.

    Raises:
        PublishError: The repository cannot be created or written.
    """
    path = repo / STAGING_DIR / uuid.uuid4().hex
    try:
        path.mkdir(parents=True)
    except OSError as exc:
        raise PublishError(f"repository {str(repo)!r} is not writable: {exc.strerror}") from exc
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _model_lock(model_dir: Path) -> Iterator[None]:
    lock_path = model_dir / PUBLISH_LOCK_FILE
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def publish_version(
    staged: Path, repo: Path, name: str, *, finalize: Callable[[Path, int], None] | None = None
) -> Path:
    """Moves a staged version directory into the repository as the next version.

    Args:
        staged: A complete version directory under ``<repo>/.staging/``.
        repo: The model repository root.
        name: The model name (validated).
        finalize: Called as ``finalize(staged, version)`` under the lock just before
            the rename, to write files that depend on the version number.

    Returns:
        The published version directory ``<repo>/<name>/<version>``.

    Raises:
        PublishError: Bad name, unwritable repository, or the rename failed.
    """
    validate_model_name(name)
    model_dir = repo / name
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PublishError(f"cannot create {str(model_dir)!r}: {exc.strerror}") from exc
    with _model_lock(model_dir):
        version = (list_versions(model_dir) or [0])[-1] + 1
        if finalize is not None:
            finalize(staged, version)
        target = model_dir / str(version)
        try:
            # Directory fsync before rename, so a crash cannot publish an empty version.
            _fsync_tree(staged)
            os.rename(staged, target)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise PublishError(f"version {version} of {name!r} appeared while publishing") from exc
            raise PublishError(f"cannot publish into {str(model_dir)!r}: {exc.strerror}") from exc
        _fsync_dir(model_dir)
    return target


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))

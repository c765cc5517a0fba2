"""Where a model repository lives: a local directory, or a prefix in object storage.

``--repo`` takes a path, a ``file://`` URL, or ``s3://bucket/prefix``; any other
``scheme://`` is refused with one line naming the scheme and the supported ones (so a
mistyped URL never becomes a local directory called ``s3:``). An S3 repository is read and
written through fsspec (s3fs); S3-compatible stores (MinIO, Ceph, moto) work through the
standard ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) variable, and credentials come
from botocore's standard chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles,
web identity, the instance or task role).

The layout in the bucket is the one on disk (:mod:`modelloop.layout`). There is no rename
in object storage, so a version's ``model.json`` is its commit marker: a version prefix
counts only once it holds that file, and :meth:`ObjectRepository.publish` writes it last.

Publishing, and concurrent publishers: a publisher first claims the next version number
by creating ``<name>/<v>/.publish.claim`` with a conditional write (``If-None-Match: *``,
which S3, MinIO and moto honour), so two publishers never pick the same number; the loser
of a race takes the next one. It then uploads the files under ``.staging/<id>/``, copies
them into ``<name>/<v>/`` inside the store, and writes ``model.json`` last. A publisher
that dies leaves a claimed version without ``model.json``: servers ignore it, and later
publishers number past it.

Example:

```python
location = parse_repository("s3://models/prod")
store = ObjectRepository(location)
listing = store.listing()  # one list of the prefix
print({name: sorted(m.committed()) for name, m in listing.items()})
```
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from modelloop.errors import ModelloopError
from modelloop.layout import (
    CONFIG_FILE,
    MODEL_CARD_FILE,
    STAGING_DIR,
    VERSION_CLAIM_FILE,
    is_version_name,
)

SUPPORTED = "a local path, file:///absolute/path or s3://bucket/prefix"
"""What ``--repo`` accepts, as error messages say it."""

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class StorageError(ModelloopError):
    """A repository URL is unsupported, or the object store refused or could not be reached."""


@dataclass(frozen=True, slots=True)
class RepositoryLocation:
    """A parsed ``--repo``.

    Attributes:
        text: What the user gave.
        scheme: ``""`` for a local directory, else the URL scheme (``s3``).
        path: The local directory (local repositories only).
        root: ``bucket/prefix`` without a trailing slash (remote repositories only).
    """

    text: str
    scheme: str = ""
    path: Path | None = None
    root: str = ""

    @property
    def remote(self) -> bool:
        """Whether the repository is in object storage."""
        return bool(self.scheme)

    @property
    def url(self) -> str:
        """The canonical URL of a remote repository (``s3://bucket/prefix``), else the path."""
        return f"{self.scheme}://{self.root}" if self.remote else str(self.path)

    def local_path(self, what: str) -> Path:
        """The directory of a local repository.

        Args:
            what: The command or feature that needs a local directory, for the message.

        Raises:
            StorageError: The repository is remote.
        """
        if self.path is None:
            raise StorageError(f"{what} needs a local repository directory, not {self.url}")
        return self.path


def parse_repository(text: str) -> RepositoryLocation:
    """Parses ``--repo``: a path, ``file://``, or ``s3://bucket[/prefix]``.

    Raises:
        StorageError: Another scheme, a ``file://`` URL with a host, or an S3 URL without
            a bucket; the one-line message names the problem and what is supported.

    Example:

    >>> parse_repository("s3://models/prod/").root
    'models/prod'
    >>> parse_repository("models").path
    PosixPath('models')
    """
    match = _SCHEME.match(text)
    if match is None:
        return RepositoryLocation(text=text, path=Path(text))
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme == "file":
        host, _, path = rest.partition("/")
        if host not in ("", "localhost"):
            raise StorageError(f"repository URL {text!r} names host {host!r}: use file:///absolute/path")
        return RepositoryLocation(text=text, path=Path("/" + path))
    if scheme == "s3":
        root = rest.rstrip("/")
        bucket = root.split("/", 1)[0]
        if not bucket or "//" in root:
            raise StorageError(
                f"repository URL {text!r} names no bucket or has an empty part: use s3://bucket/prefix"
            )
        return RepositoryLocation(text=text, scheme=scheme, root=root)
    raise StorageError(f"unsupported repository URL scheme {scheme!r} in {text!r}: use {SUPPORTED}")


def default_state_dir(location: RepositoryLocation) -> Path:
    """Where a repository's monitoring state goes when no ``--state-dir`` is given.

    The platform's per-user state directory, one folder per repository:
    ``$XDG_STATE_HOME/modelloop/<name>-<hash>`` (``~/.local/state/modelloop/...`` by
    default), where ``<name>`` is the repository folder's (or prefix's) last part and
    ``<hash>`` the first 12 hex digits of the SHA-256 of its absolute path (or URL). Every
    command that names the same repository (``up``, ``serve``, ``retrain``, ``simulate``)
    finds the same state, wherever it runs from; another repository gets its own.

    Example:

    >>> default_state_dir(parse_repository("models")).parent.name
    'modelloop'
    """
    import hashlib

    key = location.url if location.remote else str(Path(location.local_path("state")).absolute())
    configured = os.environ.get("XDG_STATE_HOME", "").strip()
    if configured and Path(configured).is_absolute():
        base = Path(configured)
    else:
        try:
            base = Path.home() / ".local" / "state"
        except RuntimeError:  # no home directory: fall back to a per-user temporary one
            import tempfile

            base = Path(tempfile.gettempdir()) / f"modelloop-state-{os.getuid()}"
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", posixpath.basename(os.path.normpath(key).rstrip("/")))
    name = tail.lstrip(".")[:40] or "repository"
    return base / "modelloop" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def endpoint_url() -> str | None:
    """The S3 endpoint from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, if either is set."""
    for name in _ENDPOINT_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def open_filesystem(location: RepositoryLocation) -> Any:
    """An fsspec file system for a remote repository, without listing caches.

    The endpoint is passed explicitly (botocore reads ``AWS_ENDPOINT_URL`` too, but s3fs's
    own region lookup does not); connection and read timeouts are short, so an unreachable
    store fails a poll within seconds instead of hanging it.
    """
    if location.scheme != "s3":
        raise StorageError(f"unsupported repository URL scheme {location.scheme!r}: use {SUPPORTED}")
    import s3fs

    fs = s3fs.S3FileSystem(
        endpoint_url=endpoint_url(),
        skip_instance_cache=True,
        use_listings_cache=False,
        config_kwargs={
            "connect_timeout": 3,
            "read_timeout": 20,
            "retries": {"max_attempts": 2, "mode": "standard"},
        },
    )
    fs.retries = 2  # s3fs's own retry loop, on top of botocore's
    return fs


def describe_error(exc: BaseException, location: RepositoryLocation) -> str:
    """One line saying why an object-store call failed: credentials, bucket, or the network."""
    bucket = location.root.split("/", 1)[0]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, PermissionError):
        return (
            f"{location.url}: access denied ({text}); check the credentials "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profile or role)"
        )
    if isinstance(exc, FileNotFoundError):
        return f"{location.url}: bucket {bucket!r} does not exist ({text})"
    where = endpoint_url() or "the default endpoint"
    return f"{location.url}: cannot reach the object store at {where}: {type(exc).__name__}: {text}"


@dataclass(slots=True)
class StoredFile:
    """One object of a version or a model: its key relative to the repository, size and tag."""

    key: str
    size: int
    etag: str


@dataclass(slots=True)
class ModelListing:
    """What the store holds for one model.

    Attributes:
        config: ``<name>/config.json``, if present.
        versions: Every version prefix (committed or not): version -> file path (relative
            to the version) -> object.
    """

    config: StoredFile | None = None
    versions: dict[int, dict[str, StoredFile]] = field(default_factory=dict)

    def committed(self) -> dict[int, dict[str, StoredFile]]:
        """The versions whose ``model.json`` exists, ascending: the ones servers may load."""
        return {v: files for v, files in sorted(self.versions.items()) if MODEL_CARD_FILE in files}


class ObjectRepository:
    """A model repository in object storage: list, download and publish.

    Args:
        location: A remote location from :func:`parse_repository`.
        filesystem: An fsspec file system; defaults to :func:`open_filesystem`.
    """

    def __init__(self, location: RepositoryLocation, filesystem: Any = None) -> None:
        if not location.remote:
            raise StorageError(f"{location.text!r} is a local directory, not an object-store URL")
        self.location = location
        self._fs = filesystem

    @property
    def fs(self) -> Any:
        """The file system, opened on first use."""
        if self._fs is None:
            self._fs = open_filesystem(self.location)
        return self._fs

    def _call(self, what: Callable[[], Any]) -> Any:
        try:
            return what()
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(describe_error(exc, self.location)) from exc

    def listing(self) -> dict[str, ModelListing]:
        """Lists the repository prefix once: every model, its config and its version prefixes.

        Hidden names (``.staging``, claims) are skipped, as on disk; the bucket must exist.

        Raises:
            StorageError: The store is unreachable, refuses the credentials, or the bucket
                does not exist.
        """
        root = self.location.root
        bucket = root.split("/", 1)[0]
        self._call(lambda: self.fs.ls(bucket, detail=False) if bucket == root else self.fs.info(bucket))
        found = self._call(lambda: self.fs.find(root, detail=True))
        models: dict[str, ModelListing] = {}
        for path, info in found.items():
            if info.get("type") == "directory":
                continue
            parts = posixpath.relpath(path, root).split("/")
            if len(parts) < 2 or parts[0].startswith("."):
                continue
            model = models.setdefault(parts[0], ModelListing())
            stored = StoredFile(
                key="/".join(parts), size=int(info.get("size") or 0), etag=str(info.get("ETag", ""))
            )
            if len(parts) == 2 and parts[1] == CONFIG_FILE:
                model.config = stored
            elif len(parts) >= 3 and is_version_name(parts[1]):
                rel = "/".join(parts[2:])
                files = model.versions.setdefault(int(parts[1]), {})
                if not any(p.startswith(".") for p in parts[2:]):
                    files[rel] = stored
        return models

    def download(self, stored: StoredFile, target: Path) -> None:
        """Copies one object to a local file (parents created).

        Raises:
            StorageError: The download failed.
        """
        target.parent.mkdir(parents=True, exist_ok=True)
        source = f"{self.location.root}/{stored.key}"
        self._call(lambda: self.fs.get_file(source, str(target)))

    def download_version(self, files: dict[str, StoredFile], target: Path, *, replace: bool = False) -> bool:
        """Downloads one version into ``target`` atomically: a hidden temporary directory
        beside it, renamed into place once every file is there.

        Args:
            files: The version's objects (a :class:`ModelListing` entry).
            target: The local version directory.
            replace: Swap out an existing ``target`` (its files changed in the store).

        Returns:
            True when this call put the version there; False when ``target`` already
            existed (another process of the same cache got there first).

        Raises:
            StorageError: A download failed; nothing is left behind.
        """
        temporary = target.parent / f".download-{target.name}-{uuid.uuid4().hex}"
        retired = target.parent / f".retired-{target.name}-{uuid.uuid4().hex}"
        try:
            for rel, stored in files.items():
                self.download(stored, temporary / rel)
            if replace and target.is_dir():
                os.rename(target, retired)
            try:
                os.rename(temporary, target)
            except OSError:
                if target.is_dir():
                    return False
                raise
            return True
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
            shutil.rmtree(retired, ignore_errors=True)

    def publish(self, staged: Path, name: str, finalize: Callable[[Path, int], None]) -> tuple[str, int]:
        """Publishes a staged version directory as the next version of ``name``.

        Args:
            staged: The complete version directory, on local disk, without ``model.json``.
            name: The model name (already validated).
            finalize: Called as ``finalize(staged, version)`` once the number is claimed;
                it writes ``model.json`` (which depends on the version) into ``staged``.

        Returns:
            The version's URL and number.

        Raises:
            StorageError: The store failed; a claimed number may stay behind, unserved.
        """
        root = self.location.root
        files = sorted(p for p in staged.rglob("*") if p.is_file())
        version = self._claim(name)
        staging = f"{root}/{STAGING_DIR}/{uuid.uuid4().hex}"
        target = f"{root}/{name}/{version}"
        try:
            # Upload under the staging prefix, then copy into the version: servers list the
            # version's prefix, and see nothing of it until model.json lands.
            for path in files:
                rel = path.relative_to(staged).as_posix()
                if rel != MODEL_CARD_FILE:
                    self._call(partial(self.fs.put_file, str(path), f"{staging}/{rel}"))
            for path in files:
                rel = path.relative_to(staged).as_posix()
                if rel != MODEL_CARD_FILE:
                    self._call(partial(self.fs.copy, f"{staging}/{rel}", f"{target}/{rel}"))
            finalize(staged, version)
            card = (staged / MODEL_CARD_FILE).read_bytes()
            self._call(lambda: self.fs.pipe_file(f"{target}/{MODEL_CARD_FILE}", card))
        finally:
            try:
                self.fs.rm(staging, recursive=True)
            except Exception:  # noqa: BLE001 - a staging leftover is hidden and harmless
                pass
        return f"{self.location.scheme}://{target}", version

    def _claim(self, name: str) -> int:
        """Claims the next version number with a create-only write; retries past a race."""
        listing = self.listing().get(name, ModelListing())
        version = max(listing.versions, default=0) + 1
        for _ in range(100):
            claim = f"{self.location.root}/{name}/{version}/{VERSION_CLAIM_FILE}"
            try:
                self._call(partial(self.fs.pipe_file, claim, uuid.uuid4().hex.encode(), mode="create"))
            except StorageError as exc:
                if isinstance(exc.__cause__, FileExistsError):
                    version += 1
                    continue
                raise
            return version
        raise StorageError(f"{self.location.url}: could not claim a version of {name!r} after 100 tries")

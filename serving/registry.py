"""The model registry: TF Serving's "Manager" of loaded versions.

It reconciles what the repository says should be loaded with what is in memory, on a
poll loop (default every second) and on the repository extension's load/unload calls:

- A new version is loaded and warmed up (its own samples, else one synthetic batch; see
  :mod:`~modelloop.serving.warmup`) on a worker thread, so the event loop keeps serving; it
  takes traffic only once AVAILABLE.
- An old version is unloaded only after the versions meant to replace it are AVAILABLE,
  and only after its in-flight requests have finished (a reference count per version).
- A version that fails to load is FAILED (with the error, logged and counted); whatever
  served before keeps serving. It is retried only when its directory changes.
- A version whose directory disappears is unloaded (again after its in-flight requests).

States follow TF Serving: START -> LOADING -> AVAILABLE -> UNLOADING -> END, or FAILED.

Example:

```python
metrics = ServingMetrics(CollectorRegistry())
registry = ModelRegistry(ModelRepository(settings.repo), settings, metrics=metrics)
await registry.start()
servable = registry.resolve("digits", version=None, label=None)
with servable.use():
    outputs = await servable.batcher.predict(inputs)
await registry.stop()
```
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from modelloop.errors import hide_credentials, redact
from modelloop.serving.batching import DynamicBatcher
from modelloop.serving.errors import ModelNotFound, ModelNotReady, ServingError
from modelloop.serving.metrics import ServingMetrics
from modelloop.serving.repository import (
    PLATFORMS,
    ModelRepository,
    RepositoryError,
    RepositoryUnavailable,
)
from modelloop.serving.residency import BoundedMemory, ModelEntry, VersionEntry
from modelloop.serving.rollout import RolloutCoordinator
from modelloop.serving.runtime import Runtime
from modelloop.serving.servable import RuntimeFactory, Servable, create_runtime
from modelloop.serving.settings import FREE_FORM_SECTIONS, ModelConfig, ServingSettings
from modelloop.serving.types import ModelMetadata, ModelState, VersionStatus
from modelloop.serving.warmup import warm_up

logger = logging.getLogger(__name__)


class ModelRegistry(BoundedMemory):
    """Loads, serves and unloads the versions of every model in a repository.

    Args:
        repository: Where versions come from.
        settings: Server settings (poll interval, batching defaults, warmup, runtimes).
        metrics: Where versions-loaded and load failures go (and the batchers' metrics).
        runtime_factory: Builds runtimes; defaults to :func:`create_runtime`. Tests pass fakes.
        rollouts: Keeps a champion loaded beside a candidate and leaves RETIRED versions out
            (:mod:`~modelloop.serving.rollout`). Defaults to None: every model as with
            rollout mode ``off``.
    """

    def __init__(
        self,
        repository: ModelRepository,
        settings: ServingSettings,
        *,
        metrics: ServingMetrics,
        runtime_factory: RuntimeFactory | None = None,
        rollouts: RolloutCoordinator | None = None,
    ) -> None:
        self.repository = repository
        self.rollouts = rollouts
        self.settings = settings
        self.metrics = metrics
        self._factory: RuntimeFactory = runtime_factory or (
            lambda kind, path, meta, config: create_runtime(kind, path, meta, config, settings)
        )
        self._models: dict[str, ModelEntry] = {}
        # --max-loaded-models: loads started by requests, by (model, version).
        self._cold_loads: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._lock: asyncio.Lock | None = None
        self._poller: asyncio.Task[None] | None = None
        self._unloads: set[asyncio.Task[None]] = set()
        # A remote repository: whether it was ever read, and why the last read failed.
        self.repository_synced = repository.remote is None
        self.repository_error = ""

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Loads what the repository wants now, then polls every ``poll_interval_s``."""
        await self.poll()
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever(), name="registry-poll")

    async def stop(self) -> None:
        """Stops polling and unloads every version (after its in-flight requests)."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        async with self._get_lock():
            for model in self._models.values():
                for entry in list(model.versions.values()):
                    if entry.state is ModelState.AVAILABLE:
                        self._schedule_unload(model, entry)
        await self.settle()

    async def settle(self) -> None:
        """Waits until every unload in progress has finished."""
        while self._unloads:
            await asyncio.gather(*list(self._unloads), return_exceptions=True)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self.poll()
            except Exception:  # keep polling whatever one pass hit
                logger.exception("repository poll failed")

    def _get_lock(self) -> asyncio.Lock:
        # Made on first use, on the running loop.
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    # -- reconciliation ----------------------------------------------------------------

    async def poll(self) -> None:
        """One reconciliation pass: load what should be loaded, then unload what should not."""
        async with self._get_lock():
            if not await self._sync_repository():
                return  # a remote repository never read yet: load nothing from a stale cache
            names = self.repository.model_names()
            for name in [n for n in self._models if n not in names]:
                model = self._models.pop(name)
                logger.info("model %s left the repository; unloading it", name)
                for entry in model.versions.values():
                    if entry.state is ModelState.AVAILABLE:
                        self._schedule_unload(model, entry)
                self.metrics.set_versions_loaded(name, 0)
            await asyncio.gather(*(self._reconcile(self._models.setdefault(n, ModelEntry(n))) for n in names))

    async def _sync_repository(self) -> bool:
        """Refreshes a remote repository's local copy; False until it was read once.

        When the store cannot be read, the copy stays as it was, so what is loaded keeps
        serving; the error is logged (once per change), counted and kept for readiness.
        """
        if self.repository.remote is None:
            return True
        try:
            await asyncio.to_thread(self.repository.sync)
        except RepositoryUnavailable as exc:
            # The reason reaches /v2/health/ready and the status page: no credentials, no paths.
            reason = self._public(exc.message)
            if reason != self.repository_error:
                logger.error(
                    "repository %s is unavailable: %s; %s",
                    hide_credentials(str(self.repository.remote)),
                    hide_credentials(exc.message),
                    "keeping what is loaded" if self.repository_synced else "not ready until it is read",
                )
            self.repository_error = reason
            self.metrics.count_repository_error()
            return self.repository_synced
        if self.repository_error:
            logger.info("repository %s is available again", self.repository.remote)
        self.repository_synced, self.repository_error = True, ""
        return True

    def _public(self, message: str) -> str:
        """A load or repository error as answers show it: no credentials, no host paths."""
        root = getattr(self.repository, "root", None)
        if root is not None:
            for prefix in {str(root), str(Path(root).resolve())}:
                message = message.replace(prefix.rstrip("/") + "/", "")
        return redact(message)

    async def _reconcile(self, model: ModelEntry) -> None:
        if not model.enabled:
            return
        try:
            config = self.repository.read_config(model.name)
        except RepositoryError as exc:
            if self._public(exc.message) != model.config_error:
                logger.error(
                    "model %s: %s; keeping its last good config", model.name, hide_credentials(exc.message)
                )
                model.config_error = self._public(exc.message)
            if model.config is None:
                return  # no good config yet: load nothing rather than guess
            # Carry on with the last good config, so removed versions still unload.
            config = model.config
        else:
            if model.config_error:
                logger.info("model %s: config.json is valid again", model.name)
            config_changed = config != model.config
            model.config, model.config_error = config, ""
            if config_changed:
                self._check_labels(model.name, config)
        on_disk = self.repository.versions(model.name)
        if self.rollouts is not None:
            wanted = self.rollouts.plan(
                model.name, config.rollout, list(on_disk), config.version_policy.select, model.available()
            )
        else:
            wanted = config.version_policy.select(on_disk)
        to_load = []
        for v in wanted:
            entry = model.versions.get(v)
            if entry is None or entry.state is ModelState.END:
                to_load.append(v)
            elif (
                entry.state is ModelState.FAILED
                and self.repository.fingerprint(on_disk[v]) != entry.fingerprint
            ):
                logger.info("model %s version %s changed on disk; retrying its load", model.name, v)
                to_load.append(v)
        if self.settings.max_loaded_models is not None and not config.pinned:
            # Bounded memory: a version loads on its first request (ensure_loaded).
            for v in to_load:
                entry = model.versions.setdefault(v, VersionEntry(v))
                entry.state, entry.error = ModelState.UNLOADED, ""
                entry.fingerprint = self.repository.fingerprint(on_disk[v])
            to_load = []
        await asyncio.gather(*(self._load(model, config, v, on_disk[v]) for v in to_load))

        # Availability first: versions that are not wanted stay until every wanted version
        # is AVAILABLE, so a failed new version leaves the old one serving.
        replaced = all(model.versions[v].state is ModelState.AVAILABLE for v in wanted if v in model.versions)
        for v, entry in list(model.versions.items()):
            gone = v not in on_disk
            if v in wanted and not gone:
                continue
            if entry.state is ModelState.AVAILABLE and (gone or replaced):
                logger.info(
                    "model %s version %s: unloading (%s)",
                    model.name,
                    v,
                    "directory removed" if gone else "policy",
                )
                self._schedule_unload(model, entry)
            elif entry.state in (ModelState.FAILED, ModelState.START, ModelState.UNLOADED) or (
                entry.state is ModelState.END and gone
            ):
                del model.versions[v]
        self.metrics.set_versions_loaded(model.name, len(model.available()))

    def _check_labels(self, name: str, config: ModelConfig) -> None:
        # Once per config change, not once per poll.
        wanted = config.version_policy.select(self.repository.versions(name))
        for label, v in config.version_labels.items():
            if v not in wanted:
                logger.warning(
                    "model %s: label %r names version %s, which the version policy does not load",
                    name,
                    label,
                    v,
                )

    async def _load(self, model: ModelEntry, config: ModelConfig, version: int, path: Path) -> None:
        entry = model.versions.setdefault(version, VersionEntry(version))
        entry.state, entry.error = ModelState.LOADING, ""
        entry.fingerprint = self.repository.fingerprint(path)
        logger.info("model %s version %s: loading from %s", model.name, version, path)
        try:
            # Reading, loading and warming up can take seconds: keep them off the event loop.
            runtime = await asyncio.to_thread(self._build, model.name, version, path, config)
        except Exception as exc:  # noqa: BLE001 - every load failure is reported, not raised
            entry.state = ModelState.FAILED
            error = str(exc) if isinstance(exc, ServingError) else f"{type(exc).__name__}: {exc}"
            logger.error(
                "model %s version %s failed to load: %s", model.name, version, hide_credentials(error)
            )
            # Answers (status, index, 503s, the status page) show no host paths.
            entry.error = self._public(error)
            self.metrics.count_load_failure(model.name)
            return
        batching = config.batching or self.settings.batching
        if not runtime.may_run_inline:
            # A model's own code may block: it runs on the batcher's threads, never the loop.
            batching = batching.model_copy(update={"inline_max_micros": 0})
        batcher = DynamicBatcher(
            runtime.predict,
            batching,
            metrics=self.metrics,
            model=model.name,
            version=version,
        )
        entry.servable = Servable(runtime, batcher, refuse_nan=config.refuse_nan)
        entry.state = ModelState.AVAILABLE
        logger.info("model %s version %s is AVAILABLE", model.name, version)

    def _build(self, name: str, version: int, path: Path, config: ModelConfig) -> Runtime:
        kind = self.repository.runtime_kind(path, config)
        metadata = self.repository.read_metadata(path, name, version, PLATFORMS[kind])
        runtime = self._factory(kind, path, metadata, config)
        runtime.load()
        if self.settings.warmup:
            try:
                # The version's own samples when it ships them; else one synthetic row,
                # except for a model's own code (its load is its warm-up).
                warm_up(runtime, path, synthetic=kind != "python")
            except BaseException:
                runtime.unload()
                raise
        return runtime

    def _schedule_unload(self, model: ModelEntry, entry: VersionEntry) -> None:
        servable = entry.servable
        entry.state = ModelState.UNLOADING
        if servable is None:
            entry.state = ModelState.END
            return

        async def unload() -> None:
            # In-flight requests finish on this version before it goes away.
            await servable.wait_idle()
            await servable.batcher.close()
            try:
                await asyncio.to_thread(servable.runtime.unload)
            except Exception:  # the version is gone from serving either way
                logger.exception("model %s version %s: unload raised", model.name, entry.version)
            if entry.state is ModelState.UNLOADING:
                entry.state = ModelState.UNLOADED if entry.evicted else ModelState.END
                entry.servable = None
                entry.evicted = False
            logger.info("model %s version %s unloaded", model.name, entry.version)

        task = asyncio.get_running_loop().create_task(unload(), name=f"unload-{model.name}-{entry.version}")
        self._unloads.add(task)
        task.add_done_callback(self._unloads.discard)

    # -- repository extension ----------------------------------------------------------

    async def load_model(self, name: str) -> None:
        """Loads (or re-enables) a model now, as the repository extension's ``load``.

        Raises:
            ModelNotFound: The repository has no such model.
            ModelNotReady: No version of it could be loaded; the message says why.
        """
        if name not in self.repository.model_names():
            raise ModelNotFound(f"model {name!r} is not in the repository")
        async with self._get_lock():
            model = self._models.setdefault(name, ModelEntry(name))
            model.enabled = True
            await self._reconcile(model)
        if not model.available():
            raise ModelNotReady(f"model {name!r} has no version that loaded: {self._why_unavailable(model)}")

    async def unload_model(self, name: str) -> None:
        """Unloads every version of a model and stops the poll loop from reloading it.

        The model comes back with :meth:`load_model` or a server restart.

        Raises:
            ModelNotFound: The model is not known.
        """
        async with self._get_lock():
            model = self._models.get(name)
            if model is None:
                raise ModelNotFound(f"model {name!r} is not in the repository")
            model.enabled = False
            unloading = [e for e in model.versions.values() if e.state is ModelState.AVAILABLE]
            for entry in unloading:
                self._schedule_unload(model, entry)
            self.metrics.set_versions_loaded(name, 0)
        await self.settle()

    # -- bounded memory (--max-loaded-models) --------------------------------------------

    # -- lookups ---------------------------------------------------------------------

    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        """The AVAILABLE servable for a request: pinned version, label, or latest.

        Raises:
            ModelNotFound: Unknown model, version or label.
            ModelNotReady: The model or version exists but cannot serve now.
        """
        model = self._model(name)
        if not model.enabled:
            raise ModelNotReady(f"model {name!r} was unloaded through the repository API")
        if label is not None:
            labels = self.version_labels(name)
            if label not in labels:
                known = ", ".join(sorted(labels)) or "none"
                raise ModelNotFound(f"model {name!r} has no version label {label!r} (labels: {known})")
            version = labels[label]
        if version is not None:
            entry = model.versions.get(version)
            # An END version is gone (its directory removed, or the policy dropped it) until
            # the next poll forgets it: for a request that is the same as never loaded, 404.
            if entry is None or entry.state is ModelState.END:
                known = ", ".join(str(v) for v in model.available()) or "none"
                raise ModelNotFound(f"model {name!r} has no loaded version {version} (available: {known})")
            if entry.state is not ModelState.AVAILABLE or entry.servable is None:
                reason = f": {entry.error}" if entry.error else ""
                raise ModelNotReady(f"model {name!r} version {version} is {entry.state.value}{reason}")
            return entry.servable
        available = model.available()
        if not available:
            raise ModelNotReady(f"model {name!r} has no available version: {self._why_unavailable(model)}")
        latest = available[-1] if self.rollouts is None else self.rollouts.default_version(name, available)
        servable = model.versions[latest].servable
        if servable is None:  # AVAILABLE always has a servable; this keeps the type checker honest
            raise ModelNotReady(f"model {name!r} has no available version")
        return servable

    def unloaded_metadata(self, name: str, version: int | None = None) -> ModelMetadata | None:
        """The metadata of the UNLOADED version a request would load, read from its ``model.json``.

        None when the version is not UNLOADED (or a budget is not set), so that callers
        fall back to :meth:`resolve` and its errors.
        """
        model = self._models.get(name)
        if model is None or not self.loads_on_request(name, version):
            return None
        if version is None:
            candidates = [v for v, e in model.versions.items() if e.state is not ModelState.FAILED]
            version = max(candidates, default=None)
        entry = model.versions.get(version) if version is not None else None
        path = self.repository.versions(name).get(version) if version is not None else None
        if entry is None or entry.state is not ModelState.UNLOADED or path is None or version is None:
            return None
        config = model.config or ModelConfig()
        try:
            kind = self.repository.runtime_kind(path, config)
            return self.repository.read_metadata(path, name, version, PLATFORMS[kind])
        except Exception:  # noqa: BLE001 - unreadable: the request's own load will say why
            return None

    def loads_on_request(self, name: str, version: int | None = None) -> bool:
        """Whether a request would load the model (or that version): it is UNLOADED, in bounded memory."""
        model = self._models.get(name)
        if model is None or not model.enabled or self.settings.max_loaded_models is None:
            return False
        entries = [model.versions.get(version)] if version is not None else list(model.versions.values())
        return any(e is not None and e.state is ModelState.UNLOADED for e in entries)

    def model_names(self) -> list[str]:
        """Every model the registry knows (those in the repository at the last poll)."""
        return sorted(self._models)

    def has_model(self, name: str) -> bool:
        """Whether ``name`` was in the repository at the last poll."""
        return name in self._models

    def is_enabled(self, name: str) -> bool:
        """False after :meth:`unload_model`, until :meth:`load_model`."""
        return self._model(name).enabled

    def version_labels(self, name: str) -> dict[str, int]:
        """The model's version labels from its config (empty when none)."""
        model = self._model(name)
        return dict(model.config.version_labels) if model.config is not None else {}

    def model_config(self, name: str) -> ModelConfig:
        """The model's config as last read (defaults before the first good read)."""
        return self._model(name).config or ModelConfig()

    def model_options(self, name: str, key: str) -> dict[str, Any]:
        """A free-form section of the model's config (``"drift"``, ``"retrain"``), or ``{}``.

        Raises:
            ModelNotFound: Unknown model.
            KeyError: ``key`` is not a free-form section of ``config.json``.
        """
        config = self.model_config(name)
        if key not in FREE_FORM_SECTIONS:
            raise KeyError(f"{key!r} is not a free-form section of config.json")
        return dict(getattr(config, key))

    def statuses(self, name: str) -> list[VersionStatus]:
        """Every known version of the model with its state, ascending.

        A version the rollout state keeps out is END with the reason as its message.
        """
        model = self._model(name)
        found = {
            v: VersionStatus(version=v, state=e.state, error_message=e.error)
            for v, e in model.versions.items()
        }
        for v, why in self._kept_out(name).items():
            if v not in found or (found[v].state is ModelState.END and not found[v].error_message):
                found[v] = VersionStatus(version=v, state=ModelState.END, error_message=why)
        return [found[v] for v in sorted(found)]

    def status(self, name: str, version: int) -> VersionStatus:
        """The state of one version.

        Raises:
            ModelNotFound: The model or version is unknown.
        """
        for status in self.statuses(name):
            if status.version == version:
                return status
        raise ModelNotFound(f"model {name!r} has no version {version}")

    def index(self) -> list[dict[str, str]]:
        """The repository extension's index: one row per version, or per model without versions."""
        rows: list[dict[str, str]] = []
        for name in sorted(self._models):
            model = self._models[name]
            if model.config_error:
                rows.append(
                    {
                        "name": name,
                        "version": "",
                        "state": ModelState.FAILED.value,
                        "reason": model.config_error,
                    }
                )
            for status in self.statuses(name):
                reason = status.error_message
                if status.state is ModelState.UNLOADED and not reason:
                    reason = "not in memory; available: loads on its first request (--max-loaded-models)"
                rows.append(
                    {
                        "name": name,
                        "version": str(status.version),
                        "state": status.state.value,
                        "reason": reason,
                    }
                )
            if not model.versions and not model.config_error and not self._kept_out(name):
                reason = "unloaded" if not model.enabled else "no version directories"
                rows.append({"name": name, "version": "", "state": ModelState.END.value, "reason": reason})
        return rows

    def _kept_out(self, name: str) -> dict[int, str]:
        """Versions the rollout state keeps out, with why (none without rollouts)."""
        return self.rollouts.kept_out(name) if self.rollouts is not None else {}

    def _model(self, name: str) -> ModelEntry:
        model = self._models.get(name)
        if model is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFound(f"model {name!r} not found (models: {known})")
        return model

    def _why_unavailable(self, model: ModelEntry) -> str:
        if model.config_error:
            return model.config_error
        failed = [f"version {v} FAILED: {e.error}" for v, e in sorted(model.versions.items()) if e.error]
        if failed:
            return "; ".join(failed)
        if not model.versions and self._kept_out(model.name):
            return "; ".join(self._kept_out(model.name).values())
        if not model.versions:
            return "no version directories"
        return ", ".join(f"version {v} is {e.state.value}" for v, e in sorted(model.versions.items()))

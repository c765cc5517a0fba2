"""Many models in bounded memory (``--max-loaded-models``): loads on first request, LRU eviction.

With a budget, a version the repository wants stays UNLOADED until a request needs it; the
request waits (at most ``load_wait_s``) while the least recently used idle, unpinned versions
are unloaded to make room and the version loads. Concurrent requests for one version share one
load. Without a budget every wanted version is loaded and nothing here runs.

:class:`BoundedMemory` is the part of :class:`~modelloop.serving.registry.ModelRegistry` that
does this; it works on the registry's version table (:class:`ModelEntry`,
:class:`VersionEntry`, defined here) and its load and unload steps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from modelloop.serving.errors import ModelNotReady
from modelloop.serving.servable import Servable
from modelloop.serving.settings import ModelConfig
from modelloop.serving.types import ModelState

if TYPE_CHECKING:
    from modelloop.serving.metrics import ServingMetrics
    from modelloop.serving.repository import ModelRepository
    from modelloop.serving.settings import ServingSettings

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class VersionEntry:
    """One version as the registry tracks it: its state, error, servable and LRU order."""

    version: int
    state: ModelState = ModelState.START
    error: str = ""
    servable: Servable | None = None
    fingerprint: tuple[float, ...] = ()
    last_used: float = 0.0  # monotonic; the LRU order of --max-loaded-models
    evicted: bool = False  # unloading to make room: back to UNLOADED, not END


@dataclass(slots=True)
class ModelEntry:
    """One model as the registry tracks it: its config and its versions."""

    name: str
    config: ModelConfig | None = None
    config_error: str = ""
    enabled: bool = True
    versions: dict[int, VersionEntry] = field(default_factory=dict)

    def available(self) -> list[int]:
        """Its AVAILABLE versions, oldest first."""
        return sorted(v for v, e in self.versions.items() if e.state is ModelState.AVAILABLE)


class BoundedMemory:
    """Cold loads and evictions of the registry's versions under ``max_loaded_models``."""

    if TYPE_CHECKING:
        # The registry's own state and steps, which this part works with.
        settings: ServingSettings
        metrics: ServingMetrics
        repository: ModelRepository
        _models: dict[str, ModelEntry]
        _cold_loads: dict[tuple[str, int], asyncio.Task[None]]
        _unloads: set[asyncio.Task[None]]

        def version_labels(self, name: str) -> dict[str, int]: ...
        async def settle(self) -> None: ...
        async def _load(self, model: ModelEntry, config: ModelConfig, version: int, path: Path) -> None: ...
        def _schedule_unload(self, model: ModelEntry, entry: VersionEntry) -> None: ...

    async def ensure_loaded(self, name: str, version: int | None = None, label: str | None = None) -> None:
        """Makes the version a request resolves to loaded, when a memory budget is set.

        Without ``max_loaded_models`` this only returns. With it, the version the request
        names (pinned, labelled, else the latest wanted one) is marked used now; when it is
        UNLOADED it is loaded, after the least recently used idle, unpinned versions are
        unloaded to make room. Concurrent requests for one version share one load. Nothing
        is raised for unknown models or versions: :meth:`resolve` says what is wrong.

        Raises:
            ModelNotReady: The load (or room for it) took longer than ``load_wait_s``.
        """
        if self.settings.max_loaded_models is None:
            return
        model = self._models.get(name)
        if model is None or not model.enabled:
            return
        if label is not None:
            version = self.version_labels(name).get(label)
            if version is None:
                return
        if version is None:
            candidates = [
                v
                for v, e in model.versions.items()
                if e.state in (ModelState.AVAILABLE, ModelState.UNLOADED, ModelState.LOADING)
            ]
            if not candidates:
                return
            version = max(candidates)
        entry = model.versions.get(version)
        if entry is None:
            return
        key = (name, version)
        wait_s = self.settings.load_wait_s
        deadline = time.monotonic() + wait_s
        # A loop: the version may be on its way out (evicted) when the request comes, and
        # in a crowd a freshly loaded version may go again before this request resumes.
        while True:
            entry.last_used = now = time.monotonic()
            if entry.state is ModelState.AVAILABLE:
                return
            if now >= deadline:
                budget = self.settings.max_loaded_models
                why = (
                    f"no room to load it: all {budget} loaded versions (--max-loaded-models) are serving "
                    "requests or pinned"
                    if entry.state is ModelState.UNLOADED
                    else f"it did not load within {wait_s:g} s (--max-loaded-models {budget})"
                )
                raise ModelNotReady(f"model {name!r} version {version} is not loaded yet: {why}; retry later")
            task = self._cold_loads.get(key)
            if task is None:
                if entry.evicted and entry.state is ModelState.UNLOADING:
                    await asyncio.sleep(0.005)  # evicted a moment ago: load it again once it is out
                    continue
                if entry.state is not ModelState.UNLOADED:
                    return  # FAILED, END, loading at start: resolve says so
                task = asyncio.get_running_loop().create_task(
                    self._cold_load(model, entry), name=f"load-{name}-{version}"
                )
                self._cold_loads[key] = task
                task.add_done_callback(self._cold_load_done)
            try:
                await asyncio.wait_for(asyncio.shield(task), deadline - now)
            except TimeoutError:
                continue
            except ModelNotReady:
                # A load this request joined late gave up waiting for room: try again with
                # what is left of this request's own wait.
                if self._cold_loads.get(key) is task:
                    del self._cold_loads[key]
                if time.monotonic() >= deadline or entry.state is not ModelState.UNLOADED:
                    raise

    def _cold_load_done(self, task: asyncio.Task[None]) -> None:
        for key, known in list(self._cold_loads.items()):
            if known is task:
                del self._cold_loads[key]
        # Read here, so that a load whose requests all gave up is not "never retrieved".
        if not task.cancelled() and task.exception() is not None:
            logger.warning("%s: %s", task.get_name(), task.exception())

    async def _cold_load(self, model: ModelEntry, entry: VersionEntry) -> None:
        start = time.perf_counter()
        # UNLOADED until there is room (a second request joins through _cold_loads); _load
        # makes it LOADING before its first await, so the room cannot go to another load.
        try:
            await self._make_room()
            config = model.config or ModelConfig()
            path = self.repository.versions(model.name).get(entry.version)
            if path is None:
                entry.state = ModelState.END
                return
            await self._load(model, config, entry.version, path)
        except BaseException:
            if entry.state is ModelState.LOADING:
                entry.state = ModelState.UNLOADED
            raise
        finally:
            self.metrics.observe_cold_load(model.name, time.perf_counter() - start)
        entry.last_used = time.monotonic()
        self.metrics.set_versions_loaded(model.name, len(model.available()))

    def _resident(self) -> int:
        """Versions in memory, loading, or on their way out (each holds its runtime's memory).

        Cold loads still waiting for room are UNLOADED, so they do not count.
        """
        held = (ModelState.AVAILABLE, ModelState.LOADING, ModelState.UNLOADING)
        return sum(1 for m in self._models.values() for e in m.versions.values() if e.state in held)

    async def _make_room(self) -> None:
        """Unloads least recently used idle, unpinned versions until one more fits the budget.

        Waits while every loaded version is busy or pinned, at most ``load_wait_s``.
        """
        budget = self.settings.max_loaded_models or 0
        deadline = time.monotonic() + self.settings.load_wait_s
        while self._resident() + 1 > budget:
            if time.monotonic() > deadline:
                raise ModelNotReady(
                    f"no room to load a model: all {budget} loaded versions (--max-loaded-models) are "
                    "serving requests or pinned; retry later"
                )
            victim: tuple[ModelEntry, VersionEntry] | None = None
            for m in self._models.values():
                if m.config is not None and m.config.pinned:
                    continue
                for e in m.versions.values():
                    if (
                        e.state is ModelState.AVAILABLE
                        and e.servable is not None
                        and e.servable.idle
                        and (victim is None or e.last_used < victim[1].last_used)
                    ):
                        victim = (m, e)
            if victim is None:
                # Every loaded version is pinned or serving, or unloads are finishing.
                await (self.settle() if self._unloads else asyncio.sleep(0.005))
                continue
            m, e = victim
            logger.info(
                "model %s version %s: unloading to make room (least recently used)", m.name, e.version
            )
            e.evicted = True
            self._schedule_unload(m, e)
            self.metrics.count_eviction(m.name)
            self.metrics.set_versions_loaded(m.name, len(m.available()))
            await self.settle()

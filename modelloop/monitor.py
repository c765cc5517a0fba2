"""``modelloop monitor``: the control plane, the composition root of everything that watches.

One process per store (on Kubernetes its own Deployment, one replica, ``Recreate``). It
reads the prediction log that every server writes (workers and replicas alike), from a
persisted cursor, so its drift windows, data quality, label-free estimate, accuracy from
feedback and history cover all of the traffic once. It runs the retrain triggers (the
in-process rules and the Alertmanager webhook), takes the labels (servers forward their
feedback route here), draws the health page, and exports every monitoring metric once on
its own ``/metrics``.

Nothing here loads a model: the catalog is the repository as it is on disk
(:class:`RepositoryCatalog`). A server with no control plane running serves and logs; the
log waits until one reads it.

Routes of the control plane's port (default 8502):

- ``POST /v1/models/{name}/feedback``, ``GET /v1/models/{name}/feedback/sources``
- ``POST /monitoring/alerts`` (admin token), ``GET /monitoring/models/{name}/history``,
  ``GET /monitoring/health``
- ``GET /`` (the health page), ``GET /metrics``, ``GET /healthz``

Example:

```python
plane = ControlPlane(Path("models"), MonitoringSettings(state_dir=Path("state")), LabelerSettings())
asyncio.run(plane.run(lambda url: print(url)))  # until SIGTERM
```
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import uvloop
from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.types import Receive, Scope, Send

from modelloop.control.http import (
    HealthSection,
    create_alerts_router,
    create_feedback_router,
    create_health_router,
)
from modelloop.control.retraining.wiring import Retraining, build_retraining
from modelloop.control.rollout.controller import RolloutController
from modelloop.control.rollout.http import create_rollout_router
from modelloop.control.service import MonitoringService
from modelloop.errors import ModelloopError, ServiceError
from modelloop.logwiring import open_prediction_log, peer_wait_s, task_from_card
from modelloop.monitoring.settings import LabelerSettings, MonitoringSettings
from modelloop.monitoring.stores import StoreUnavailable
from modelloop.monitoring.stores.binding import RepositoryMismatch, repository_identity
from modelloop.serving.errors import ModelNotFound
from modelloop.serving.repository import ModelRepository
from modelloop.serving.rest.errors import install_error_handlers
from modelloop.serving.rest.origin import OriginGuard
from modelloop.serving.rest.server import RestServer, bind_rest_socket
from modelloop.serving.rest.status_page import STYLE as PAGE_STYLE
from modelloop.serving.settings import ModelConfig
from modelloop.serving.types import ModelState, RolloutPolicy, VersionStatus

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8502
"""The control plane's HTTP port."""
MAX_BODY_BYTES = 64 * 1024 * 1024


class RepositoryCatalog:
    """The models of a repository as the control plane sees them: on disk, none loaded.

    Each model's wanted versions (its ``config.json`` version policy) are AVAILABLE.

    Args:
        repository: The repository.
    """

    def __init__(self, repository: ModelRepository) -> None:
        self._repository = repository

    def model_names(self) -> list[str]:
        """Every model in the repository, sorted."""
        return sorted(self._repository.model_names())

    def has_model(self, name: str) -> bool:
        """Whether the repository holds the model."""
        return name in self._repository.model_names()

    def _config(self, name: str) -> ModelConfig:
        if not self.has_model(name):
            raise ModelNotFound(f"model {name!r} is not in the repository")
        try:
            return self._repository.read_config(name)
        except ServiceError:
            return ModelConfig()

    def statuses(self, name: str) -> list[VersionStatus]:
        """The versions the servers load, AVAILABLE."""
        wanted = self._repository.wanted_versions(name, self._config(name))
        return [VersionStatus(v, ModelState.AVAILABLE) for v in sorted(wanted)]

    def model_options(self, name: str, key: str) -> dict[str, Any]:
        """A free-form section of the model's ``config.json``, or ``{}``."""
        return dict(getattr(self._config(name), key, {}) or {})


class RolloutCatalog(RepositoryCatalog):
    """The repository as the control plane's rollout judge sees it.

    A server in a rollout keeps the champion loaded beside the newest version its version
    policy wants (:meth:`RolloutCoordinator.plan
    <modelloop.serving.rollout.RolloutCoordinator.plan>`), so every version on disk up to
    that newest one is AVAILABLE here: the judge starts a rollout when a new version
    appears, and the servers load the pair its decision names.
    """

    def statuses(self, name: str) -> list[VersionStatus]:
        """The versions on disk up to the newest one the version policy wants, AVAILABLE."""
        wanted = self._repository.wanted_versions(name, self._config(name))
        if not wanted:
            return []
        newest = max(wanted)
        on_disk = sorted(v for v in self._repository.versions(name) if v <= newest)
        return [VersionStatus(v, ModelState.AVAILABLE) for v in on_disk]


class _OriginGuarded:
    """The control plane's app behind the servers' cross-site write check (403 before any route)."""

    def __init__(self, app: FastAPI, guard: OriginGuard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self.guard.refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _page(section: HealthSection) -> str:
    # The servers' page without their cards: each model's verdicts stay above its curves.
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<title>modelloop control plane</title><link rel="icon" href="data:,">'
        f"<style>{PAGE_STYLE}</style></head><body>"
        '<header class="top"><h1>modelloop control plane</h1></header><main>'
        '<div id="models"></div>'
        f"{section.html()}</main></body></html>"
    )


class ControlPlane:
    """The control plane: the log's reader, the analysis, retraining and their HTTP surface.

    Args:
        repo: The model repository (local directory).
        monitoring: Monitoring settings (store, state directory, thresholds, trigger).
        labelers: The labelers' tokens. Defaults to none (feedback is unauthenticated).
        admin_token: The admin token of the alert webhook and the rollout actions.
            Defaults to None (both off).
        host: Interface to bind. Defaults to 127.0.0.1.
        port: Port; 0 picks a free one. Defaults to 8502.
        cors_origins: Origins whose pages may write here (``MODELLOOP_CORS_ORIGINS``);
            other cross-site writes get 403, as on the servers. Defaults to none.
        rollout: The rollout defaults of every model (``MODELLOOP_ROLLOUT__*``, as for
            ``serve``). Defaults to ``RolloutPolicy()`` (mode off unless a model's
            ``config.json`` says otherwise).

    Raises:
        ModelloopError: The repository is missing or the store cannot be opened.
    """

    def __init__(
        self,
        repo: Path,
        monitoring: MonitoringSettings,
        labelers: LabelerSettings | None = None,
        *,
        admin_token: str | None = None,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        cors_origins: Sequence[str] = (),
        rollout: RolloutPolicy | None = None,
    ) -> None:
        if not repo.is_dir():
            raise ModelloopError(f"model repository {str(repo)!r} does not exist or is not a directory")
        self.repo = repo
        self.host = host
        self.port = port
        self.prometheus = CollectorRegistry()
        try:
            self.service = MonitoringService(
                monitoring,
                repo=repo,
                catalog=RepositoryCatalog(ModelRepository(repo)),
                registry=self.prometheus,
                reads_log=True,
                traffic_from_log=True,
                # Labels may arrive before the server that answered wrote its log buffer.
                peer_wait_s=peer_wait_s(monitoring),
                open_log=partial(open_prediction_log, monitoring) if monitoring.log_url else None,
            )
        except StoreUnavailable as exc:
            raise ModelloopError(f"cannot open the monitoring store: {exc.message}") from exc
        # The store describes one repository: the control plane of another stops here.
        try:
            self.service.stores.binding.bind_repository(repository_identity(repo, None))
        except RepositoryMismatch as exc:
            self.service.stores.close()
            raise ModelloopError(exc.message) from exc
        except StoreUnavailable as exc:
            logger.warning("cannot check which repository the store describes yet: %s", exc.message)
        # The rollout judge: it starts, judges, promotes and rolls back on the traffic every
        # server flushes to the store; the servers route by the decisions it writes.
        service = self.service
        self.rollouts = RolloutController(
            service.stores,
            RolloutCatalog(ModelRepository(repo)),
            rollout if rollout is not None else RolloutPolicy(),
            self.prometheus,
            task_from_card(repo),
            quarantined=service.quarantined_sources,
            interval_s=monitoring.rollout_interval_s,
            repository=repository_identity(repo, None),
        )
        self.retraining: Retraining = build_retraining(monitoring, repo, self.service)
        matcher = labelers.matcher() if labelers is not None else None
        if not matcher:
            logger.warning(
                "feedback is unauthenticated: set MODELLOOP_FEEDBACK_TOKEN or MODELLOOP_FEEDBACK_TOKENS"
            )
        self.app = self._build_app(matcher, admin_token)
        self.guarded = _OriginGuarded(self.app, OriginGuard(cors_origins))
        self._stop = asyncio.Event()
        self.url = ""

    def _build_app(self, matcher: Any, admin_token: str | None) -> FastAPI:
        app = FastAPI(title="modelloop control plane", docs_url=None, redoc_url=None)
        install_error_handlers(app)
        app.include_router(create_feedback_router(self.service, MAX_BODY_BYTES, matcher))
        app.include_router(create_alerts_router(self.retraining.alerts, admin_token, MAX_BODY_BYTES))
        app.include_router(create_health_router(self.service))
        app.include_router(create_rollout_router(self.rollouts, admin_token))
        section = HealthSection(self.service)
        registry = self.prometheus
        ingest = self.service.ingest

        @app.get("/", response_class=HTMLResponse, include_in_schema=False)
        async def page() -> HTMLResponse:
            return HTMLResponse(_page(section))

        @app.get("/metrics", include_in_schema=False)
        async def metrics() -> Response:
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/healthz", include_in_schema=False)
        async def healthz(request: Request) -> Response:
            cursor = ingest.cursor if ingest is not None else None
            # A sequence number in SQL, the newest object key read in object storage.
            shown = cursor if isinstance(cursor, int) else (str(cursor) if cursor is not None else 0)
            return Response(json.dumps({"live": True, "cursor": shown}), media_type="application/json")

        return app

    def request_stop(self) -> None:
        """Asks the running control plane to stop (what SIGTERM does)."""
        self._stop.set()

    async def run(self, on_ready: Callable[[str], None] | None = None) -> int:
        """Serves until SIGTERM or SIGINT; returns 0 after a clean stop.

        Raises:
            ModelloopError: The port cannot be bound.
        """
        import uvicorn

        try:
            sock = bind_rest_socket(self.host, self.port)
        except OSError as exc:
            raise ModelloopError(str(exc)) from exc
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self.service.start()
        await self.rollouts.start()
        config = uvicorn.Config(self.guarded, log_level="warning", lifespan="off")
        # uvicorn's own handlers would re-raise SIGTERM after its shutdown and kill the
        # process before the log reader and the store are closed: this loop owns the signals.
        server = RestServer(config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name="control-plane")
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        if on_ready is not None:
            on_ready(self.url)
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait({stop, task}, return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        await asyncio.gather(task, return_exceptions=True)
        stop.cancel()
        await self.rollouts.stop()
        await self.retraining.close()
        await self.service.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        sock.close()
        return 0


def print_ready(url: str) -> None:
    """The line tests, ``up`` and users read."""
    print(f"modelloop: control plane listening on {url}", file=sys.stdout, flush=True)


def monitor(plane_args: dict[str, Any], on_ready: Callable[[str], None] | None = None) -> int:
    """Builds a :class:`ControlPlane` from keyword arguments and runs it until SIGTERM."""

    async def main() -> int:
        plane = ControlPlane(**plane_args)
        return await plane.run(on_ready or print_ready)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())

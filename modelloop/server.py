"""The composition root: the only module that wires serving, monitoring and retraining.

It builds repository -> registry -> data plane -> REST app and gRPC servicers, and, when
monitoring is on, the monitoring service (the data plane's observer, reading the
registry as its catalog), its HTTP routes and status-page columns (mounted through the
REST app's extension point) and the retraining half. Everything is passed in; nothing
builds its own dependencies or reads the environment per request. On SIGTERM or SIGINT
the server turns readiness off, stops taking connections, lets the requests in flight
finish within the grace period, unloads the models and returns 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

import uvloop
from fastapi import APIRouter
from prometheus_client import CollectorRegistry

from modelloop.errors import ModelloopError
from modelloop.monitoring.http import (
    HealthSection,
    MonitoringColumns,
    create_alerts_router,
    create_feedback_router,
    create_health_router,
)
from modelloop.monitoring.retraining import Retraining, build_retraining
from modelloop.monitoring.service import MonitoringService
from modelloop.monitoring.settings import LabelerSettings, MonitoringSettings
from modelloop.monitoring.store import StoreUnavailable
from modelloop.serving.dataplane import DataPlane
from modelloop.serving.grpc.server import bind_grpc_server, create_grpc_server, server_credentials
from modelloop.serving.metrics import ServingMetrics
from modelloop.serving.observer import InferenceObserver
from modelloop.serving.registry import ModelRegistry
from modelloop.serving.repository import ModelRepository
from modelloop.serving.rest.app import StatusColumns, create_app
from modelloop.serving.rest.server import bind_rest_socket, create_rest_server
from modelloop.serving.settings import ServingSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BoundAddresses:
    """Where the server listens, after port 0 has been resolved."""

    host: str
    rest_port: int
    grpc_port: int
    tls: bool = False

    @property
    def rest_url(self) -> str:
        """Base URL of the REST port."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.rest_port}"

    @property
    def grpc_target(self) -> str:
        """``host:port`` of the gRPC port."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.grpc_port}"


class ServerError(ModelloopError):
    """The server cannot start: bad repository, address in use, bad settings."""


class ModelServer:
    """One server process: REST and gRPC front ends over one data plane.

    Args:
        settings: Server settings.
        observer: Receives every answered request (monitoring). Defaults to a no-op.
        registry: Prometheus registry for ``/metrics``. Defaults to a fresh one.
        monitoring: Monitoring settings; when given and enabled, a
            :class:`~modelloop.monitoring.service.MonitoringService` logs predictions,
            takes feedback and exports drift and accuracy on the same registry.
            Defaults to None (no monitoring).
        labelers: The labelers' feedback tokens. Defaults to None: feedback is
            unauthenticated (a warning says so at start).

    Example:
        >>> server = ModelServer(ServingSettings(repo=Path("models"), rest_port=0, grpc_port=0))
        >>> asyncio.run(server.run())  # until SIGTERM
    """

    def __init__(
        self,
        settings: ServingSettings,
        *,
        observer: InferenceObserver | None = None,
        registry: CollectorRegistry | None = None,
        monitoring: MonitoringSettings | None = None,
        labelers: LabelerSettings | None = None,
    ) -> None:
        if not settings.repo.is_dir():
            raise ServerError(f"model repository {str(settings.repo)!r} does not exist or is not a directory")
        self.settings = settings
        self.prometheus = registry if registry is not None else CollectorRegistry()
        self.metrics = ServingMetrics(self.prometheus)
        self.models = ModelRegistry(ModelRepository(settings.repo), settings, metrics=self.metrics)
        self.monitoring: MonitoringService | None = None
        if monitoring is not None and monitoring.enabled:
            try:
                self.monitoring = MonitoringService(
                    monitoring, repo=settings.repo, catalog=self.models, registry=self.prometheus
                )
            except StoreUnavailable as exc:
                raise ServerError(f"cannot open the monitoring store: {exc.message}") from exc
            observer = observer if observer is not None else self.monitoring.observer
        self.dataplane = DataPlane(self.models, self.metrics, observer=observer)
        # The retraining half: the alert webhook's handler and, without Alertmanager, the
        # in-process rules; it counts the runs it launches on the monitoring metrics.
        self.retraining: Retraining | None = None
        if self.monitoring is not None and monitoring is not None:
            self.retraining = build_retraining(monitoring, settings.repo, self.monitoring)
        # Monitoring's HTTP surface, mounted through the REST app's extension point: the
        # feedback route (501 without monitoring) and the alert webhook (503 without it).
        admin_token = settings.admin_token.get_secret_value() if settings.admin_token is not None else None
        matcher = labelers.matcher() if labelers is not None else None
        if self.monitoring is not None:
            if matcher:
                logger.info("feedback needs a labeler token; sources: %s", ", ".join(matcher.sources))
            else:
                logger.warning(
                    "feedback is unauthenticated: anyone who can reach the REST port can label "
                    "predictions (source 'anonymous'); set MODELLOOP_FEEDBACK_TOKEN or "
                    "MODELLOOP_FEEDBACK_TOKENS"
                )
        routers: list[APIRouter] = [
            create_feedback_router(self.monitoring, settings.max_body_bytes, matcher),
            create_alerts_router(
                self.retraining.alerts if self.retraining is not None else None,
                admin_token,
                settings.max_body_bytes,
            ),
            create_health_router(self.monitoring),
        ]
        columns: StatusColumns = MonitoringColumns(self.monitoring)
        self.app = create_app(
            self.dataplane,
            settings,
            self.prometheus,
            routers=routers,
            status_columns=columns,
            status_sections=[HealthSection(self.monitoring)],
        )
        self._stop = asyncio.Event()
        self.addresses: BoundAddresses | None = None

    def request_stop(self) -> None:
        """Asks the running server to drain and stop (what SIGTERM does)."""
        self._stop.set()

    async def run(self, on_ready: Callable[[BoundAddresses], None] | None = None) -> int:
        """Starts everything, waits for a stop signal, drains, and returns the exit status.

        Args:
            on_ready: Called once both ports listen and the models are loaded.

        Returns:
            0 after a clean drain.

        Raises:
            ServerError: A port cannot be bound.
        """
        settings = self.settings
        try:
            rest_sock = bind_rest_socket(settings.host, settings.rest_port)
        except OSError as exc:
            raise ServerError(str(exc)) from exc
        grpc_server = create_grpc_server(self.dataplane, settings)
        try:
            credentials = server_credentials(settings)
        except OSError as exc:
            rest_sock.close()
            raise ServerError(f"cannot read the TLS files: {exc.strerror}") from exc
        try:
            grpc_port = bind_grpc_server(grpc_server, settings.host, settings.grpc_port, credentials)
        except OSError as exc:
            rest_sock.close()
            raise ServerError(str(exc)) from exc

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

        await self.dataplane.start()
        if self.monitoring is not None:
            await self.monitoring.start()
        # Startup leaves millions of long-lived objects (TensorFlow's protobuf modules, ONNX
        # Runtime, FastAPI); freezing them spares every later full collection from walking
        # them again. Unfrozen, that walk was a 100+ ms pause every few seconds under load.
        gc.collect()
        gc.freeze()
        await grpc_server.start()
        rest = create_rest_server(self.app, settings)
        rest_task = asyncio.create_task(rest.serve(sockets=[rest_sock]), name="rest")
        while not rest.started and not rest_task.done():
            await asyncio.sleep(0.01)
        self.addresses = BoundAddresses(
            settings.host, rest_sock.getsockname()[1], grpc_port, tls=settings.tls
        )
        if on_ready is not None:
            on_ready(self.addresses)

        stop_task = asyncio.create_task(self._stop.wait())
        await asyncio.wait({stop_task, rest_task}, return_when=asyncio.FIRST_COMPLETED)
        logger.info("stopping: draining requests in flight (grace %.1f s)", settings.grace_period_s)
        self.dataplane.draining = True
        rest.should_exit = True
        await asyncio.gather(
            grpc_server.stop(settings.grace_period_s),
            self.dataplane.drain(settings.grace_period_s),
            rest_task,
            return_exceptions=True,
        )
        stop_task.cancel()
        await self.dataplane.stop()
        if self.retraining is not None:
            await self.retraining.close()
        if self.monitoring is not None:
            # After the drain: every answered request is logged before the store closes.
            await self.monitoring.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        rest_sock.close()
        logger.info("stopped")
        return 0


def print_addresses(addresses: BoundAddresses, stream: TextIO | None = None) -> None:
    """Prints the bound ports in the lines tests and users read."""
    out = stream if stream is not None else sys.stdout
    print(f"modelloop: REST listening on {addresses.rest_url}", file=out)
    print(f"modelloop: gRPC listening on {addresses.grpc_target}", file=out)
    out.flush()


def serve(
    settings: ServingSettings,
    on_ready: Callable[[BoundAddresses], None] | None = None,
    monitoring: MonitoringSettings | None = None,
    labelers: LabelerSettings | None = None,
) -> int:
    """Builds a :class:`ModelServer` and runs it until SIGTERM or SIGINT.

    Args:
        settings: Server settings.
        on_ready: Called with the bound addresses. Defaults to printing them.
        monitoring: Monitoring settings. Defaults to None (no monitoring).
        labelers: The labelers' feedback tokens. Defaults to None (unauthenticated).

    Returns:
        The process exit status.
    """

    async def main() -> int:
        server = ModelServer(settings, monitoring=monitoring, labelers=labelers)
        return await server.run(on_ready or print_addresses)

    # uvloop: a faster event loop for the REST side (uvicorn's own default); grpc.aio's poller
    # runs on it too (the end-to-end tests drive both ports of one uvloop process).
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())

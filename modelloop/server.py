"""The composition root: the only module that wires serving, monitoring and retraining.

It builds repository -> registry -> data plane -> REST app and gRPC servicers, the prediction
logger (the data plane's observer) and, with an in-process control plane, the log's reader,
the monitoring service, its routes and status-page sections and the retraining half; with a
control plane elsewhere, the routes that forward to it. ARCHITECTURE.md ("Where monitoring
plugs in") tells how the parts meet. Everything is passed in; nothing builds its own
dependencies or reads the environment per request. On SIGTERM or SIGINT the server turns
readiness off, stops taking connections, lets the requests in flight finish within the grace
period, unloads the models and returns 0.

As one worker of ``modelloop serve --workers N`` (:mod:`modelloop.workers` is the
supervisor), a server also gets a :class:`WorkerRole`: it binds the shared ports with
``SO_REUSEPORT``, exposes every worker's metrics summed (prometheus_client's multiprocess
mode), tells the supervisor when it is ready and when the repository extension changed
what it serves (and follows the others' changes), shares the retrain policy with the
other workers through a ledger, and leaves the in-process rules and the store's retention
to worker 0. It drains and stops when the supervisor goes away.
"""

from __future__ import annotations

import asyncio
import gc
import html
import logging
import os
import signal
from collections.abc import Callable
from functools import partial

import uvloop
from fastapi import APIRouter
from prometheus_client import CollectorRegistry, Counter

from modelloop.control.http import (
    HealthSection,
    create_alerts_router,
    create_feedback_router,
    create_health_router,
)
from modelloop.control.retraining.wiring import Retraining, build_retraining
from modelloop.control.rollout.controller import RolloutController
from modelloop.control.rollout.http import RolloutPart, create_rollout_router
from modelloop.control.service import MonitoringService
from modelloop.errors import ServiceError
from modelloop.logwiring import open_log_stores, open_prediction_log, peer_wait_s, segmenting, task_from_card
from modelloop.monitoring.settings import LabelerSettings, MonitoringSettings
from modelloop.monitoring.stores import Stores, StoreUnavailable
from modelloop.monitoring.stores.binding import RepositoryMismatch, repository_identity
from modelloop.process import BoundAddresses, ServerError, SupervisorLink, WorkerRole, print_addresses
from modelloop.serving.dataplane import DataPlane
from modelloop.serving.grpc.server import bind_grpc_server, create_grpc_server, server_credentials
from modelloop.serving.metrics import ServingMetrics, multiprocess_registry
from modelloop.serving.mirror import MirroredRepository
from modelloop.serving.observer import InferenceObserver
from modelloop.serving.predlog import PredictionLogger, repository_columns
from modelloop.serving.registry import ModelRegistry
from modelloop.serving.repository import ModelRepository
from modelloop.serving.rest.app import create_app
from modelloop.serving.rest.forward import create_forward_router
from modelloop.serving.rest.server import bind_rest_socket, create_rest_server
from modelloop.serving.rest.status_page import StatusSection
from modelloop.serving.rollout import RolloutCoordinator
from modelloop.serving.settings import ServingSettings
from modelloop.storage import StorageError, parse_repository
from modelloop.telemetry import setup_tracing, shutdown_tracing

logger = logging.getLogger(__name__)


class ModelServer:
    """One server process: REST and gRPC front ends over one data plane.

    Args:
        settings: Server settings.
        observer: Receives every answered request (monitoring). Defaults to a no-op.
        registry: Prometheus registry for ``/metrics``. Defaults to a fresh one.
        monitoring: Monitoring settings; when given and enabled, a
            :class:`~modelloop.control.service.MonitoringService` logs predictions,
            takes feedback and exports drift and accuracy on the same registry.
            Defaults to None (no monitoring).
        labelers: The labelers' feedback tokens. Defaults to None: feedback is
            unauthenticated (a warning says so at start).
        role: This server's place among several workers. Defaults to None (the only
            process).

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
        role: WorkerRole | None = None,
    ) -> None:
        repository = _open_repository(settings)
        self.settings = settings
        self.role = role
        self.link = SupervisorLink(role.link_fd) if role is not None else None
        self.prometheus = registry if registry is not None else CollectorRegistry()
        # What /metrics shows: this process's registry, or with workers every worker's sum.
        exposition = multiprocess_registry(role.metrics_dir) if role is not None else self.prometheus
        self.metrics = ServingMetrics(self.prometheus)
        # Rollouts: serving keeps champion and candidate and splits traffic; monitoring's
        # controller (set below) holds the state in the store and judges the guardrails.
        self.rollouts = RolloutCoordinator(settings.rollout)
        self.models = ModelRegistry(repository, settings, metrics=self.metrics, rollouts=self.rollouts)
        self.rollout_controller: RolloutController | None = None
        self.monitoring: MonitoringService | None = None
        self.prediction_logger: PredictionLogger | None = None
        leader = role is None or role.leader
        self.log_stores: Stores | None = None
        split = settings.control_plane_url is not None
        if monitoring is not None and monitoring.enabled and split:
            # A control plane reads the log and judges rollouts: this process only logs,
            # counts its rollout calls, and routes by the state in the store.
            if leader:
                logger.info(
                    "answering and logging; the control plane at %s reads the log, watches and "
                    "judges rollouts (until it runs, the log waits for it)",
                    settings.control_plane_url,
                )
            self.log_stores = open_log_stores(monitoring)
            dropped = Counter(
                "modelloop_monitoring_dropped",
                "Answered requests that were not logged: buffer full or the log unavailable.",
                ["model"],
                registry=self.prometheus,
            )
            sink = open_prediction_log(monitoring, self.log_stores.engine)
            self.prediction_logger = PredictionLogger(
                sink,
                columns=repository_columns(settings.repo),
                sample=lambda model: self.models.model_config(model).log_sample,
                on_drop=lambda model, count: dropped.labels(model=model).inc(count),
                queue_size=monitoring.queue_size,
                **segmenting(sink),
            )
            observer = observer if observer is not None else self.prediction_logger
            self.rollout_controller = RolloutController(
                self.log_stores,
                self.models,
                settings.rollout,
                self.prometheus,
                task_from_card(settings.repo),
                interval_s=monitoring.rollout_interval_s,
                repository=repository_identity(settings.repo, settings.repo_url),
                # The control plane starts and judges rollouts; this server counts its calls
                # and routes by the decisions it reads.
                judging=False,
            )
            self.rollouts.router = self.rollout_controller
            try:
                self.rollout_controller.bind()
            except RepositoryMismatch as exc:
                self.log_stores.close()
                raise ServerError(exc.message) from exc
            except StoreUnavailable as exc:
                logger.warning("cannot check which repository the store describes yet: %s", exc.message)
        elif monitoring is not None and monitoring.enabled:
            try:
                self.monitoring = MonitoringService(
                    monitoring,
                    repo=settings.repo,
                    catalog=self.models,
                    registry=self.prometheus,
                    prune=leader,
                    # One reader of the log per store: the only process, or worker 0.
                    reads_log=leader,
                    # The other workers write their log buffers every 0.25 s.
                    peer_wait_s=0.0 if role is None else peer_wait_s(monitoring),
                    open_log=partial(open_prediction_log, monitoring) if monitoring.log_url else None,
                )
            except StoreUnavailable as exc:
                raise ServerError(f"cannot open the monitoring store: {exc.message}") from exc
            service = self.monitoring
            # The request path only buffers; the log's reader converts and analyses.
            dropped = service.metrics.dropped
            self.prediction_logger = PredictionLogger(
                service.log,
                columns=repository_columns(settings.repo),
                sample=lambda model: self.models.model_config(model).log_sample,
                on_drop=lambda model, count: dropped.labels(model=model).inc(count),
                queue_size=monitoring.queue_size,
                **segmenting(service.log),
            )
            service.before_flush = self.prediction_logger.flush
            observer = observer if observer is not None else self.prediction_logger
            self.rollout_controller = RolloutController(
                service.stores,
                self.models,
                settings.rollout,
                self.prometheus,
                lambda model, version: service.version_info(model, version).task,
                quarantined=service.quarantined_sources,
                interval_s=monitoring.rollout_interval_s,
                repository=repository_identity(settings.repo, settings.repo_url),
            )
            self.rollouts.router = self.rollout_controller
            # The store describes one repository: another one stops here, before any port is
            # bound. With the store down, the controller binds on its first pass instead.
            try:
                self.rollout_controller.bind()
            except RepositoryMismatch as exc:
                service.stores.close()
                raise ServerError(exc.message) from exc
            except StoreUnavailable as exc:
                logger.warning("cannot check which repository the store describes yet: %s", exc.message)
        on_change = self._relay_repository_change if self.link is not None else None
        self.dataplane = DataPlane(
            self.models, self.metrics, observer=observer, on_repository_change=on_change
        )
        # The retraining half: the alert webhook's handler and, without Alertmanager, the
        # in-process rules; it counts the runs it launches on the monitoring metrics.
        self.retraining: Retraining | None = None
        if self.monitoring is not None and monitoring is not None and settings.repo_url is not None:
            logger.warning(
                "retraining publishes into local repositories only: drift and accuracy alerts "
                "will not retrain models of %s",
                settings.repo_url,
            )
        elif self.monitoring is not None and monitoring is not None:
            self.retraining = build_retraining(
                monitoring, settings.repo, self.monitoring, shared=role is not None, rules=leader
            )
        # Monitoring's HTTP surface, mounted through the REST app's extension point: the
        # feedback route (501 without monitoring) and the alert webhook (503 without it).
        admin_token = settings.admin_token.get_secret_value() if settings.admin_token is not None else None
        matcher = labelers.matcher() if labelers is not None else None
        if self.monitoring is not None and not split:
            if matcher:
                logger.info("feedback needs a labeler token; sources: %s", ", ".join(matcher.sources))
            else:
                logger.warning(
                    "feedback is unauthenticated: anyone who can reach the REST port can label "
                    "predictions (source 'anonymous'); set MODELLOOP_FEEDBACK_TOKEN or "
                    "MODELLOOP_FEEDBACK_TOKENS"
                )
        routers: list[APIRouter]
        sections: list[StatusSection] = []
        if self.log_stores is not None and settings.control_plane_url is not None:
            logger_ = self.prediction_logger
            routers = [
                create_forward_router(
                    settings.control_plane_url,
                    before_feedback=logger_.flush if logger_ is not None else None,
                    max_body_bytes=settings.max_body_bytes,
                ),
                create_rollout_router(self.rollout_controller, admin_token),
            ]
            # The charts come from the control plane, through this server's forwarded route.
            sections.append(ControlPlaneSection(settings.control_plane_url))
            sections.append(HealthSection(None, forwarded=True))
        else:
            routers = [
                create_feedback_router(self.monitoring, settings.max_body_bytes, matcher, admin_token),
                create_alerts_router(
                    self.retraining.alerts if self.retraining is not None else None,
                    admin_token,
                    settings.max_body_bytes,
                ),
                create_health_router(self.monitoring),
                create_rollout_router(self.rollout_controller, admin_token),
            ]
            sections.append(HealthSection(self.monitoring))
        self.app = create_app(
            self.dataplane,
            settings,
            exposition,
            routers=routers,
            card_parts=[RolloutPart(self.rollout_controller)],
            status_sections=sections,
        )
        self._stop = asyncio.Event()
        self.addresses: BoundAddresses | None = None

    def request_stop(self) -> None:
        """Asks the running server to drain and stop (what SIGTERM does)."""
        self._stop.set()

    def _relay_repository_change(self, op: str, model: str) -> None:
        if self.link is not None:
            self.link.send({"event": "repository", "op": op, "model": model})

    async def _follow_supervisor(self) -> None:
        """Applies the other workers' repository changes; stops when the supervisor goes away."""
        if self.link is None:
            return
        async for message in self.link.messages():
            op, model = message.get("op"), str(message.get("model", ""))
            try:
                if op == "load":
                    await self.models.load_model(model)
                elif op == "unload":
                    await self.models.unload_model(model)
            except ServiceError as exc:
                # The worker that took the call already answered its client; say why here.
                logger.warning("repository %s of %s from another worker: %s", op, model, exc.message)
        logger.warning("the supervisor went away: draining and stopping")
        self.request_stop()

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
        shared = self.role is not None
        try:
            rest_sock = bind_rest_socket(settings.host, settings.rest_port, reuse_port=shared)
        except OSError as exc:
            raise ServerError(str(exc)) from exc
        grpc_server = create_grpc_server(self.dataplane, settings, reuse_port=shared)
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

        if self.rollout_controller is not None:
            # Before the first load: a restart keeps the champion and the RETIRED versions.
            try:
                await asyncio.to_thread(self.rollout_controller.refresh)
            except RepositoryMismatch as exc:
                raise ServerError(exc.message) from exc
            except StoreUnavailable as exc:
                logger.warning(
                    "rollouts: cannot read their state (%s); new versions wait for it", exc.message
                )
        if self.prediction_logger is not None:
            self.prediction_logger.start()
        await self.dataplane.start()
        if self.monitoring is not None:
            await self.monitoring.start()
        if self.rollout_controller is not None:
            await self.rollout_controller.start()
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
        follower: asyncio.Task[None] | None = None
        if self.link is not None:
            await self.link.open()
            self.link.send({"event": "ready", "rest_port": self.addresses.rest_port, "grpc_port": grpc_port})
            follower = asyncio.create_task(self._follow_supervisor(), name="supervisor-link")
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
        if follower is not None:
            follower.cancel()
        await self.dataplane.stop()
        if self.retraining is not None:
            await self.retraining.close()
        if self.rollout_controller is not None:
            await self.rollout_controller.stop()
        if self.prediction_logger is not None:
            # After the drain: every answered request goes to the log...
            await asyncio.to_thread(self.prediction_logger.stop)
        if self.monitoring is not None:
            # ...and is read from it before the store closes.
            await self.monitoring.stop()
        if self.log_stores is not None:
            self.log_stores.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        rest_sock.close()
        if self.link is not None:
            self.link.close()
        logger.info("stopped")
        return 0


class ControlPlaneSection:
    """The status page's pointer to the control plane that watches this server."""

    def __init__(self, url: str) -> None:
        self._url = url

    def html(self) -> str:
        """A link to the control plane's health page."""
        url = html.escape(self._url, quote=True)
        return (
            f'<section id="control-plane"><p>Drift, accuracy and retraining are watched by '
            f'<a href="{url}/">the control plane at {url}</a>.</p></section>'
        )


def _open_repository(settings: ServingSettings) -> ModelRepository:
    """The repository to serve: the directory, or a local copy of a remote repository.

    Raises:
        ServerError: The directory does not exist, or the URL is not supported.
    """
    if settings.repo_url is None:
        if not settings.repo.is_dir():
            raise ServerError(f"model repository {str(settings.repo)!r} does not exist or is not a directory")
        return ModelRepository(settings.repo)
    try:
        location = parse_repository(settings.repo_url)
    except StorageError as exc:
        raise ServerError(str(exc)) from None
    try:
        settings.repo.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ServerError(
            f"cannot create the repository cache {str(settings.repo)!r}: {exc.strerror}"
        ) from exc
    logger.info("serving %s from the local copy %s", location.url, settings.repo)
    return MirroredRepository(location, settings.repo)


def serve(
    settings: ServingSettings,
    on_ready: Callable[[BoundAddresses], None] | None = None,
    monitoring: MonitoringSettings | None = None,
    labelers: LabelerSettings | None = None,
    role: WorkerRole | None = None,
) -> int:
    """Builds a :class:`ModelServer` and runs it until SIGTERM or SIGINT.

    Args:
        settings: Server settings.
        on_ready: Called with the bound addresses. Defaults to printing them (a worker
            prints nothing: its supervisor does).
        monitoring: Monitoring settings. Defaults to None (no monitoring).
        labelers: The labelers' feedback tokens. Defaults to None (unauthenticated).
        role: This server's place among several workers. Defaults to None.

    Returns:
        The process exit status.
    """

    async def main() -> int:
        server = ModelServer(settings, monitoring=monitoring, labelers=labelers, role=role)
        ready = on_ready if on_ready is not None else (print_addresses if role is None else None)
        return await server.run(ready)

    # Tracing from the OTEL_* variables, per process: each worker of --workers N sets up
    # its own provider here. Off (nothing imported) unless OTEL_TRACES_EXPORTER is set.
    provider = setup_tracing(os.environ, worker=role.index if role is not None else None)
    try:
        # uvloop: a faster event loop for the REST side (uvicorn's own default); grpc.aio's
        # poller runs on it too (the end-to-end tests drive both ports of one uvloop process).
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main())
    finally:
        shutdown_tracing(provider)

"""The data plane: every request's logic, shared by REST and gRPC in both dialects.

It is the one place where a request is resolved, validated, batched, run, counted and
observed; the edges only translate wire formats to a :class:`RequestDecoder` and map a
raised :class:`~modelloop.errors.ServiceError` to a status. The path a request takes through
it, and through the edges around it, is told once, in ARCHITECTURE.md ("One request, REST"
and "One request, gRPC").

Invariants: nothing here imports HTTP or gRPC; a version is resolved once per request and
held until the answer, with no await between resolving and holding it, so an unload waits
for it; every call, answered or refused, is counted once in the request metrics; only
answered calls reach the observer.

Example:

```python
dataplane = DataPlane(registry, metrics)
await dataplane.start()
response = await dataplane.infer(
    InferRequest(model="digits", inputs={"pixels": rows}, protocol=Protocol.V2_REST)
)
await dataplane.drain(grace_s=20)
await dataplane.stop()
```
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any
from typing import Protocol as TypingProtocol

from modelloop import __version__
from modelloop.errors import ServiceError
from modelloop.serving import tracing
from modelloop.serving.errors import (
    InferenceFailed,
    ModelNotFound,
    ModelNotReady,
)
from modelloop.serving.ids import new_request_id
from modelloop.serving.metrics import ServingMetrics
from modelloop.serving.observer import InferenceObserver, NullObserver
from modelloop.serving.registry import ModelRegistry
from modelloop.serving.servable import Servable
from modelloop.serving.shared_memory import SystemSharedMemory
from modelloop.serving.statistics import VersionStatistics
from modelloop.serving.trial import RolloutTrial
from modelloop.serving.types import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelState,
    Protocol,
    VersionConfig,
    VersionStatus,
    parse_version,
    valid_request_id,
)
from modelloop.serving.validation import check_finite, validate_inputs, wanted_outputs

logger = logging.getLogger(__name__)

SERVER_NAME = "modelloop"
BASE_EXTENSIONS = ("binary_tensor_data", "model_configuration", "statistics")
"""The OIP / Triton extensions every server serves, in Triton's names: binary tensors,
``/v2/models/{m}/config`` (``ModelConfig``) and ``/v2/models/{m}/stats`` (``ModelStatistics``)."""


def choose_request_id(client_id: str | None, request_id: str | None) -> str:
    """The id of a request: the transport's header, else the request's own, else a new one.

    A candidate is kept only when :func:`~modelloop.serving.types.valid_request_id`
    accepts it, on every transport alike; a new id is 32 random hex characters.

    Args:
        client_id: ``x-request-id`` as the transport received it, or None.
        request_id: The id inside the request (the OIP ``id``), or None or ``""``.

    Returns:
        The id to log, answer with and join feedback on.
    """
    for candidate in (client_id, request_id):
        if candidate and valid_request_id(candidate):
            return candidate
    return new_request_id()


class RequestDecoder(TypingProtocol):
    """An edge's call before decoding: what :meth:`DataPlane.handle` needs from a transport.

    The data plane calls :meth:`target`, then :meth:`read` (the transport's I/O, such as
    the HTTP body), then resolves the version once and calls :meth:`decode` with its
    metadata: the TF Serving JSON row format needs the version's input names and dtypes.
    ``decode`` is synchronous on purpose: nothing may await between resolving a version
    and holding it for the request, or an unload could slip in between.

    A decoder of a body may also have ``precheck(metadata, max_rows) -> bool``, called
    before ``decode``: it refuses a body that cannot fit ``max_rows`` rows without parsing
    it, and says whether the body is large enough to decode on a thread (the data plane
    then holds the version while it does).

    Attributes:
        protocol: The front end, a label of the request metrics.
    """

    protocol: Protocol

    def target(self) -> tuple[str, str | None, str | None]:
        """The model name, the version as the client wrote it (or None) and the label (or None).

        Raises:
            ServiceError: The call names no model, or a method this server lacks.
        """
        ...

    async def read(self) -> None:
        """Receives what the call still has to receive (a body); nothing for gRPC.

        Raises:
            ServiceError: The body is too large, of the wrong type or corrupt.
        """
        ...

    def decode(self, metadata: ModelMetadata) -> InferRequest:
        """The inputs, wanted outputs, parameters and in-request id.

        Args:
            metadata: The resolved version's metadata.

        Raises:
            ServiceError: The body or message is malformed or does not fit the model.
        """
        ...


class DecodedRequest:
    """A :class:`RequestDecoder` for a request that is already decoded (in-process callers).

    Args:
        request: The request.
    """

    def __init__(self, request: InferRequest) -> None:
        self.request = request
        self.protocol = request.protocol

    def target(self) -> tuple[str, str | None, str | None]:
        """The request's model, version and label."""
        version = self.request.version
        return self.request.model, None if version is None else str(version), self.request.label

    async def read(self) -> None:
        """Nothing to receive."""

    def decode(self, metadata: ModelMetadata) -> InferRequest:
        """The request itself, as a copy, so that the caller's object is not changed."""
        return dataclasses.replace(self.request)


class DataPlane:
    """The one place for request logic; the REST and gRPC edges only translate.

    Args:
        registry: Resolves models and holds their batchers.
        metrics: Where request counts and durations go.
        observer: Receives every answered request. Defaults to a no-op.
        extensions: OIP server extensions to advertise. Defaults to :data:`BASE_EXTENSIONS`,
            plus ``model_repository`` and (with one worker) ``system_shared_memory`` when
            an admin token is set.
        on_repository_change: Called with ``("load" | "unload", model)`` after a
            repository extension call succeeded here (the workers of one server pass it
            on to the others). Defaults to None.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: ServingMetrics,
        *,
        observer: InferenceObserver | None = None,
        extensions: Sequence[str] | None = None,
        on_repository_change: Callable[[str, str], None] | None = None,
    ) -> None:
        self.registry = registry
        self.on_repository_change = on_repository_change
        self.metrics = metrics
        self.observer: InferenceObserver = observer or NullObserver()
        # Regions registered on one worker are unknown to the others, and a client's
        # register and infer calls may reach different workers.
        workers = registry.settings.workers
        self.shared_memory = SystemSharedMemory(
            unavailable=(
                f"system shared memory is off: this server runs {workers} worker processes, which "
                "would each hold their own regions; run it with --workers 1"
            )
            if workers > 1
            else None
        )
        """The system shared memory regions registered with this process."""
        if extensions is None:
            extensions = list(BASE_EXTENSIONS)
            if registry.settings.admin_token is not None:
                extensions.append("model_repository")
                if workers == 1:
                    extensions.append("system_shared_memory")
        self.extensions = list(extensions)
        self.draining = False
        self._started = False
        self._stopped = False
        self._inflight = 0
        self._idle: asyncio.Event | None = None
        self._trial = RolloutTrial(registry, stopped=lambda: self._stopped)

    # -- inference -------------------------------------------------------------------

    async def handle(self, decoder: RequestDecoder, *, client_id: str | None = None) -> InferResponse:
        """The one inference path: every transport's predict and infer calls come here.

        The steps are listed in ARCHITECTURE.md ("One request, REST"). What holds for every
        call: the version is resolved once and held until the answer; the request id is
        ``client_id``, else the id in the request, else a new one, each kept only if
        :func:`~modelloop.serving.types.valid_request_id`; every call, answered or refused at
        any step, is timed and counted once in the request metrics; every answered call goes
        to the observer.

        Args:
            decoder: The edge's undecoded call.
            client_id: The transport's request id header or metadata, as sent. Defaults
                to None.

        Returns:
            The response; its ``id`` is the chosen request id.

        Raises:
            ServiceError: Whatever failed, with ``request_id`` set to the chosen id (or,
                before the request decoded, the client's valid id or a new one), so that
                the edge can send it back. ModelNotFound, ModelNotReady, InvalidInput,
                QueueFull and InferenceFailed are the usual ones.
        """
        start = time.perf_counter()
        model = ""
        version: int | None = None
        request: InferRequest | None = None
        code = "OK"
        decode: Any = None  # the decode span while it is open (tracing on)
        held: Servable | None = None  # the version, held while a large body decodes on a thread
        self._enter()
        try:
            # Draining only turns readiness off: requests the transports still accept
            # during the grace period are served, so no client sees a 503 for a
            # shutdown it could not know about. After stop() nothing is served.
            if self._stopped:
                raise ModelNotReady("the server is shutting down and takes no new requests")
            model, version_text, label = decoder.target()
            pinned = parse_version(version_text)
            if tracing.TRACER is not None:
                decode = tracing.start_decode(decoder.protocol)
            await decoder.read()
            # With --max-loaded-models: load the version now if it is not in memory.
            await self.registry.ensure_loaded(model, pinned, label)
            # From here to servable.use() nothing awaits, so the version cannot start
            # unloading between resolving it and holding it for this request.
            servable = self.registry.resolve(model, pinned, label)
            version = servable.version
            metadata = servable.metadata
            precheck = getattr(decoder, "precheck", None)
            if precheck is not None and precheck(metadata, servable.batcher.settings.max_batch_size):
                # A large body (checked against the row limit first) is decoded on a thread,
                # so the event loop, and the probes, keep going; the version is held meanwhile.
                held = servable.use().__enter__()
                decoded: InferRequest = await asyncio.to_thread(decoder.decode, metadata)
            else:
                decoded = decoder.decode(metadata)
            request = decoded
            # The target is authoritative: the decoder need not repeat the path's fields.
            request.model, request.version, request.label = model, pinned, label
            request.id = choose_request_id(client_id, request.id)
            signature = request.signature_name
            if signature and signature != metadata.signature_name:
                raise ModelNotFound(
                    f"model {model!r} has no signature {signature!r}; it serves {metadata.signature_name!r}"
                )
            limit = servable.batcher.settings.max_batch_size
            request.inputs = validate_inputs(request.inputs, metadata, limit)
            if servable.refuse_nan:
                check_finite(request.inputs, model)
            wanted = wanted_outputs(request, metadata)
            if decode is not None:
                request.trace = tracing.decoded(decode, model, version, request.id)
                decode = None
            rollouts = self.registry.rollouts
            choice = (
                rollouts.choose(model, version, request.id)
                if rollouts is not None and rollouts.router is not None and pinned is None and label is None
                else None
            )
            if choice is None or rollouts is None or rollouts.router is None:
                with servable.use():
                    outputs = await servable.batcher.predict(request.inputs)
            else:
                outputs, version = await self._trial.serve(servable, choice, request, rollouts.router)
            response = InferResponse(
                model=model,
                version=version,
                outputs={name: outputs[name] for name in wanted},
                id=request.id,
            )
        except ServiceError as exc:
            code = exc.code.value
            exc.request_id = request.id if request is not None else choose_request_id(client_id, None)
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"  # the client went away; its rows still ran if the batch had started
            raise
        except Exception as exc:
            code = InferenceFailed.code.value
            logger.exception("unexpected error serving model %s", model)
            error = InferenceFailed(f"model {model!r} failed: {type(exc).__name__}: {exc}")
            error.request_id = request.id if request is not None else choose_request_id(client_id, None)
            raise error from exc
        finally:
            if held is not None:
                held.__exit__(None, None, None)
            self._leave()
            if tracing.TRACER is not None:
                tracing.finished(decode, code)
            seconds = time.perf_counter() - start
            self.metrics.observe_request(self._model_label(model), version, decoder.protocol, code, seconds)
        response.seconds = seconds
        try:
            self.observer.observe(request, response)
        except Exception:  # monitoring must never fail a request that succeeded
            logger.exception("inference observer failed")
        return response

    async def infer(self, request: InferRequest) -> InferResponse:
        """Runs a request that is already decoded (in-process callers); see :meth:`handle`.

        Args:
            request: The request; its ``model``, ``version`` and ``label`` pick the version.

        Returns:
            The response.
        """
        return await self.handle(DecodedRequest(request))

    def _model_label(self, model: str) -> str:
        # Clients choose model names; only known ones become label values, so a scan of
        # made-up names cannot blow up the metrics' cardinality.
        return model if self.registry.has_model(model) else ""

    # -- metadata and status -----------------------------------------------------------

    def metadata(self, name: str, version: int | None = None, label: str | None = None) -> ModelMetadata:
        """The metadata of the resolved version (pinned, labelled or latest).

        Raises:
            ModelNotFound: Unknown model, version or label.
            ModelNotReady: The version is not AVAILABLE.
        """
        try:
            return self.registry.resolve(name, version, label).metadata
        except ModelNotReady:
            # Not in memory (--max-loaded-models): its model.json answers, without loading it.
            unloaded = self.registry.unloaded_metadata(name, version) if label is None else None
            if unloaded is None:
                raise
            return unloaded

    def model_config(self, name: str, version: int | None = None) -> VersionConfig:
        """How the resolved version is served: runtime set-up and batching, beside its metadata.

        Raises:
            ModelNotFound: Unknown model or version.
            ModelNotReady: The version is not AVAILABLE.
        """
        servable = self.registry.resolve(name, version, None)
        batching = servable.batcher.settings
        parameters = dict(servable.runtime.parameters)
        parameters["dynamic_batching"] = "true" if batching.enabled else "false"
        for key in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"):
            parameters[key] = str(getattr(batching, key))
        return VersionConfig(servable.metadata, parameters)

    def model_status(
        self, name: str, version: int | None = None, label: str | None = None
    ) -> list[VersionStatus]:
        """States of one version, or of every known version when neither is given.

        Raises:
            ModelNotFound: Unknown model, version or label.
        """
        if label is not None:
            labels = self.registry.version_labels(name)
            if label not in labels:
                raise ModelNotFound(f"model {name!r} has no version label {label!r}")
            version = labels[label]
        if version is not None:
            return [self.registry.status(name, version)]
        return self.registry.statuses(name)

    def model_ready(self, name: str, version: int | None = None, label: str | None = None) -> bool:
        """Whether the model (or that version) can serve now.

        Raises:
            ModelNotFound: Unknown model, version or label.
        """
        try:
            self.registry.resolve(name, version, label)
        except ModelNotReady:
            # Not in memory but loads on the next request (--max-loaded-models): ready.
            if label is not None or not self.registry.loads_on_request(name, version):
                return False
        return not self.draining

    def live(self) -> bool:
        """True while the process serves at all (until :meth:`stop`)."""
        return not self._stopped

    def ready(self) -> bool:
        """True when started, not draining, and every enabled model has an AVAILABLE version."""
        if not self._started or self.draining or self._stopped:
            return False
        if not self.registry.repository_synced:
            return False  # a remote repository not read yet: its models are unknown
        for name in self.registry.model_names():
            if not self.registry.is_enabled(name):
                continue
            try:
                self.registry.resolve(name)
            except ServiceError:
                if not self.registry.loads_on_request(name):
                    return False
        return True

    def repository_error(self) -> str:
        """Why a remote repository could not be read at the last poll; ``""`` when it could."""
        return self.registry.repository_error

    def server_metadata(self) -> dict[str, Any]:
        """OIP server metadata: name, version and extensions."""
        return {"name": SERVER_NAME, "version": __version__, "extensions": list(self.extensions)}

    def statistics(self, name: str | None = None, version: int | None = None) -> list[VersionStatistics]:
        """The statistics extension: figures per version since the server started.

        Args:
            name: One model, or None for every model.
            version: One version of ``name``, or None for its AVAILABLE versions and
                those that served requests.

        Raises:
            ModelNotFound: Unknown model or version.
        """
        stats = self.metrics.statistics
        if name is not None and version is not None:
            self.registry.status(name, version)  # unknown: ModelNotFound
            return [stats.snapshot(name, version)]
        names = [name] if name is not None else self.registry.model_names()
        result: list[VersionStatistics] = []
        for model in names:
            available = {s.version for s in self.registry.statuses(model) if s.state is ModelState.AVAILABLE}
            for v in sorted(available.union(stats.versions(model))):
                result.append(stats.snapshot(model, v))
        return result

    def repository_index(self) -> list[dict[str, str]]:
        """The repository extension's index: ``[{"name", "version", "state", "reason"}]``."""
        return self.registry.index()

    async def load_model(self, name: str) -> None:
        """Loads a model now (repository extension). See :meth:`ModelRegistry.load_model`."""
        await self.registry.load_model(name)
        if self.on_repository_change is not None:
            self.on_repository_change("load", name)

    async def unload_model(self, name: str) -> None:
        """Unloads a model (repository extension). See :meth:`ModelRegistry.unload_model`."""
        await self.registry.unload_model(name)
        if self.on_repository_change is not None:
            self.on_repository_change("unload", name)

    def model_names(self) -> list[str]:
        """Every model in the repository, sorted."""
        return self.registry.model_names()

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Loads the repository and starts polling it."""
        await self.registry.start()
        self._started = True

    async def drain(self, grace_s: float) -> int:
        """Turns ready off and waits for the requests in flight.

        Requests that still arrive while draining are served; the edges stop taking
        connections at the same time, and :meth:`stop` ends serving.

        Args:
            grace_s: The longest wait; requests still running after it are left to the
                edges' shutdown.

        Returns:
            How many requests were still running when it stopped waiting: 0 after a
            clean drain, more when the grace period ran out.
        """
        self.draining = True
        idle = self._get_idle()
        if self._inflight:
            try:
                await asyncio.wait_for(idle.wait(), grace_s)
            except TimeoutError:
                logger.warning("drain: %d requests still running after %.1f s", self._inflight, grace_s)
        return self._inflight

    async def stop(self) -> None:
        """Stops polling and unloads every model."""
        self.draining = True
        self._stopped = True
        await self.registry.stop()
        self.shared_memory.close()

    def _get_idle(self) -> asyncio.Event:
        if self._idle is None:
            self._idle = asyncio.Event()
            if self._inflight == 0:
                self._idle.set()
        return self._idle

    def _enter(self) -> None:
        self._inflight += 1
        self._get_idle().clear()

    def _leave(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._get_idle().set()

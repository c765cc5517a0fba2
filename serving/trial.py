"""Serving a model whose new version is on trial: the candidate's share, its fallback, shadow copies.

The data plane hands an unpinned request here when the rollout router chose a version for it
(:class:`~modelloop.serving.rollout.RouteChoice`). The candidate answers its share; if it fails,
the champion answers and the failure counts against the candidate, so a bad candidate fails no
client request. In shadow mode the champion answers and the candidate gets a copy after the
answer has gone, off the request path, with the agreement of the two counted.

Invariants: both versions are held before the first await, as every request holds its version;
at most :data:`MAX_SHADOW_INFLIGHT` shadow copies run at once (beyond that a copy is skipped, so
a slow candidate never builds up work behind the champion's answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import numpy as np

from modelloop.errors import ServiceError
from modelloop.serving.registry import ModelRegistry
from modelloop.serving.rollout import RouteChoice
from modelloop.serving.servable import Servable
from modelloop.serving.types import InferRequest, ModelMetadata, RolloutRouter

logger = logging.getLogger(__name__)

MAX_SHADOW_INFLIGHT = 64
"""Shadow copies running at once."""


def agreement(
    reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray], metadata: ModelMetadata
) -> tuple[int, int]:
    """How many rows of two answers to one request agree, on the model's first output.

    Rows agree when their top class is the same (an output with several columns), or when
    their values are within 5 % (one column: a regressor or a binary probability rounds to
    the same side).

    Returns:
        ``(rows, agreed)``.
    """
    name = metadata.outputs[0].name
    a = np.asarray(reference.get(name))
    b = np.asarray(outputs.get(name))
    rows = int(a.shape[0]) if a.ndim else 1
    if a.shape != b.shape or a.dtype.kind not in "fiu" or b.dtype.kind not in "fiu":
        return rows, 0
    if a.ndim == 2 and a.shape[1] > 1:
        return rows, int(np.sum(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
    flat_a, flat_b = a.reshape(rows, -1), b.reshape(rows, -1)
    if metadata.task == "binary":
        same = (flat_a >= 0.5) == (flat_b >= 0.5)
    else:
        same = np.isclose(flat_a, flat_b, rtol=0.05, atol=1e-6)
    return rows, int(np.sum(np.all(same, axis=1)))


class RolloutTrial:
    """Answers the requests of models in a rollout and runs their shadow copies.

    Args:
        registry: Where the other version of a rollout pair is resolved.
        stopped: Whether the data plane has stopped (no new shadow copies then).
    """

    def __init__(self, registry: ModelRegistry, *, stopped: Callable[[], bool]) -> None:
        self.registry = registry
        self._stopped = stopped
        self._shadows: set[asyncio.Task[None]] = set()

    def sibling(self, servable: Servable, version: int) -> Servable | None:
        """The other version of a rollout pair, if it is AVAILABLE and takes the same inputs."""
        try:
            other = self.registry.resolve(servable.name, version)
        except ServiceError:
            return None
        same = other.metadata.inputs == servable.metadata.inputs and [
            spec.name for spec in other.metadata.outputs
        ] == [spec.name for spec in servable.metadata.outputs]
        return other if same else None

    async def serve(
        self, champion: Servable, choice: RouteChoice, request: InferRequest, router: RolloutRouter
    ) -> tuple[dict[str, np.ndarray], int]:
        """Serves one unpinned request of a model whose rollout is on trial.

        The candidate answers the requests of its share; when it fails, the champion
        answers instead (the failure counts against the candidate), so a bad candidate
        fails no client request. In shadow mode the champion answers and the candidate
        gets a copy after the answer has gone. Both versions are held before the first
        await, as every request holds its version.

        Returns:
            The outputs and the version that produced them.
        """
        model = champion.name
        answer = champion
        if choice.answer != champion.version:
            answer = self.sibling(champion, choice.answer) or champion
        shadow = self.sibling(champion, choice.shadow) if choice.shadow is not None else None
        with contextlib.ExitStack() as held:
            held.enter_context(champion.use())
            if answer is not champion:
                held.enter_context(answer.use())
            start = time.perf_counter()
            try:
                outputs = await answer.batcher.predict(request.inputs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                router.record(model, answer.version, ok=False, seconds=time.perf_counter() - start)
                if answer is champion:
                    raise
                logger.warning(
                    "model %s: candidate version %s failed (%s: %s); the champion answers",
                    model,
                    answer.version,
                    type(exc).__name__,
                    exc,
                )
                answer = champion
                start = time.perf_counter()
                outputs = await champion.batcher.predict(request.inputs)
            router.record(model, answer.version, ok=True, seconds=time.perf_counter() - start)
        if shadow is not None:
            self.start_shadow(shadow, request.inputs, outputs, router)
        return outputs, answer.version

    def start_shadow(
        self,
        shadow: Servable,
        inputs: dict[str, np.ndarray],
        reference: dict[str, np.ndarray],
        router: RolloutRouter,
    ) -> None:
        """Sends a copy of a request to the shadow version, after the answer, off the request path."""
        if len(self._shadows) >= MAX_SHADOW_INFLIGHT or self._stopped():
            return
        hold = shadow.use()
        hold.__enter__()  # held now, before anything awaits, released by the task

        async def run() -> None:
            start = time.perf_counter()
            try:
                try:
                    outputs = await shadow.batcher.predict(inputs)
                except Exception:  # noqa: BLE001 - a shadow failure is counted, never raised
                    router.record_shadow(
                        shadow.name,
                        shadow.version,
                        ok=False,
                        seconds=time.perf_counter() - start,
                        rows=0,
                        agreed=0,
                    )
                    return
                seconds = time.perf_counter() - start
                rows, agreed = agreement(reference, outputs, shadow.metadata)
                router.record_shadow(
                    shadow.name, shadow.version, ok=True, seconds=seconds, rows=rows, agreed=agreed
                )
            finally:
                hold.__exit__(None, None, None)

        task = asyncio.get_running_loop().create_task(run(), name=f"shadow-{shadow.name}-{shadow.version}")
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

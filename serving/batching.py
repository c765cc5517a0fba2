"""Dynamic batching of one model version's requests.

A request that finds the batcher idle (nothing queued, no batch running) and not under
load runs at once: waiting for company that is not coming would only add
``batch_timeout_micros`` to every request of a lightly loaded server. The batcher is under
load while requests arrive during its calls; then requests queue up and are merged along
axis 0 into one runtime call of at most ``max_batch_size`` rows, or whatever has arrived
``batch_timeout_micros`` after the first of them, and the outputs are split back in order
(TF Serving's rule, applied only under load). On a busy core that wait is what lets a batch
fill: the requests behind it are still being decoded on the same CPU. Load ends with the
first call during which nobody arrived.

The synchronous runtime runs on a thread pool of ``num_batch_threads`` threads that the
batcher owns, so the event loop never blocks on inference, except for tiny models: the
batcher times every call, and while a call takes less than ``inline_max_micros`` it runs
on the event loop itself, because handing it to a thread and back costs more than the
call (the digits model answers in about 10 µs; the hop costs tens of µs and a GIL
handover). An inline batch is the requests of one loop turn, and under steady load it
waits up to a millisecond for more (``_schedule_inline_flush``): grpc.aio hands the loop
one call per turn, and each runtime call releases the GIL to grpc's threads.

A batch that fails is retried request by request, on the same thread, before anyone is
answered: only the requests that fail alone get an error, and each error names only its own
request's rows, never another client's (a model's message often quotes the input it choked
on). The cost falls on failing batches only: a batch of ``n`` requests that fails takes
``n + 1`` runtime calls instead of one, and a model with side effects sees the good requests'
rows twice.

The queue is bounded in rows: at most ``max_enqueued_batches * max_batch_size`` rows may
wait. Counting rows rather than requests keeps the bound meaningful whether clients send
one row or ``max_batch_size`` rows per request. A request that would overflow it gets
:class:`~modelloop.serving.errors.QueueFull` at once instead of a late timeout.

Example:

```python
batcher = DynamicBatcher(runtime.predict, BatchingSettings(max_batch_size=8))
outputs = await batcher.predict({"pixels": np.zeros((2, 64), np.float32)})
await batcher.close()
```
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelloop.serving import tracing
from modelloop.serving.errors import InferenceFailed, ModelNotReady, QueueFull, ServingError
from modelloop.serving.metrics import ServingMetrics
from modelloop.serving.outcomes import (
    Pending,
    Tensors,
    check_rows,
    fail_all,
    failure,
    first_error,
    settle,
)
from modelloop.serving.settings import BatchingSettings

logger = logging.getLogger(__name__)

PredictFn = Callable[[Tensors], Tensors]


@dataclass(slots=True)
class _LoopState:
    """The asyncio side of a batcher, made on the loop that serves its first request.

    ``wakeup`` is set when a request is queued and when a batch finishes (a thread is free).
    """

    wakeup: asyncio.Event
    collector: asyncio.Task[None] | None = None


# Calls timed per decision whether a model runs inline: the median of each window of this
# many calls decides, so a call stretched by preemption or a page fault does not.
_TIMING_WINDOW = 16
INLINE_GATHER_MAX_S = 0.001
"""The longest an inline batch waits for company under load (``batch_timeout_micros`` if shorter)."""
INLINE_GATHER_BACKOFF = 64
"""The most inline flushes that run at once after gather windows that caught nobody."""


def _rows(inputs: Tensors) -> int:
    if not inputs:
        raise ServingError("a batched request needs at least one input tensor")
    return int(next(iter(inputs.values())).shape[0])


class DynamicBatcher:
    """Merges concurrent requests of one model version into batched runtime calls.

    Args:
        predict: The runtime's synchronous ``predict``; called on the batcher's threads.
        settings: Batching knobs. With ``enabled=False`` every request is its own call,
            still on the bounded thread pool and still behind the bounded queue.
        metrics: Where batch sizes and queue times go; None = not recorded.
        model: Model name, for metrics and messages. Defaults to "".
        version: Model version, for metrics and messages. Defaults to 0.
        inline_gather_max_s: The longest an inline batch waits for company under load
            (``batch_timeout_micros`` if shorter). Defaults to :data:`INLINE_GATHER_MAX_S`.
    """

    def __init__(
        self,
        predict: PredictFn,
        settings: BatchingSettings,
        *,
        metrics: ServingMetrics | None = None,
        model: str = "",
        version: int = 0,
        inline_gather_max_s: float = INLINE_GATHER_MAX_S,
    ) -> None:
        self._predict = predict
        self.settings = settings
        self._metrics = metrics
        self.model = model
        self.version = version
        self.capacity = settings.max_enqueued_batches * settings.max_batch_size
        self._executor = ThreadPoolExecutor(
            max_workers=settings.num_batch_threads, thread_name_prefix=f"batch-{model}-{version}"
        )
        self._pending: collections.deque[Pending] = collections.deque()
        self._queued_rows = 0
        self._closed = False
        # asyncio objects are made on first use, on the loop that serves requests.
        self._state: _LoopState | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._active = 0  # runtime calls in progress (threads taken, or one inline call)
        self._arrived_busy = False  # a request arrived while a call ran
        self._under_load = False  # requests kept arriving during the latest calls
        # Wall times of recent runtime calls, and the decision they led to. Appended from
        # the batch threads too; a list append is atomic under the GIL.
        self._timings: list[float] = []
        self._inline_s = settings.inline_max_micros / 1e6
        self.runs_inline = False
        """Whether calls run on the event loop now: the median of the last measured calls
        took under ``inline_max_micros``."""
        self._flush_scheduled = False
        # The inline flush's gather window under load (see _schedule_inline_flush).
        self._gather_s = min(settings.batch_timeout_micros / 1e6, inline_gather_max_s)
        self._gather: asyncio.TimerHandle | None = None
        self._gather_skip = 0
        self._gather_misses = 0
        self._last_flush = -math.inf

    @property
    def queued_rows(self) -> int:
        """Rows waiting for a batch (not yet running)."""
        return self._queued_rows

    def _timed(self, inputs: Tensors) -> Tensors:
        start = time.perf_counter()
        ok = False
        try:
            outputs = self._predict(inputs)
            ok = True
            return outputs
        finally:
            seconds = time.perf_counter() - start
            if self._metrics is not None:
                self._metrics.observe_execution(self.model, self.version, _rows(inputs), seconds, ok=ok)
            timings = self._timings
            timings.append(seconds)
            if len(timings) >= _TIMING_WINDOW:
                median = sorted(timings)[len(timings) // 2]
                self.runs_inline = median < self._inline_s
                timings.clear()

    async def predict(self, inputs: Tensors) -> Tensors:
        """Runs ``inputs`` as part of a batch and returns this request's rows of the outputs.

        Args:
            inputs: Validated tensors that share their first (batch) dimension.

        Returns:
            The outputs for exactly these rows, in order.

        Raises:
            QueueFull: The queue cannot take these rows now.
            ModelNotReady: The batcher is closed (its version is unloading).
            InferenceFailed: The runtime failed on these rows (a failed batch is retried request
                by request, so this names only this request's rows).
        """
        if self._closed:
            raise ModelNotReady(f"model {self.model!r} version {self.version} is unloading")
        rows = _rows(inputs)
        if self._queued_rows + rows > self.capacity:
            raise QueueFull(
                f"the queue of model {self.model!r} version {self.version} is full "
                f"({self._queued_rows} of {self.capacity} rows waiting); retry later"
            )
        if not self.settings.enabled:
            return await self._predict_unbatched(inputs, rows)
        loop = asyncio.get_running_loop()
        state = self._ensure_collector(loop)
        inline = self.runs_inline
        if not inline and not self._pending and not self._active and not self._under_load:
            # Idle and no load: nobody to batch with, so no reason to wait.
            if tracing.TRACER is not None:
                return await self._traced_run_now(inputs, rows, state)
            return await self._run_now(inputs, rows, state)
        if self._active:
            self._arrived_busy = True
        item = Pending(inputs, rows, loop.create_future())
        if tracing.TRACER is not None:
            item.trace = tracing.mark()
        self._pending.append(item)
        self._queued_rows += rows
        if inline:
            # A tiny model: no thread, no timeout. The batch is every request that reaches
            # the batcher in this turn of the event loop (under load, the requests whose
            # bytes arrived together), run once the turn's other callbacks have run.
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._schedule_inline_flush(loop)
            elif self._gather is not None and self._queued_rows >= self.settings.max_batch_size:
                # A full batch has nothing more to wait for.
                self._gather.cancel()
                self._gather = None
                loop.call_soon(self._flush_inline)
        else:
            state.wakeup.set()
        try:
            return await item.future
        except asyncio.CancelledError:
            # Still waiting: take it out so it neither runs nor holds queue space. Already
            # taken: its batch runs anyway and simply skips this finished future.
            with contextlib.suppress(ValueError):
                self._pending.remove(item)
                self._queued_rows -= item.rows
            raise

    async def close(self) -> None:
        """Stops the batcher after the batches already running; new calls get ModelNotReady.

        Requests still waiting in the queue are failed with ModelNotReady; the registry only
        closes a batcher once its in-flight requests are done, so normally there are none.
        """
        self._closed = True
        if self._gather is not None:
            self._gather.cancel()
            self._gather = None
            self._flush_scheduled = False
        if self._state is not None and self._state.collector is not None:
            self._state.collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._state.collector
            self._state.collector = None
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(
                    ModelNotReady(f"model {self.model!r} version {self.version} was unloaded")
                )
        self._queued_rows = 0
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        # Joining the threads can take as long as a last batch; keep it off the loop.
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def _traced_run_now(self, inputs: Tensors, rows: int, state: _LoopState | None) -> Tensors:
        """:meth:`_run_now` inside a batch span of its own (tracing on)."""
        marked = tracing.mark()
        span = tracing.start_batch(
            [marked] if marked is not None else [], self.model, self.version, rows, self.runs_inline
        )
        try:
            outputs = await self._run_now(inputs, rows, state)
        except BaseException as exc:
            tracing.end_batch(span, exc)
            raise
        tracing.end_batch(span)
        return outputs

    async def _run_now(self, inputs: Tensors, rows: int, state: _LoopState | None) -> Tensors:
        """Runs one request's rows as a call of their own, inline or on a thread."""
        metrics = self._metrics
        if metrics is not None:
            metrics.observe_batch(self.model, self.version, rows)
            metrics.observe_queue(self.model, self.version, 0.0)
        self._active += 1
        if self.runs_inline:
            try:
                outputs = self._timed(inputs)
            except ServingError:
                raise
            except Exception as exc:  # any runtime error becomes InferenceFailed
                raise self._logged_failure(rows, exc) from exc
            finally:
                self._release(state)
            check_rows(outputs, rows, self.model, self.version)
            return outputs
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._executor, self._timed, inputs)
        except RuntimeError as exc:  # executor shut down under us
            self._release(state)
            raise ModelNotReady(f"model {self.model!r} version {self.version} was unloaded") from exc
        # The thread is free only when the call returns, even if this request is cancelled.
        future.add_done_callback(lambda _: self._release(state))
        try:
            outputs = await asyncio.shield(future)
        except ServingError:
            raise
        except Exception as exc:  # any runtime error becomes InferenceFailed
            raise self._logged_failure(rows, exc) from exc
        check_rows(outputs, rows, self.model, self.version)
        return outputs

    def _release(self, state: _LoopState | None) -> None:
        self._active -= 1
        if not self._active:
            self._under_load = self._arrived_busy or bool(self._pending)
            self._arrived_busy = False
        if state is not None:
            state.wakeup.set()  # a thread is free: queued requests may go

    def _schedule_inline_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """Runs the inline batch after this loop turn, or, under load, once company had time to come.

        Requests that reach the batcher in one turn of the event loop batch by themselves.
        Under steady load that is not enough on every front end: grpc.aio hands the loop
        one new call at a time, so each turn holds one request, and each runtime call
        costs a round of the GIL with grpc's own threads (ONNX Runtime releases it), which
        is worth several requests' Python. So while calls keep coming (the last flush is
        less than two gather windows old), the flush waits up to one window (the batch
        timeout, at most :data:`INLINE_GATHER_MAX_S`) for the next requests. A window
        that gathered nobody turns the wait off for 2, 4, ... flushes, up to
        :data:`INLINE_GATHER_BACKOFF` (a lone client's requests run at once but for one
        in that many); a window that gathered company resets it.
        """
        window = self._gather_s
        if window and not self._gather_skip and time.monotonic() - self._last_flush < 2 * window:
            self._gather = loop.call_later(window, self._flush_inline)
        else:
            loop.call_soon(self._flush_inline)

    def _flush_inline(self) -> None:
        self._flush_scheduled = False
        if self._gather is not None:
            self._gather = None
            if len(self._pending) > 1:
                self._gather_misses = 0
            else:
                # Nobody came: stop waiting for a while, the longer the more often it happens
                # (a lone client: one request in INLINE_GATHER_BACKOFF waits).
                self._gather_misses += 1
                self._gather_skip = min(INLINE_GATHER_BACKOFF, 2**self._gather_misses)
        elif self._gather_skip:
            self._gather_skip -= 1
        self._last_flush = time.monotonic()
        while self._pending:
            _, count = self._fitting()
            batch = [self._pending.popleft() for _ in range(count)]
            self._queued_rows -= sum(item.rows for item in batch)
            self._run_batch(batch, time.monotonic())

    async def _predict_unbatched(self, inputs: Tensors, rows: int) -> Tensors:
        # Batching off: every request is its own call, behind the bounded queue and the
        # bounded pool (the executor queues calls beyond num_batch_threads).
        self._queued_rows += rows
        try:
            if tracing.TRACER is not None:
                return await self._traced_run_now(inputs, rows, None)
            return await self._run_now(inputs, rows, None)
        finally:
            self._queued_rows -= rows

    def _ensure_collector(self, loop: asyncio.AbstractEventLoop) -> _LoopState:
        state = self._state
        if state is not None and state.collector is not None and not state.collector.done():
            return state
        state = _LoopState(asyncio.Event())
        state.collector = loop.create_task(self._collect(state), name=f"batcher-{self.model}-{self.version}")
        self._state = state
        return state

    async def _collect(self, state: _LoopState) -> None:
        while True:
            batch = await self._next_batch(state.wakeup)
            # Taken before the dispatch task starts, so that neither the next batch nor an
            # idle request overtakes it for the thread.
            self._active += 1
            task = asyncio.get_running_loop().create_task(self._dispatch(batch, state))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _next_batch(self, wakeup: asyncio.Event) -> list[Pending]:
        max_rows = self.settings.max_batch_size
        timeout_s = self.settings.batch_timeout_micros / 1e6
        threads = self.settings.num_batch_threads
        while True:
            # A batch forms only when a thread can take it: while every thread is busy,
            # requests pile up and the next batch is fuller (TF Serving's behaviour).
            while not self._pending or self._active >= threads:
                wakeup.clear()
                await wakeup.wait()
            # Whatever is queued arrived under load (an idle batcher runs requests at once),
            # so the first of them may wait up to the timeout for company.
            deadline = self._pending[0].enqueued + timeout_s
            while self._pending:
                rows, count = self._fitting()
                if rows >= max_rows or count < len(self._pending):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                wakeup.clear()
                # asyncio.timeout rather than wait_for: no extra Task per wait (5 % of the loop's
                # samples under load went to wait_for's task setup).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await wakeup.wait()
            if not self._pending or self._active >= threads:
                continue  # everyone waiting was cancelled, or the thread went to someone else
            _, count = self._fitting()
            batch = [self._pending.popleft() for _ in range(count)]
            self._queued_rows -= sum(item.rows for item in batch)
            return batch

    def _fitting(self) -> tuple[int, int]:
        # Leading requests that fit in one batch; the first always fits (validation keeps
        # every request at or under max_batch_size rows).
        rows = count = 0
        for item in self._pending:
            if count and rows + item.rows > self.settings.max_batch_size:
                break
            rows += item.rows
            count += 1
        return rows, count

    async def _dispatch(self, batch: list[Pending], state: _LoopState) -> None:
        released = False
        try:
            start = time.monotonic()
            if self.runs_inline:
                self._run_batch(batch, start)
                return
            live, merged, rows = self._merge(batch, start)
            if not live:
                return
            span = self._start_span(live, rows, False) if tracing.TRACER is not None else None
            parts = [item.inputs for item in live]
            future = asyncio.get_running_loop().run_in_executor(
                self._executor, self._call_batch, merged, rows, parts
            )
            # The thread stays taken until the call returns, even if close() cancels us.
            future.add_done_callback(lambda _: self._release(state))
            released = True
            try:
                outcome = await future
            except BaseException as exc:
                if span is not None:
                    tracing.end_batch(span, exc)
                if not isinstance(exc, Exception):
                    raise
                self._fail(live, rows, exc)
                return
            if span is not None:
                tracing.end_batch(span, None if isinstance(outcome, dict) else first_error(outcome))
            settle(live, outcome, self.model, self.version)
        finally:
            if not released:
                self._release(state)

    def _merge(self, batch: list[Pending], start: float) -> tuple[list[Pending], Tensors, int]:
        """The live requests of a batch, their inputs concatenated, and their row count."""
        live = [item for item in batch if not item.future.done()]
        rows = sum(item.rows for item in live)
        if not live:
            return live, {}, 0
        if self._metrics is not None:
            self._metrics.observe_batch(self.model, self.version, rows)
            for item in live:
                self._metrics.observe_queue(self.model, self.version, start - item.enqueued)
        merged = (
            live[0].inputs
            if len(live) == 1
            else {name: np.concatenate([item.inputs[name] for item in live]) for name in live[0].inputs}
        )
        return live, merged, rows

    def _run_batch(self, batch: list[Pending], start: float) -> None:
        """Runs a batch on the event loop (a tiny model) and answers its requests."""
        live, merged, rows = self._merge(batch, start)
        if not live:
            return
        span = self._start_span(live, rows, True) if tracing.TRACER is not None else None
        self._active += 1
        try:
            outcome = self._call_batch(merged, rows, [item.inputs for item in live])
        except Exception as exc:  # noqa: BLE001 - a single request's failure
            if span is not None:
                tracing.end_batch(span, exc)
            self._fail(live, rows, exc)
            return
        finally:
            self._active -= 1
        if span is not None:
            tracing.end_batch(span, None if isinstance(outcome, dict) else first_error(outcome))
        settle(live, outcome, self.model, self.version)

    def _start_span(self, live: list[Pending], rows: int, inline: bool) -> Any:
        """The batch span of a queued batch, linked to its requests (tracing on)."""
        marks = [item.trace for item in live if item.trace is not None]
        return tracing.start_batch(marks, self.model, self.version, rows, inline)

    def _call_batch(
        self, merged: Tensors, rows: int, parts: list[Tensors]
    ) -> Tensors | list[Tensors | Exception]:
        """Runs a batch; if it fails and holds several requests, runs each request alone.

        Returns the batch's outputs, or one outcome per request (its outputs or its own
        error) after a failed batch. A batch of one request raises its error.
        """
        try:
            outputs = self._timed(merged)
            check_rows(outputs, rows, self.model, self.version)
            return outputs
        except Exception as exc:
            if len(parts) == 1:
                raise
            batch_error = exc
        outcomes: list[Tensors | Exception] = []
        for inputs in parts:
            try:
                outputs = self._timed(inputs)
                check_rows(outputs, _rows(inputs), self.model, self.version)
                outcomes.append(outputs)
            except Exception as exc:  # noqa: BLE001 - this request's own outcome
                outcomes.append(exc)
        failed = sum(isinstance(outcome, Exception) for outcome in outcomes)
        logger.warning(
            "model %s version %s failed on a batch of %d rows (%d requests): %s: %s; "
            "retried each request alone: %d failed",
            self.model,
            self.version,
            rows,
            len(parts),
            type(batch_error).__name__,
            batch_error,
            failed,
        )
        return outcomes

    def _logged_failure(self, rows: int, exc: BaseException) -> InferenceFailed:
        # A model's own error is the operator's to see, as a batch's is in _fail.
        logger.warning(
            "model %s version %s failed on a call of %d rows: %s: %s",
            self.model,
            self.version,
            rows,
            type(exc).__name__,
            exc,
        )
        return failure(self.model, self.version, rows, exc)

    def _fail(self, live: list[Pending], rows: int, exc: Exception) -> None:
        logger.warning(
            "model %s version %s failed on a batch of %d rows: %s", self.model, self.version, rows, exc
        )
        fail_all(live, self.model, self.version, rows, exc)

"""A batch's outcome handed back to the requests that waited for it.

The batcher (:mod:`~modelloop.serving.batching`) merges requests into one runtime call; here
its outputs are split back in order, each waiter gets its rows, and a failure becomes an
error that names the model, the version and the batch's size but never another request's
data. Each waiter gets an exception object of its own (raising one appends to its
traceback).
"""

from __future__ import annotations

import asyncio
import copy
import time
from dataclasses import dataclass, field

import numpy as np

from modelloop.serving import tracing
from modelloop.serving.errors import InferenceFailed, ServingError

Tensors = dict[str, np.ndarray]


@dataclass(slots=True, eq=False)
class Pending:
    """One queued request: its inputs, rows and the future its caller awaits."""

    inputs: Tensors
    rows: int
    future: asyncio.Future[Tensors]
    enqueued: float = field(default_factory=time.monotonic)
    trace: tracing.Mark | None = None  # the request's span and wait start, when tracing is on


def first_error(outcomes: list[Tensors | Exception]) -> Exception | None:
    """The first failed request's exception in a request-by-request outcome, or None."""
    return next((outcome for outcome in outcomes if isinstance(outcome, Exception)), None)


def failure(model: str, version: int, rows: int, exc: BaseException) -> InferenceFailed:
    """A model's own error as the INTERNAL failure its callers get."""
    return InferenceFailed(
        f"model {model!r} version {version} failed on a batch of {rows} rows: {type(exc).__name__}: {exc}"
    )


def error_for(model: str, version: int, rows: int, exc: Exception) -> Exception:
    """What one waiter raises: a copy of a serving error, else the model's error as a failure."""
    return copy.copy(exc) if isinstance(exc, ServingError) else failure(model, version, rows, exc)


def check_rows(outputs: Tensors, rows: int, model: str, version: int) -> None:
    """Refuses outputs that do not have one row per input row.

    Raises:
        InferenceFailed: An output is a scalar or has another number of rows.
    """
    for name, value in outputs.items():
        if np.ndim(value) == 0 or value.shape[0] != rows:
            raise InferenceFailed(
                f"model {model!r} version {version} returned output {name!r} with shape "
                f"{tuple(np.shape(value))} for a batch of {rows} rows"
            )


def answer(live: list[Pending], outputs: Tensors) -> None:
    """Gives each waiter its rows of one call's outputs, in order."""
    if len(live) == 1:
        if not live[0].future.done():
            live[0].future.set_result(outputs)
        return
    offset = 0
    for item in live:
        end = offset + item.rows
        if not item.future.done():
            item.future.set_result({name: value[offset:end] for name, value in outputs.items()})
        offset = end


def settle(
    live: list[Pending], outcome: Tensors | list[Tensors | Exception], model: str, version: int
) -> None:
    """Answers a batch's waiters from one call's outputs or from each request's own outcome."""
    if isinstance(outcome, dict):
        answer(live, outcome)
        return
    for item, result in zip(live, outcome, strict=True):
        if item.future.done():
            continue
        if isinstance(result, Exception):
            item.future.set_exception(error_for(model, version, item.rows, result))
        else:
            item.future.set_result(result)


def fail_all(live: list[Pending], model: str, version: int, rows: int, exc: Exception) -> None:
    """Fails every waiter of a batch that could not run."""
    for item in live:
        if not item.future.done():
            item.future.set_exception(error_for(model, version, rows, exc))

"""The prediction log as servers and the control plane open it.

Both ``serve`` and ``monitor`` build the same log from the same settings: a table in the
monitoring store, or segment objects under ``log_url`` (the store keeping the reader's
position). Errors are :class:`~modelloop.process.ServerError`, one line each.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelloop import layout
from modelloop.monitoring.predlog import PredictionLog
from modelloop.monitoring.predlog_objects import SEGMENT_S, ObjectPredictionLog
from modelloop.monitoring.predlog_store import SqlPredictionLog
from modelloop.monitoring.settings import MonitoringSettings
from modelloop.monitoring.stores import StoreEngine, Stores, StoreUnavailable, open_stores
from modelloop.process import ServerError
from modelloop.storage import StorageError

PEER_WAIT_S = 0.6
"""How long a label for an unknown id waits for other servers' log buffers (written every 0.25 s)."""


def peer_wait_s(monitoring: MonitoringSettings) -> float:
    """:data:`PEER_WAIT_S`, plus the seconds a server gathers per object when the log is objects."""
    return PEER_WAIT_S + (SEGMENT_S if monitoring.log_url else 0.0)


def open_log_stores(monitoring: MonitoringSettings) -> Stores:
    """The stores this server appends its prediction log to and routes its rollouts from.

    Raises:
        ServerError: They cannot be opened.
    """
    try:
        return open_stores(monitoring.resolved_store_url())
    except StoreUnavailable as exc:
        raise ServerError(f"cannot open the prediction log's store: {exc.message}") from exc


def open_prediction_log(monitoring: MonitoringSettings, store: StoreEngine) -> PredictionLog[Any]:
    """The prediction log: objects under ``log_url`` when set (the store keeps the reader's
    position), else the store's own table.

    Raises:
        ServerError: ``log_url`` names an unsupported scheme.
    """
    if monitoring.log_url is None:
        return SqlPredictionLog(store)
    try:
        return ObjectPredictionLog(monitoring.log_url, store=store)
    except StorageError as exc:
        raise ServerError(f"invalid prediction log URL: {exc}") from exc


def segmenting(log: object) -> dict[str, Any]:
    """How long the logger gathers a segment: a few seconds per object in object storage."""
    if isinstance(log, ObjectPredictionLog):
        return {"segment_s": log.segment_s, "segment_bytes": log.segment_bytes}
    return {}


def task_from_card(repo: Path) -> Callable[[str, int], str]:
    """A version's task from its ``model.json`` (``multiclass`` when it names none)."""

    def task_of(model: str, version: int) -> str:
        try:
            return layout.read_model_card(repo / model / str(version)).task or "multiclass"
        except layout.LayoutError:
            return "multiclass"

    return task_of

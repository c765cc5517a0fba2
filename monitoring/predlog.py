"""The prediction log's port: what serving writes to and the control plane reads from,
whichever store holds it.

Two implementations: :class:`~modelloop.monitoring.predlog_store.SqlPredictionLog` (one row
per segment on the store's engine; a position is a sequence number) and
:class:`~modelloop.monitoring.predlog_objects.ObjectPredictionLog` (one object per segment
under a prefix; a position is the set of object keys read in a recent window). The serving
side sees only ``append`` (:class:`~modelloop.serving.predlog.PredictionLogSink`).

A position is opaque to the reader (:class:`~modelloop.monitoring.ingest.LogIngest`): it
takes one from :meth:`cursor`, passes it to :meth:`read`, and hands the position of the last
segment it stored to :meth:`advance`, which persists it in the store.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, TypeVar

P = TypeVar("P")


class PredictionLog(Protocol[P]):
    """A prediction log: appended to by servers, read by the control plane. Every method may
    raise :class:`~modelloop.monitoring.stores.engine.StoreUnavailable`."""

    poll_interval_s: float
    """How often a reader looks for new segments (a listing of a bucket costs more than a query)."""

    def append(self, segment: bytes, *, rows: int) -> None:
        """Stores one segment durably (an Arrow IPC stream of ``rows`` rows), or raises."""
        ...

    def cursor(self) -> P:
        """The persisted position of the control plane's reader (the start before the first read)."""
        ...

    def read(self, after: P, limit: int = 64) -> list[tuple[P, bytes]]:
        """Up to ``limit`` segments after ``after``, in order, each with the position after it."""
        ...

    def advance(self, position: P) -> None:
        """Persists the reader's position (every segment up to it is stored)."""
        ...

    def last(self) -> P:
        """The position of the newest segment written so far."""
        ...

    def reached(self, position: P, target: P) -> bool:
        """Whether a reader at ``position`` has read everything up to ``target``."""
        ...

    def prune(self, upto: P) -> int:
        """Deletes read segments past their retention; returns how many went."""
        ...

    def segments_since(self, since: float) -> Iterator[bytes]:
        """Every kept segment written at or after the Unix time ``since``, in order (for export)."""
        ...

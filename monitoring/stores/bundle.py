"""The stores of one database, opened together for a composition root.

Example:

```python
stores = open_stores("sqlite:///state/modelloop.db")
stores.predictions.record([PredictionRecord("r1", "digits", 1, time.time(), [[0.0] * 64], [[0.1] * 10], [3])])
stores.feedback.add_feedback("digits", [FeedbackItem("r1", [3])]).accepted  # ['r1']
stores.close()
```
"""

from __future__ import annotations

from dataclasses import dataclass

from modelloop.monitoring.stores.binding import BindingStore
from modelloop.monitoring.stores.engine import StoreEngine, open_engine
from modelloop.monitoring.stores.feedback import FeedbackStore
from modelloop.monitoring.stores.history import HistoryStore
from modelloop.monitoring.stores.predictions import PredictionStore
from modelloop.monitoring.stores.retrains import RetrainReportStore
from modelloop.monitoring.stores.rollouts import RolloutStore
from modelloop.monitoring.stores.schema import create_schema


@dataclass(frozen=True, slots=True)
class Stores:
    """One store per kind of data, all on one engine.

    Attributes:
        engine: The database they share (the prediction log runs on it too).
        predictions: The logged predictions.
        feedback: Labels, their sources and the per-source counts.
        history: Evaluation points.
        retrains: The retrain gate's reports.
        rollouts: Rollout states and traffic.
        binding: The repository the database describes.
    """

    engine: StoreEngine
    predictions: PredictionStore
    feedback: FeedbackStore
    history: HistoryStore
    retrains: RetrainReportStore
    rollouts: RolloutStore
    binding: BindingStore

    def close(self) -> None:
        """Closes the engine; later calls of every store raise ``StoreUnavailable``."""
        self.engine.close()


def open_stores(url: str, *, retention_rows: int = 1_000_000, retention_days: float = 30.0) -> Stores:
    """Opens the database a URL names, and its stores.

    Args:
        url: ``sqlite:///relative/or/absolute/path.db`` (four slashes for an absolute path)
            or ``postgresql://...`` (``postgres://`` too).
        retention_rows: Most predictions kept. Defaults to 1,000,000.
        retention_days: Age bound of predictions, in days. Defaults to 30.

    Raises:
        StoreUnavailable: An unknown scheme, or a SQLite file that cannot be opened.
    """
    engine = open_engine(url, schema=create_schema)
    return Stores(
        engine=engine,
        predictions=PredictionStore(engine, retention_rows=retention_rows, retention_days=retention_days),
        feedback=FeedbackStore(engine),
        history=HistoryStore(engine),
        retrains=RetrainReportStore(engine),
        rollouts=RolloutStore(engine),
        binding=BindingStore(engine),
    )

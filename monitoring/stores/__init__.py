"""The control plane's stores: one small store per kind of data, on one shared engine."""

from modelloop.monitoring.stores.bundle import Stores, open_stores
from modelloop.monitoring.stores.engine import StoreEngine, StoreUnavailable, open_engine

__all__ = ["StoreEngine", "StoreUnavailable", "Stores", "open_engine", "open_stores"]

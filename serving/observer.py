"""The hook through which monitoring sees answered requests.

The data plane calls ``observe`` once per successful inference, on the event loop, after
the response is built. Implementations must return at once: the eventual monitoring
observer puts the pair on a bounded queue and drops it when the queue is full, so a slow
store never slows serving down.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from modelloop.serving.types import InferRequest, InferResponse


@runtime_checkable
class InferenceObserver(Protocol):
    """Receives every answered request; must not block and must not raise."""

    def observe(self, request: InferRequest, response: InferResponse) -> None:
        """Takes note of one request and its response.

        Args:
            request: The validated request (inputs already cast to the model's dtypes).
            response: The response sent back.
        """


class NullObserver:
    """The default observer: ignores everything."""

    def observe(self, request: InferRequest, response: InferResponse) -> None:
        """Does nothing."""

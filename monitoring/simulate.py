"""Labelled demo traffic for a running server: watch drift, accuracy and the retrain loop.

``modelloop simulate --url URL [--drift]`` sends scikit-learn digits to
``POST /v1/models/digits:predict`` (TF Serving REST, ``x-request-id`` on every request),
then posts the true labels to ``POST /v1/models/digits/feedback``, as a labelling team
would later. With ``--drift`` a second phase sends the same digits inverted and noisy
(``16 - x`` plus Gaussian noise, clipped to 0..16): the drift detector sees every pixel
move, and the served model's accuracy drops, until a retrain on the labelled feedback
publishes a version that has learnt them.

Only the standard library talks to the server, so the command needs nothing beyond the
project's own dependencies.

Example:

```python
report = simulate("http://127.0.0.1:8501", drift=True, requests=200, batch=4)
print(report["phases"]["drifted"]["accuracy"])
```
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, TextIO

import numpy as np

from modelloop.errors import ModelloopError

FEEDBACK_CHUNK = 500
"""Feedback items per request."""


class SimulationError(ModelloopError):
    """The server cannot be reached or refuses the demo traffic."""


def drift_digits(x: np.ndarray, rng: np.random.Generator, *, noise: float = 2.0) -> np.ndarray:
    """Inverts digits pixels (``16 - x``), adds Gaussian noise and clips to the 0..16 range.

    Args:
        x: Raw digits pixels, ``[n, 64]`` in 0..16.
        rng: Random generator of the noise.
        noise: Standard deviation of the noise. Defaults to 2.0.

    Returns:
        The drifted rows, float32.
    """
    return np.clip(16.0 - x + rng.normal(0.0, noise, size=x.shape), 0.0, 16.0).astype(np.float32)


def _post(
    url: str, payload: Any, headers: dict[str, str] | None = None, timeout: float = 30
) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"content-type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body or b"null")
        except ValueError:
            return exc.code, {"error": body.decode(errors="replace")}
    except (urllib.error.URLError, OSError) as exc:
        raise SimulationError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from exc


def _send_feedback(
    base: str, model: str, labels: dict[str, list[int]], *, token: str | None = None, retries: int = 3
) -> int:
    """Posts labels in chunks; ids the server has not logged yet are retried after a pause."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    accepted = 0
    pending = dict(labels)
    for attempt in range(retries + 1):
        unknown: dict[str, list[int]] = {}
        ids = list(pending)
        for i in range(0, len(ids), FEEDBACK_CHUNK):
            chunk = ids[i : i + FEEDBACK_CHUNK]
            items = [{"request_id": rid, "targets": pending[rid]} for rid in chunk]
            status, body = _post(f"{base}/v1/models/{model}/feedback", {"feedback": items}, headers)
            if status in (401, 403):
                hint = "pass --token-file or set MODELLOOP_FEEDBACK_TOKEN"
                raise SimulationError(f"feedback refused ({status}): {_error_of(body)}; {hint}")
            if status not in (200, 400, 404, 409) or not isinstance(body, dict):
                raise SimulationError(f"feedback refused ({status}): {body}")
            accepted += len(body.get("accepted", []))
            unknown.update({rid: pending[rid] for rid in body.get("unknown", [])})
        if not unknown or attempt == retries:
            break
        # Predictions are logged off the hot path: a label can arrive before its prediction.
        time.sleep(0.5 * (attempt + 1))
        pending = unknown
    return accepted


def _error_of(body: Any) -> str:
    return str(body.get("error", body)) if isinstance(body, dict) else str(body)


def _phase(
    base: str,
    model: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    requests: int,
    batch: int,
    rate: float,
    rng: np.random.Generator,
    token: str | None = None,
) -> dict[str, Any]:
    labels: dict[str, list[int]] = {}
    correct = rows = 0
    started = time.monotonic()
    for i in range(requests):
        idx = rng.integers(0, len(y), batch)
        rid = f"sim-{uuid.uuid4().hex}"
        status, body = _post(
            f"{base}/v1/models/{model}:predict", {"instances": x[idx].tolist()}, {"x-request-id": rid}
        )
        if status != 200 or not isinstance(body, dict) or "predictions" not in body:
            raise SimulationError(f"predict refused ({status}): {body}")
        predicted = np.asarray(body["predictions"]).argmax(axis=1)
        correct += int((predicted == y[idx]).sum())
        rows += batch
        labels[rid] = [int(v) for v in y[idx]]
        if rate > 0:
            # Pace to the target rate without drifting: sleep until request i+1 is due.
            time.sleep(max(0.0, started + (i + 1) / rate - time.monotonic()))
    accepted = _send_feedback(base, model, labels, token=token)
    return {
        "requests": requests,
        "rows": rows,
        "accuracy": correct / rows if rows else None,
        "feedback_accepted": accepted,
        "seconds": round(time.monotonic() - started, 2),
    }


def simulate(
    url: str,
    *,
    drift: bool = False,
    normal: bool = True,
    requests: int = 200,
    batch: int = 1,
    rate: float = 0.0,
    model: str = "digits",
    seed: int = 0,
    out: TextIO | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """Sends labelled digits traffic, then its labels, and prints one line per phase.

    Args:
        url: The server's REST base URL (``http://127.0.0.1:8501``).
        drift: Also send a drifted phase (inverted, noisy digits). Defaults to False.
        normal: Send the normal phase first. Defaults to True.
        requests: Requests per phase. Defaults to 200.
        batch: Rows per request. Defaults to 1.
        rate: Requests per second; 0 = as fast as the server answers. Defaults to 0.
        model: The served digits model. Defaults to ``digits``.
        seed: Seed of the row choice and the noise. Defaults to 0.
        out: Where the progress lines go. Defaults to standard output.
        token: The labeler token the feedback is sent with. Defaults to None (none).

    Returns:
        ``{"phases": {"normal": {...}, "drifted": {...}}}`` with requests, rows, the
        served accuracy, labels accepted and seconds per phase.

    Raises:
        SimulationError: The server cannot be reached or refuses a request.
    """
    from sklearn.datasets import load_digits

    stream = out if out is not None else sys.stdout
    base = url.rstrip("/")
    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    phases: dict[str, dict[str, Any]] = {}
    plan = ([("normal", x)] if normal else []) + ([("drifted", drift_digits(x, rng))] if drift else [])
    for name, rows in plan:
        print(
            f"simulate: {name} traffic, {requests} requests of {batch} rows to {base}",
            file=stream,
            flush=True,
        )
        result = _phase(base, model, rows, y, requests=requests, batch=batch, rate=rate, rng=rng, token=token)
        phases[name] = result
        print(
            f"simulate: {name}: served accuracy {result['accuracy']:.3f} over {result['rows']} rows; "
            f"{result['feedback_accepted']} labelled requests accepted; {result['seconds']:.1f} s",
            file=stream,
            flush=True,
        )
    return {"phases": phases}

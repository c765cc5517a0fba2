"""Large bodies: refused by their value count before parsing, decoded on a thread when valid."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from modelloop.serving.codecs.json_tensor import OFF_LOOP_DECODE_BYTES
from modelloop.serving.rest import routes_tfserving, routes_v2
from modelloop.serving.rest.app import create_app

from ..edge_support import EdgeStack, serve, write_digits

ROW = [float(i % 17) for i in range(64)]


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[EdgeStack]:
    repo = tmp_path / "models"
    write_digits(repo, (1,))
    async with serve(repo) as stack:
        yield stack


@pytest.fixture
async def client(stack: EdgeStack) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(stack.dataplane, stack.settings, stack.prometheus)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c


def rows_body(rows: int) -> bytes:
    return json.dumps({"instances": [ROW] * rows}).encode()


async def test_too_many_rows_are_refused_before_the_body_is_parsed(
    stack: EdgeStack, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[int] = []
    real = routes_tfserving.tfserving_json.decode_predict_request

    def recording(body: bytes, *args: object, **kwargs: object) -> object:
        parsed.append(len(body))
        return real(body, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(routes_tfserving.tfserving_json, "decode_predict_request", recording)
    limit = stack.settings.batching.max_batch_size
    response = await client.post("/v1/models/digits:predict", content=rows_body(limit * 20))
    assert response.status_code == 400, response.text
    assert "refused before decoding" in response.json()["error"]
    assert f"max_batch_size is {limit}" in response.json()["error"]
    # Rows of the wrong shape (too many values a row) the same way.
    wide = json.dumps({"instances": [[0.0] * 64 * 200] * 2}).encode()
    response = await client.post("/v1/models/digits:predict", content=wide)
    assert response.status_code == 400 and "refused before decoding" in response.json()["error"]
    v2 = {
        "inputs": [
            {"name": "pixels", "shape": [limit * 20, 64], "datatype": "FP32", "data": ROW * limit * 20}
        ]
    }
    response = await client.post("/v2/models/digits/infer", json=v2)
    assert response.status_code == 400 and "refused before decoding" in response.json()["error"]
    assert parsed == []
    # At the limit, the body is decoded and answered.
    assert (await client.post("/v1/models/digits:predict", content=rows_body(limit))).status_code == 200
    assert len(parsed) == 1


async def test_a_large_valid_body_is_decoded_off_the_event_loop(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []
    for module, cls in (
        (routes_tfserving, routes_tfserving.PredictDecoder),
        (routes_v2, routes_v2.InferDecoder),
    ):
        real = cls.decode

        def recording(self: object, metadata: object, real: object = real) -> object:
            threads.append(threading.get_ident())
            return real(self, metadata)  # type: ignore[operator]

        monkeypatch.setattr(cls, "decode", recording)
        del module
    padding = b" " * OFF_LOOP_DECODE_BYTES  # JSON allows any whitespace between tokens
    loop_thread = threading.get_ident()
    big = b'{"instances": [' + json.dumps(ROW).encode() + b"]" + padding + b"}"
    assert (await client.post("/v1/models/digits:predict", content=big)).status_code == 200
    v2 = json.dumps({"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": ROW}]})
    assert (await client.post("/v2/models/digits/infer", content=v2.encode() + padding)).status_code == 200
    small = json.dumps({"instances": [ROW]}).encode()
    assert (await client.post("/v1/models/digits:predict", content=small)).status_code == 200
    assert threads[0] != loop_thread and threads[1] != loop_thread
    assert threads[2] == loop_thread  # small bodies stay on the loop: a thread hop costs more

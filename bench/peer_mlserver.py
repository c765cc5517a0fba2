"""MLServer over the digits ONNX model, for ``python -m bench --peers``.

Runs in its own virtualenv (``bench/peers.py`` makes it: the pinned ``mlserver`` and the
same ONNX Runtime as ours): ``python bench/peer_mlserver.py MODEL.onnx``. A custom
``MLModel`` runs ``session.run`` per request (MLServer ships no ONNX runtime), with
parallel inference workers off, so it answers on one process as ours does; V2 REST and
V2 gRPC only (MLServer has no TF Serving V1).
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any

import numpy as np
import onnxruntime as ort
from mlserver import MLModel, MLServer
from mlserver.codecs import NumpyCodec
from mlserver.settings import ModelParameters, ModelSettings, Settings
from mlserver.types import InferenceRequest, InferenceResponse


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OnnxDigits(MLModel):  # type: ignore[misc]
    """``session.run`` on the request's first input."""

    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        uri = self.settings.parameters.uri
        self.session = ort.InferenceSession(uri, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        rows = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        out = self.session.run(None, {self.input: rows})[0]
        return InferenceResponse(
            model_name=self.name, id=payload.id, outputs=[NumpyCodec.encode_output(self.output, out)]
        )


async def _serve(model_path: str) -> Any:
    http_port, grpc_port, metrics_port = _free_port(), _free_port(), _free_port()
    settings = Settings(
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        parallel_workers=0,
        host="127.0.0.1",
    )
    model = ModelSettings(
        name="digits", implementation=OnnxDigits, parameters=ModelParameters(uri=model_path)
    )
    print(f"REST listening on http://127.0.0.1:{http_port}", flush=True)
    print(f"gRPC listening on 127.0.0.1:{grpc_port}", flush=True)
    await MLServer(settings).start([model])


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1]))

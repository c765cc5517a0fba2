"""KServe's Python model server over the digits ONNX model, for ``python -m bench --peers``.

Runs in its own virtualenv (``bench/peers.py`` makes it: the pinned ``kserve`` and the same
ONNX Runtime as ours): ``python bench/peer_kserve.py MODEL.onnx``. One ``kserve.Model``
answers V1 (``/v1/models/digits:predict``), V2 REST and V2 gRPC with ``session.run`` per
request, as a KServe user's custom predictor would; it prints the addresses it serves as
``modelloop serve`` does.
"""

from __future__ import annotations

import socket
import sys
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    """Serves the model until SIGTERM."""
    model_path = sys.argv[1]
    http_port, grpc_port = _free_port(), _free_port()
    # KServe parses sys.argv when it is imported: hand it its flags only.
    sys.argv = [sys.argv[0], "--http_port", str(http_port), "--grpc_port", str(grpc_port)]
    import kserve
    import numpy as np
    import onnxruntime as ort
    from kserve import InferOutput, InferRequest, InferResponse

    class Digits(kserve.Model):  # type: ignore[misc]
        def __init__(self, name: str, path: str) -> None:
            super().__init__(name)
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            self.input = self.session.get_inputs()[0].name
            self.output = self.session.get_outputs()[0].name
            self.ready = True

        def predict(self, payload: Any, headers: Any = None, response_headers: Any = None) -> Any:
            if isinstance(payload, dict):  # V1
                rows = np.asarray(payload["instances"], dtype=np.float32)
                return {"predictions": self.session.run(None, {self.input: rows})[0].tolist()}
            request: InferRequest = payload
            rows = request.inputs[0].as_numpy().astype(np.float32, copy=False)
            out = self.session.run(None, {self.input: rows})[0]
            output = InferOutput(name=self.output, shape=list(out.shape), datatype="FP32")
            output.set_data_from_numpy(out, binary_data=False)
            return InferResponse(response_id=request.id or "", model_name=self.name, infer_outputs=[output])

    print(f"REST listening on http://127.0.0.1:{http_port}", flush=True)
    print(f"gRPC listening on 127.0.0.1:{grpc_port}", flush=True)
    kserve.ModelServer(
        http_port=http_port, grpc_port=grpc_port, workers=1, enable_latency_logging=False
    ).start([Digits("digits", model_path)])


if __name__ == "__main__":
    main()

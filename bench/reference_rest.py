"""The REST ceiling: a FastAPI app that reads and parses the same JSON body, then returns a constant.

It runs the way ``uvicorn.run`` runs any FastAPI app with ``uvicorn[standard]`` installed
(uvloop, httptools), access log off, one worker: what the framework can do when the
handler does nothing. Run it as ``python -m bench.reference_rest``; it prints
``REST listening on http://127.0.0.1:PORT``.
"""

from __future__ import annotations

import socket
import sys

import orjson
import uvicorn
from fastapi import FastAPI, Request, Response

# A response of the same size and shape as the server's answer for one digits row.
CONSTANT_TF = orjson.dumps({"predictions": [[0.1] * 10]})
CONSTANT_V2 = orjson.dumps(
    {
        "model_name": "digits",
        "model_version": "1",
        "id": "0" * 32,
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [1, 10], "data": [0.1] * 10}],
    }
)


def create_app() -> FastAPI:
    """The no-op app: ``:predict`` and ``/infer`` paths that parse the body and answer a constant."""
    app = FastAPI()

    @app.post("/v1/models/{model_method}")
    async def predict(request: Request, model_method: str) -> Response:
        orjson.loads(await request.body())
        return Response(CONSTANT_TF, media_type="application/json")

    @app.post("/v2/models/{model}/infer")
    async def infer(request: Request, model: str) -> Response:
        orjson.loads(await request.body())
        return Response(CONSTANT_V2, media_type="application/json")

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(b'{"ready":true}', media_type="application/json")

    return app


def main() -> int:
    """Serves the app on a free port until SIGTERM."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    print(f"REST listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(create_app(), access_log=False, log_level="warning", lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())

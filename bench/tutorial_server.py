"""The tutorial baseline: FastAPI, a pydantic body and ``keras.Model.predict`` per request.

This is what most "serve your Keras model" tutorials write; it takes the TF Serving row
format body. Run it as ``python -m bench.tutorial_server MODEL.keras``; it prints
``REST listening on http://127.0.0.1:PORT``.
"""

from __future__ import annotations

import socket
import sys

import keras
import numpy as np
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel


class PredictBody(BaseModel):
    """``{"instances": [[...], ...]}``."""

    instances: list[list[float]]


def create_app(model_path: str) -> FastAPI:
    """The tutorial app over one ``.keras`` file."""
    model = keras.saving.load_model(model_path, compile=False)
    app = FastAPI()

    @app.post("/v1/models/{model_method}")
    def predict(body: PredictBody, model_method: str) -> dict[str, list[list[float]]]:
        outputs = model.predict(np.array(body.instances, dtype=np.float32), verbose=0)
        return {"predictions": outputs.tolist()}

    @app.get("/v2/health/ready")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    return app


def main() -> int:
    """Serves ``sys.argv[1]`` on a free port until SIGTERM."""
    app = create_app(sys.argv[1])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    print(f"REST listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, access_log=False, log_level="warning", lifespan="off")).run(
        sockets=[sock]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The bare ASGI ceiling: a raw ASGI callable that reads and parses the same body, then answers a constant.

It runs on the same uvicorn settings as the FastAPI ceiling (uvloop, httptools, access log
off, one worker) with no framework in between: what the ASGI server itself can do per
request on this machine. Run it as ``python -m bench.reference_asgi``; it prints
``REST listening on http://127.0.0.1:PORT``.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

import orjson
import uvicorn

from bench.reference_rest import CONSTANT_TF, CONSTANT_V2

_HEADERS_TF = [(b"content-type", b"application/json"), (b"content-length", str(len(CONSTANT_TF)).encode())]
_HEADERS_V2 = [(b"content-type", b"application/json"), (b"content-length", str(len(CONSTANT_V2)).encode())]
_READY = b'{"ready":true}'


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``POST .../infer`` answers the OIP constant, any other POST the TF Serving one; GET is ready."""
    if scope["type"] != "http":
        return
    if scope["method"] == "GET":
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": _READY})
        return
    chunks = []
    more = True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    orjson.loads(b"".join(chunks))
    infer = scope["path"].endswith("/infer")
    await send(
        {"type": "http.response.start", "status": 200, "headers": _HEADERS_V2 if infer else _HEADERS_TF}
    )
    await send({"type": "http.response.body", "body": CONSTANT_V2 if infer else CONSTANT_TF})


def main() -> int:
    """Serves the app on a free port until SIGTERM."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    print(f"REST listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, access_log=False, log_level="warning", lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())

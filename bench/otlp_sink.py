"""An OTLP/HTTP trace receiver that accepts and discards: the far end of the ``traced`` point.

``python -m bench --tracing`` serves the digits model a second time with tracing on
(``OTEL_TRACES_EXPORTER=otlp``) and points its exporter here, so that the point measures
what spans cost the server (making them, the batch processor's thread, protobuf
encoding, the HTTP posts) without a collector's own CPU. The sink runs on a thread of the
suite's process, pinned to the load generators' CPUs, and counts what it received.

Example:

```python
with otlp_sink() as sink:
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": sink.url}
    ...
print(sink.posts, sink.bytes)
```
"""

from __future__ import annotations

import contextlib
import http.server
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from bench import loadgen


@dataclass
class Sink:
    """Where the sink listens and what it received."""

    url: str = ""
    posts: int = 0
    bytes: int = 0


def _cpus(spec: str) -> set[int]:
    cpus: set[int] = set()
    for part in spec.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


@contextlib.contextmanager
def otlp_sink(cpus: str = loadgen.LOAD_CPU) -> Iterator[Sink]:
    """Runs the sink on a free loopback port until the block ends.

    Args:
        cpus: The CPUs its thread runs on, as ``taskset -c`` takes them. Defaults to the
            load generators'.

    Yields:
        The sink: ``url`` for ``OTEL_EXPORTER_OTLP_ENDPOINT``, and the counts.
    """
    sink = Sink()
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's session expects

        def do_POST(self) -> None:
            size = int(self.headers.get("Content-Length", "0"))
            self.rfile.read(size)
            with lock:
                sink.posts += 1
                sink.bytes += size
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")  # an empty ExportTraceServiceResponse
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    sink.url = f"http://127.0.0.1:{server.server_address[1]}"

    def serve() -> None:
        with contextlib.suppress(OSError, ValueError):
            os.sched_setaffinity(threading.get_native_id(), _cpus(cpus))
        server.serve_forever()

    thread = threading.Thread(target=serve, name="otlp-sink", daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        server.shutdown()
        server.server_close()

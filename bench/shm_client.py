"""The client side of the shared memory point: tritonclient over HTTP, shared memory or binary.

Runs in ``.venv-clients`` (tritonclient and the server's protobuf cannot share a process).
Sends ``REQUESTS`` infer calls of one float32 ``[ROWS, 64]`` input to ``digits``, one at a
time, and prints JSON: the wall and CPU seconds this process spent on them.

Usage: python shm_client.py HOST:PORT TOKEN ROWS REQUESTS MODE   (MODE: shm or binary)
"""

import json
import os
import sys
import time

import numpy as np
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm

url, token, rows, requests, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
headers = {"Authorization": f"Bearer {token}"}
data = (np.arange(rows * 64, dtype=np.float32).reshape(rows, 64) % 17).astype(np.float32)
out_size = rows * 10 * 4
client = httpclient.InferenceServerClient(url=url, network_timeout=120, connection_timeout=120)
handles = []
if mode == "shm":
    key = f"/modelloop-bench-{os.getpid()}"
    handles = [
        shm.create_shared_memory_region("in", key + "-in", data.nbytes),
        shm.create_shared_memory_region("out", key + "-out", out_size),
    ]
    shm.set_shared_memory_region(handles[0], [data])
    client.unregister_system_shared_memory(headers=headers)
    client.register_system_shared_memory("in", key + "-in", data.nbytes, headers=headers)
    client.register_system_shared_memory("out", key + "-out", out_size, headers=headers)


def call() -> np.ndarray:
    inp = httpclient.InferInput("pixels", list(data.shape), "FP32")
    out = httpclient.InferRequestedOutput("probabilities", binary_data=True)
    if mode == "shm":
        inp.set_shared_memory("in", data.nbytes)
        out.set_shared_memory("out", out_size)
        client.infer("digits", [inp], outputs=[out])
        return shm.get_contents_as_numpy(handles[1], np.float32, [rows, 10])
    inp.set_data_from_numpy(data, binary_data=True)
    return client.infer("digits", [inp], outputs=[out]).as_numpy("probabilities")


try:
    first = call()  # warm: connection, first batch
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(requests):
        got = call()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    print(json.dumps({"mode": mode, "requests": requests, "wall_s": wall, "client_cpu_s": cpu,
                      "output_checksum": float(np.asarray(got, dtype=np.float64).sum())}))  # fmt: skip
finally:
    if mode == "shm":
        client.unregister_system_shared_memory(headers=headers)
        for handle in handles:
            shm.destroy_shared_memory_region(handle)

"""Runs tritonclient's system shared memory flow (unchanged) against a server; prints JSON.

Register an input and an output region, infer through them, read the status, unregister:
with the http and grpc clients, sync and asyncio. It runs in `.venv-clients` (see
`tritonclient_e2e.py`).

Usage: python tritonclient_shm_e2e.py HTTP_HOST:PORT GRPC_HOST:PORT ROWS_JSON ADMIN_TOKEN
"""

import asyncio
import base64
import json
import os
import sys
import time

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as agrpc
import tritonclient.http as httpclient
import tritonclient.http.aio as ahttp
import tritonclient.utils.shared_memory as shm

http_url, grpc_url, rows_path, token = sys.argv[1:5]
with open(rows_path) as f:
    rows = np.asarray(json.load(f), dtype=np.float32)
headers = {"Authorization": f"Bearer {token}"}
gheaders = {"authorization": f"Bearer {token}"}  # gRPC metadata keys are lower case
in_size = rows.nbytes
out_size = rows.shape[0] * 10 * 4
prefix = f"/modelloop-e2e-{os.getpid()}"
in_handle = shm.create_shared_memory_region("in", prefix + "-in", in_size)
out_handle = shm.create_shared_memory_region("out", prefix + "-out", out_size)
shm.set_shared_memory_region(in_handle, [rows])
result = {}


def read_output():
    values = shm.get_contents_as_numpy(out_handle, np.float32, [rows.shape[0], 10])
    copy = values.tolist()
    shm.set_shared_memory_region(out_handle, [np.zeros((rows.shape[0], 10), np.float32)])
    return copy


def http_inputs(module):
    inp = module.InferInput("pixels", list(rows.shape), "FP32")
    inp.set_shared_memory("in", in_size)
    out = module.InferRequestedOutput("probabilities", binary_data=True)
    out.set_shared_memory("out", out_size)
    return [inp], [out]


def grpc_inputs(module):
    inp = module.InferInput("pixels", list(rows.shape), "FP32")
    inp.set_shared_memory("in", in_size)
    out = module.InferRequestedOutput("probabilities")
    out.set_shared_memory("out", out_size)
    return [inp], [out]


try:
    client = httpclient.InferenceServerClient(url=http_url)
    result["extensions"] = client.get_server_metadata()["extensions"]
    try:
        client.register_system_shared_memory("in", prefix + "-in", in_size)
    except Exception as exc:  # noqa: BLE001 - InferenceServerException
        result["http_register_without_token"] = str(exc)
    client.register_system_shared_memory("in", prefix + "-in", in_size, headers=headers)
    client.register_system_shared_memory("out", prefix + "-out", out_size, headers=headers)
    result["http_status"] = client.get_system_shared_memory_status(headers=headers)
    inputs, outputs = http_inputs(httpclient)
    response = client.infer("digits", inputs, outputs=outputs)
    result["http_output_parameters"] = response.get_output("probabilities").get("parameters")
    result["http"] = read_output()
    try:
        client.get_cuda_shared_memory_status(headers=headers)
    except Exception as exc:  # noqa: BLE001
        result["http_cuda"] = str(exc)
    bad_inputs, bad_outputs = http_inputs(httpclient)
    bad_inputs[0].set_shared_memory("in", in_size - 4)
    try:
        client.infer("digits", bad_inputs, outputs=bad_outputs)
    except Exception as exc:  # noqa: BLE001
        result["http_size_mismatch"] = str(exc)
    # The sync client's async_infer (a thread pool) through the same regions.
    inputs, outputs = http_inputs(httpclient)
    client.async_infer("digits", inputs, outputs=outputs).get_result()
    result["http_async"] = read_output()
    client.unregister_system_shared_memory(headers=headers)
    result["http_status_after"] = client.get_system_shared_memory_status(headers=headers)

    gclient = grpcclient.InferenceServerClient(url=grpc_url)
    gclient.register_system_shared_memory("in", prefix + "-in", in_size, headers=gheaders)
    gclient.register_system_shared_memory("out", prefix + "-out", out_size, headers=gheaders)
    status = gclient.get_system_shared_memory_status(headers=gheaders, as_json=True)
    result["grpc_status"] = sorted(status["regions"])
    inputs, outputs = grpc_inputs(grpcclient)
    gclient.infer("digits", inputs, outputs=outputs)
    result["grpc"] = read_output()
    # The sync client's async_infer (a callback).
    done = []
    inputs, outputs = grpc_inputs(grpcclient)
    gclient.async_infer("digits", inputs, lambda result, error: done.append(error), outputs=outputs)
    while not done:
        time.sleep(0.01)
    assert done[0] is None, done[0]
    result["grpc_async"] = read_output()
    gclient.unregister_system_shared_memory("in", headers=gheaders)
    try:
        gclient.infer("digits", *grpc_inputs(grpcclient)[:1], outputs=grpc_inputs(grpcclient)[1])
    except Exception as exc:  # noqa: BLE001
        result["grpc_unregistered"] = str(exc)
    try:
        gclient.register_cuda_shared_memory("g", base64.b64encode(b"handle"), 0, 8, headers=gheaders)
    except Exception as exc:  # noqa: BLE001
        result["grpc_cuda"] = str(exc)
    gclient.unregister_system_shared_memory(headers=gheaders)

    async def asyncio_clients() -> None:
        aclient = ahttp.InferenceServerClient(url=http_url)
        try:
            await aclient.register_system_shared_memory("in", prefix + "-in", in_size, headers=headers)
            await aclient.register_system_shared_memory("out", prefix + "-out", out_size, headers=headers)
            inputs, outputs = http_inputs(ahttp)
            await aclient.infer("digits", inputs, outputs=outputs)
            result["http_aio"] = read_output()
            await aclient.unregister_system_shared_memory(headers=headers)
        finally:
            await aclient.close()
        async with agrpc.InferenceServerClient(url=grpc_url) as agclient:
            await agclient.register_system_shared_memory("in", prefix + "-in", in_size, headers=gheaders)
            await agclient.register_system_shared_memory("out", prefix + "-out", out_size, headers=gheaders)
            inputs, outputs = grpc_inputs(agrpc)
            await agclient.infer("digits", inputs, outputs=outputs)
            result["grpc_aio"] = read_output()
            await agclient.unregister_system_shared_memory(headers=gheaders)

    asyncio.run(asyncio_clients())
finally:
    shm.destroy_shared_memory_region(in_handle)
    shm.destroy_shared_memory_region(out_handle)
print(json.dumps(result))

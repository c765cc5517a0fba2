"""Runs tritonclient (http and grpc, unchanged) against a server; prints JSON results.

It runs in the separate `.venv-clients` environment: tritonclient's generated protobuf
module would clash with the server's own OIP module in one process, and it pins an
older protobuf than TensorFlow needs.

Usage: python tritonclient_e2e.py HTTP_HOST:PORT GRPC_HOST:PORT ROWS_JSON
"""

import asyncio
import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

http_url, grpc_url, rows_path = sys.argv[1:4]
with open(rows_path) as f:
    rows = np.asarray(json.load(f), dtype=np.float32)
result = {}

client = httpclient.InferenceServerClient(url=http_url)
result["http_live"] = client.is_server_live()
result["http_ready"] = client.is_server_ready()
result["http_model_ready"] = client.is_model_ready("digits")
meta = client.get_model_metadata("digits")
result["http_metadata"] = {"name": meta["name"], "inputs": meta["inputs"], "outputs": meta["outputs"]}
for binary in (True, False):
    inp = httpclient.InferInput("pixels", list(rows.shape), "FP32")
    inp.set_data_from_numpy(rows, binary_data=binary)
    out = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
    response = client.infer("digits", [inp], outputs=[out], request_id="triton-http-1")
    key = "http_binary" if binary else "http_json"
    result[key] = response.as_numpy("probabilities").tolist()
    result[key + "_id"] = response.get_response()["id"]
try:
    client.infer("no-such-model", [inp])
except Exception as exc:  # noqa: BLE001 - the client raises InferenceServerException
    result["http_unknown_model_error"] = str(exc)

gclient = grpcclient.InferenceServerClient(url=grpc_url)
result["grpc_live"] = gclient.is_server_live()
result["grpc_ready"] = gclient.is_server_ready()
result["grpc_model_ready"] = gclient.is_model_ready("digits")
gmeta = gclient.get_model_metadata("digits", as_json=True)
result["grpc_metadata"] = {"name": gmeta["name"], "inputs": gmeta["inputs"], "outputs": gmeta["outputs"]}
ginp = grpcclient.InferInput("pixels", list(rows.shape), "FP32")
ginp.set_data_from_numpy(rows)
gresponse = gclient.infer(
    "digits", [ginp], outputs=[grpcclient.InferRequestedOutput("probabilities")], request_id="triton-grpc-1"
)
result["grpc"] = gresponse.as_numpy("probabilities").tolist()
result["grpc_id"] = gresponse.get_response().id
try:
    bad = grpcclient.InferInput("pixels", [1, 3], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
    gclient.infer("digits", [bad])
except Exception as exc:  # noqa: BLE001
    result["grpc_bad_shape_error"] = str(exc)

# Statistics extension: sync clients, then the asyncio ones.
result["http_stats"] = client.get_inference_statistics("digits")
result["http_stats_all"] = client.get_inference_statistics()
result["grpc_stats"] = gclient.get_inference_statistics("digits", "1", as_json=True)
result["server_extensions"] = client.get_server_metadata()["extensions"]
result["grpc_server_extensions"] = gclient.get_server_metadata(as_json=True)["extensions"]


async def asyncio_clients() -> None:
    import tritonclient.grpc.aio as agrpc
    import tritonclient.http.aio as ahttp

    aclient = ahttp.InferenceServerClient(url=http_url)
    try:
        result["http_aio_stats"] = await aclient.get_inference_statistics("digits")
    finally:
        await aclient.close()
    async with agrpc.InferenceServerClient(url=grpc_url) as agclient:
        result["grpc_aio_stats"] = await agclient.get_inference_statistics("digits", as_json=True)


asyncio.run(asyncio_clients())
print(json.dumps(result))

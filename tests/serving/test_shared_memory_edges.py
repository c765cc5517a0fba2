"""The system shared memory extension over REST and gRPC, on the real data plane with fake runtimes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from modelloop.serving.protos import grpc_service_pb2 as pb
from modelloop.serving.protos import grpc_service_pb2_grpc as pb_grpc
from modelloop.serving.rest.app import create_app

from .edge_support import EdgeStack, digits_probabilities, grpc_channel, serve, write_digits
from .test_shared_memory import ShmObject, shm  # noqa: F401 - the fixture

TOKEN = "shm-admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GRPC_AUTH = (("authorization", f"Bearer {TOKEN}"),)
ROWS = (np.arange(3 * 64, dtype=np.float32).reshape(3, 64) % 17).astype(np.float32)
IN_BYTES = ROWS.nbytes  # 768
OUT_OFFSET = 1024


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    write_digits(repo, (1,))
    return repo


@pytest.fixture
async def stack(repo: Path) -> AsyncIterator[EdgeStack]:
    async with serve(repo, admin_token=TOKEN) as stack:
        yield stack


@pytest.fixture
async def client(stack: EdgeStack) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(stack.dataplane, stack.settings, stack.prometheus)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c


@pytest.fixture
def region(shm: ShmObject) -> Iterator[ShmObject]:  # noqa: F811 - the fixture above
    shm.write(0, ROWS.tobytes())
    yield shm


def _shm_infer(in_size: int = IN_BYTES, out_size: int = 3 * 10 * 4, region: str = "r") -> dict:
    return {
        "inputs": [
            {
                "name": "pixels",
                "shape": [3, 64],
                "datatype": "FP32",
                "parameters": {"shared_memory_region": region, "shared_memory_byte_size": in_size},
            }
        ],
        "outputs": [
            {
                "name": "probabilities",
                "parameters": {
                    "shared_memory_region": "r",
                    "shared_memory_byte_size": out_size,
                    "shared_memory_offset": OUT_OFFSET,
                },
            }
        ],
    }


def _error(response: httpx.Response, status: int, match: str) -> None:
    assert response.status_code == status, response.text
    assert match in response.json()["error"], response.json()["error"]


async def test_rest_register_infer_status_unregister(client: httpx.AsyncClient, region: ShmObject) -> None:
    body = {"key": region.key, "offset": 0, "byte_size": 4096}
    _error(await client.post("/v2/systemsharedmemory/region/r/register", json=body), 401, "Bearer")
    r = await client.post("/v2/systemsharedmemory/region/r/register", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    status = (await client.get("/v2/systemsharedmemory/status", headers=AUTH)).json()
    assert status == [{"name": "r", "key": region.key, "offset": 0, "byte_size": 4096}]
    assert (await client.get("/v2/systemsharedmemory/region/r/status", headers=AUTH)).json() == status

    r = await client.post("/v2/models/digits/infer", json=_shm_infer())
    assert r.status_code == 200, r.text
    [output] = r.json()["outputs"]
    assert "data" not in output and output["shape"] == [3, 10]
    assert output["parameters"] == {
        "shared_memory_region": "r",
        "shared_memory_byte_size": 120,
        "shared_memory_offset": OUT_OFFSET,
    }
    written = np.frombuffer(region.read(OUT_OFFSET, 120), dtype=np.float32).reshape(3, 10)
    np.testing.assert_array_equal(written, digits_probabilities(ROWS))

    assert (await client.post("/v2/systemsharedmemory/region/r/unregister", headers=AUTH)).status_code == 200
    assert (await client.get("/v2/systemsharedmemory/status", headers=AUTH)).json() == []
    _error(
        await client.post("/v2/models/digits/infer", json=_shm_infer()), 400, "region 'r' is not registered"
    )
    assert (await client.post("/v2/systemsharedmemory/unregister", headers=AUTH)).status_code == 200


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            _shm_infer(in_size=700),
            "shared_memory_byte_size is 700 but a FP32 tensor of shape [3, 64] has 768",
        ),
        (_shm_infer(region="other"), "region 'other' is not registered"),
        (
            _shm_infer(out_size=100),
            "output 'probabilities' has 120 bytes but its shared memory byte size is 100",
        ),
        (_shm_infer(out_size=4000), "past the end of shared memory region 'r'"),
    ],
)
async def test_rest_bad_shared_memory_requests_are_400(
    client: httpx.AsyncClient, region: ShmObject, body: dict, message: str
) -> None:
    register = {"key": region.key, "offset": 0, "byte_size": 4096}
    await client.post("/v2/systemsharedmemory/region/r/register", json=register, headers=AUTH)
    _error(await client.post("/v2/models/digits/infer", json=body), 400, message)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"key": "/no-such-object", "byte_size": 8}, 400, "no such shared memory object"),
        ({"key": "/x", "offset": "0", "byte_size": 8}, 400, '"offset": a non-negative integer'),
        ({"byte_size": 8}, 400, '"key"'),
        ([], 400, "JSON object"),
    ],
)
async def test_rest_bad_registrations(
    client: httpx.AsyncClient, body: object, status: int, message: str
) -> None:
    r = await client.post("/v2/systemsharedmemory/region/r/register", json=body, headers=AUTH)
    _error(r, status, message)


async def test_rest_cuda_shared_memory_is_unavailable(client: httpx.AsyncClient) -> None:
    for method, path in [
        ("GET", "/v2/cudasharedmemory/status"),
        ("POST", "/v2/cudasharedmemory/region/g/register"),
        ("POST", "/v2/cudasharedmemory/unregister"),
    ]:
        _error(await client.request(method, path, headers=AUTH), 503, "CUDA shared memory is not available")


async def test_rest_routes_are_off_without_an_admin_token(repo: Path, region: ShmObject) -> None:
    async with serve(repo) as stack:
        app = create_app(stack.dataplane, stack.settings, stack.prometheus)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            body = {"key": region.key, "byte_size": 8}
            r = await client.post("/v2/systemsharedmemory/region/r/register", json=body, headers=AUTH)
            _error(r, 403, "MODELLOOP_ADMIN_TOKEN")
            assert "system_shared_memory" not in (await client.get("/v2")).json()["extensions"]


async def test_several_workers_take_no_registrations(repo: Path, region: ShmObject) -> None:
    async with serve(repo, admin_token=TOKEN, workers=2) as stack:
        app = create_app(stack.dataplane, stack.settings, stack.prometheus)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            body = {"key": region.key, "byte_size": 8}
            r = await client.post("/v2/systemsharedmemory/region/r/register", json=body, headers=AUTH)
            _error(r, 503, "--workers 1")
            assert "system_shared_memory" not in (await client.get("/v2")).json()["extensions"]


def _grpc_infer(in_size: int = IN_BYTES, out_size: int = 120) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="pixels", datatype="FP32", shape=[3, 64])
    tensor.parameters["shared_memory_region"].string_param = "r"
    tensor.parameters["shared_memory_byte_size"].int64_param = in_size
    output = request.outputs.add(name="probabilities")
    output.parameters["shared_memory_region"].string_param = "r"
    output.parameters["shared_memory_byte_size"].int64_param = out_size
    output.parameters["shared_memory_offset"].int64_param = OUT_OFFSET
    return request


async def test_grpc_register_infer_status_unregister(stack: EdgeStack, region: ShmObject) -> None:
    async with grpc_channel(stack) as (_, channel):
        oip = pb_grpc.GRPCInferenceServiceStub(channel)
        register = pb.SystemSharedMemoryRegisterRequest(name="r", key=region.key, offset=0, byte_size=4096)
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await oip.SystemSharedMemoryRegister(register)
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await oip.SystemSharedMemoryRegister(register, metadata=GRPC_AUTH)
        status = await oip.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), metadata=GRPC_AUTH)
        assert dict(status.regions)["r"].byte_size == 4096 and status.regions["r"].key == region.key

        response = await oip.ModelInfer(_grpc_infer())
        assert list(response.raw_output_contents) == [b""]
        assert response.outputs[0].parameters["shared_memory_byte_size"].int64_param == 120
        written = np.frombuffer(region.read(OUT_OFFSET, 120), dtype=np.float32).reshape(3, 10)
        np.testing.assert_array_equal(written, digits_probabilities(ROWS))

        for bad, message in [
            (_grpc_infer(in_size=7), "shared_memory_byte_size is 7"),
            (_grpc_infer(out_size=8), "but its shared memory byte size is 8"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await oip.ModelInfer(bad)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in refused.value.details()

        cuda = pb.CudaSharedMemoryRegisterRequest(name="g", raw_handle=b"x", device_id=0, byte_size=8)
        with pytest.raises(grpc.aio.AioRpcError) as unavailable:
            await oip.CudaSharedMemoryRegister(cuda, metadata=GRPC_AUTH)
        assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "CUDA shared memory is not available" in unavailable.value.details()

        await oip.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), metadata=GRPC_AUTH)
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await oip.ModelInfer(_grpc_infer())
        assert gone.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "region 'r' is not registered" in gone.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await oip.SystemSharedMemoryStatus(
                pb.SystemSharedMemoryStatusRequest(name="r"), metadata=GRPC_AUTH
            )
        assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_grpc_mixes_raw_and_shared_memory_inputs(stack: EdgeStack, region: ShmObject) -> None:
    """raw_input_contents holds only the inputs that are not in shared memory, in order."""
    async with grpc_channel(stack) as (_, channel):
        oip = pb_grpc.GRPCInferenceServiceStub(channel)
        register = pb.SystemSharedMemoryRegisterRequest(name="r", key=region.key, offset=0, byte_size=4096)
        await oip.SystemSharedMemoryRegister(register, metadata=GRPC_AUTH)
        request = _grpc_infer()
        request.raw_input_contents.append(b"\0" * 4)  # one entry, for no input
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await oip.ModelInfer(request)
        assert (
            "raw_input_contents has 1 entries for 0 inputs (1 more in shared memory)"
            in refused.value.details()
        )

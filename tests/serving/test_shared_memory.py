"""System shared memory: regions, bounds, and tensors read and written through them."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from modelloop.serving.codecs.binary_tensor import encode_binary_tensor
from modelloop.serving.errors import InvalidInput
from modelloop.serving.shared_memory import (
    SHM_DIR,
    SharedMemoryRef,
    SharedMemoryUnavailable,
    SystemSharedMemory,
    read_shared_tensor,
    shared_memory_ref,
    write_shared_tensor,
)


class ShmObject:
    """A POSIX shared memory object made for a test, unlinked after it."""

    def __init__(self, size: int) -> None:
        self.key = f"/modelloop-test-{uuid.uuid4().hex[:12]}"
        self.path = SHM_DIR / self.key.lstrip("/")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, size)
        os.close(fd)

    def write(self, offset: int, data: bytes) -> None:
        with self.path.open("r+b") as f:
            f.seek(offset)
            f.write(data)

    def read(self, offset: int, size: int) -> bytes:
        with self.path.open("rb") as f:
            f.seek(offset)
            return f.read(size)

    def truncate(self, size: int) -> None:
        os.truncate(self.path, size)


@pytest.fixture
def shm() -> Iterator[ShmObject]:
    if not SHM_DIR.is_dir():
        pytest.skip("no /dev/shm on this host")
    made = ShmObject(4096)
    yield made
    made.path.unlink(missing_ok=True)


def test_register_status_unregister(shm: ShmObject) -> None:
    regions = SystemSharedMemory()
    regions.register("in", shm.key, offset=128, byte_size=1024)
    regions.register(
        "out", "//" + shm.key.lstrip("/"), offset=0, byte_size=4096
    )  # leading slashes as shm_open
    assert regions.status() == [
        {"name": "in", "key": shm.key, "offset": 128, "byte_size": 1024},
        {"name": "out", "key": "//" + shm.key.lstrip("/"), "offset": 0, "byte_size": 4096},
    ]
    assert regions.status("in")[0]["offset"] == 128
    with pytest.raises(InvalidInput, match="'in' is already registered"):
        regions.register("in", shm.key, offset=0, byte_size=8)
    regions.unregister("in")
    regions.unregister("in")  # unknown: nothing to do, as in Triton
    with pytest.raises(InvalidInput, match="no system shared memory region 'in'"):
        regions.status("in")
    regions.unregister()
    assert regions.status() == []


@pytest.mark.parametrize(
    ("key", "offset", "size", "message"),
    [
        ("/no-such-object-here", 0, 8, "no such shared memory object"),
        ("/../etc/passwd", 0, 8, "must name a POSIX shared memory object"),
        ("/a/b", 0, 8, "must name a POSIX shared memory object"),
        ("/", 0, 8, "must name a POSIX shared memory object"),
        (None, 4000, 200, r"offset 4000 \+ byte_size 200 is past the end .* \(4096 bytes\)"),
        (None, 0, 0, "byte_size > 0"),
        (None, -1, 8, "offset must be >= 0"),
    ],
)
def test_bad_registrations_are_refused(
    shm: ShmObject, key: str | None, offset: int, size: int, message: str
) -> None:
    regions = SystemSharedMemory()
    with pytest.raises(InvalidInput, match=message):
        regions.register("r", key or shm.key, offset=offset, byte_size=size)
    assert regions.status() == []


def test_a_server_that_takes_no_registrations_says_why(shm: ShmObject) -> None:
    regions = SystemSharedMemory(unavailable="off: several workers")
    with pytest.raises(SharedMemoryUnavailable, match="several workers"):
        regions.register("r", shm.key, offset=0, byte_size=8)


def test_tensors_in_and_out(shm: ShmObject) -> None:
    regions = SystemSharedMemory()
    regions.register("r", shm.key, offset=64, byte_size=2048)
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    shm.write(64 + 16, rows.tobytes())
    ref = SharedMemoryRef("r", byte_size=48, offset=16)
    got = read_shared_tensor(regions, ref, "FP32", [3, 4], "x")
    np.testing.assert_array_equal(got, rows)
    shm.write(64 + 16, b"\0" * 48)
    np.testing.assert_array_equal(got, rows)  # a copy: later writes do not change it

    texts = np.array([b"ab", b"c"], dtype=object)
    params = write_shared_tensor(regions, SharedMemoryRef("r", 100, 200), texts, "BYTES", "y")
    assert params == {"shared_memory_region": "r", "shared_memory_byte_size": 11, "shared_memory_offset": 200}
    assert shm.read(64 + 200, 11) == encode_binary_tensor(texts, "BYTES")
    back = read_shared_tensor(regions, SharedMemoryRef("r", 11, 200), "BYTES", [2], "y")
    assert list(back) == [b"ab", b"c"]


@pytest.mark.parametrize(
    ("ref", "datatype", "shape", "message"),
    [
        (SharedMemoryRef("nope", 48), "FP32", [3, 4], "region 'nope' is not registered"),
        (
            SharedMemoryRef("r", 40),
            "FP32",
            [3, 4],
            "shared_memory_byte_size is 40 but a FP32 tensor of shape",
        ),
        (SharedMemoryRef("r", 48, 1000), "FP32", [3, 4], r"offset 1000 \+ 48 bytes is past the end"),
        (SharedMemoryRef("r", 8), "BYTES", [1], "BYTES"),
    ],
)
def test_bad_reads_are_invalid_input(
    shm: ShmObject, ref: SharedMemoryRef, datatype: str, shape: list[int], message: str
) -> None:
    regions = SystemSharedMemory()
    regions.register("r", shm.key, offset=0, byte_size=1024)
    shm.write(0, b"\xff" * 16)  # not a valid length-prefixed BYTES element
    with pytest.raises(InvalidInput, match=message):
        read_shared_tensor(regions, ref, datatype, shape, "x")
    with pytest.raises(InvalidInput, match="takes none"):
        read_shared_tensor(None, ref, datatype, shape, "x")


def test_an_output_larger_than_its_region_is_refused(shm: ShmObject) -> None:
    regions = SystemSharedMemory()
    regions.register("r", shm.key, offset=0, byte_size=1024)
    with pytest.raises(
        InvalidInput, match="output 'y' has 4096 bytes but its shared memory byte size is 100"
    ):
        write_shared_tensor(regions, SharedMemoryRef("r", 100), np.zeros(1024, np.float32), "FP32", "y")
    with pytest.raises(InvalidInput, match="past the end"):
        write_shared_tensor(regions, SharedMemoryRef("r", 4096), np.zeros(1024, np.float32), "FP32", "y")


def test_a_shrunk_object_is_refused_not_read_past_its_end(shm: ShmObject) -> None:
    regions = SystemSharedMemory()
    regions.register("r", shm.key, offset=0, byte_size=4096)
    shm.truncate(100)
    with pytest.raises(InvalidInput, match="is now smaller than the region"):
        regions.read(SharedMemoryRef("r", 400, 0), "input 'x'")
    assert regions.read(SharedMemoryRef("r", 100, 0), "input 'x'") == b"\0" * 100


def test_unregister_while_in_use_closes_after_the_last_user(shm: ShmObject) -> None:
    regions = SystemSharedMemory()
    regions.register("r", shm.key, offset=0, byte_size=64)
    region = regions._acquire(SharedMemoryRef("r", 8), "input 'x'", writing=False)
    regions.unregister("r")
    assert not region.mapping.closed  # the request still holds it
    with pytest.raises(InvalidInput, match="unregistered while the request ran"):
        regions.write(SharedMemoryRef("r", 8), b"12345678", "output 'y'")
    regions._release(region)
    assert region.mapping.closed


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"shared_memory_byte_size": 8}, "has shared_memory_byte_size but no shared_memory_region"),
        ({"shared_memory_region": "r"}, "but no shared_memory_byte_size"),
        ({"shared_memory_region": 3, "shared_memory_byte_size": 8}, "must be a region name"),
        ({"shared_memory_region": "r", "shared_memory_byte_size": -1}, "non-negative integer"),
        ({"shared_memory_region": "r", "shared_memory_byte_size": 8, "shared_memory_offset": "0"}, "integer"),
    ],
)
def test_bad_parameters(parameters: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        shared_memory_ref(parameters, 'input "x"')
    assert shared_memory_ref({"binary_data_size": 3}, 'input "x"') is None


def test_keys_resolve_under_dev_shm_only(tmp_path: Path) -> None:
    regions = SystemSharedMemory()
    with pytest.raises(InvalidInput):
        regions.register("r", str(tmp_path / "file"), offset=0, byte_size=8)

"""Triton's system shared memory extension: tensors passed through POSIX shared memory.

A co-located client creates a POSIX shared-memory object (``shm_open``, as
``tritonclient.utils.shared_memory`` does), registers a region of it by name, and then
names the region in an infer request instead of sending the bytes: per input or requested
output, the parameters ``shared_memory_region``, ``shared_memory_byte_size`` and
(optionally) ``shared_memory_offset``. Inputs are read from the region in Triton's binary
tensor format; outputs are written to it, and the response carries only their shape,
datatype and region.

Safety. Registering makes the server read and write memory another process named, so
register, status and unregister need the admin token (the edges check it). A key names
an object under ``/dev/shm`` and nothing else (no ``/`` or ``..`` after the leading
slashes). Every access is checked against the region's bounds, and against the object's
size at that moment, so a client that shrinks the object after registering gets a 400,
never a read past its end (which would be a SIGBUS). Inputs are copied out of the region
while it is held, and an output is written only if its region is still registered: a
region unregistered while a request uses it is closed when the request lets go of it, and
the request's later accesses to it fail with INVALID_ARGUMENT.

Example:

```python
regions = SystemSharedMemory()
regions.register("input0", "/my_key", offset=0, byte_size=4 * 1024 * 1024)
ref = shared_memory_ref({"shared_memory_region": "input0", "shared_memory_byte_size": 256}, "input 'x'")
raw = regions.read(ref, "input 'x'")  # 256 bytes, a copy
regions.unregister("input0")
```
"""

from __future__ import annotations

import math
import mmap
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelloop.errors import ErrorCode
from modelloop.serving.codecs.binary_tensor import decode_binary_tensor, encode_binary_tensor
from modelloop.serving.datatypes import to_numpy_dtype
from modelloop.serving.errors import InvalidInput, ServingError

SHM_DIR = Path("/dev/shm")
"""Where POSIX shared-memory objects live on Linux (``shm_open`` names)."""

REGION = "shared_memory_region"
BYTE_SIZE = "shared_memory_byte_size"
OFFSET = "shared_memory_offset"
PARAMETERS = (REGION, BYTE_SIZE, OFFSET)


class SharedMemoryUnavailable(ServingError):
    """A shared memory kind this server does not provide (CUDA), or the extension is off."""

    code = ErrorCode.UNAVAILABLE


@dataclass(frozen=True, slots=True)
class SharedMemoryRef:
    """Where one tensor lives: a registered region, an offset in it, and a byte count."""

    region: str
    byte_size: int
    offset: int = 0

    def response_parameters(self, written: int) -> dict[str, Any]:
        """The parameters a response gives an output written to the region."""
        parameters: dict[str, Any] = {REGION: self.region, BYTE_SIZE: written}
        if self.offset:
            parameters[OFFSET] = self.offset
        return parameters


def _integer(value: Any, key: str, where: str) -> int:
    if type(value) is not int or value < 0:
        raise InvalidInput(f"{where}: {key} must be a non-negative integer, got {value!r}")
    return value


def shared_memory_ref(parameters: Mapping[str, Any], where: str) -> SharedMemoryRef | None:
    """The region a tensor's parameters name, or None when they name none.

    Args:
        parameters: The input's or requested output's parameters.
        where: Which tensor, for messages (``input "x"``).

    Raises:
        InvalidInput: A region without a byte size (or the reverse), or a value of the
            wrong type.
    """
    if REGION not in parameters:
        stray = [key for key in (BYTE_SIZE, OFFSET) if key in parameters]
        if stray:
            raise InvalidInput(f"{where} has {', '.join(stray)} but no {REGION}")
        return None
    region = parameters[REGION]
    if not isinstance(region, str) or not region:
        raise InvalidInput(f"{where}: {REGION} must be a region name, got {region!r}")
    if BYTE_SIZE not in parameters:
        raise InvalidInput(f"{where} names {REGION} {region!r} but no {BYTE_SIZE}")
    byte_size = _integer(parameters[BYTE_SIZE], BYTE_SIZE, where)
    offset = _integer(parameters.get(OFFSET, 0), OFFSET, where)
    return SharedMemoryRef(region, byte_size, offset)


@dataclass(eq=False)
class _Region:
    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    mapping: mmap.mmap
    users: int = 0
    closing: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    def close(self) -> None:
        self.mapping.close()
        os.close(self.fd)


def _object_path(key: str) -> Path:
    name = key.lstrip("/")
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise InvalidInput(
            f"shared memory key {key!r} must name a POSIX shared memory object: '/name', with no "
            "other '/' in it"
        )
    return SHM_DIR / name


class SystemSharedMemory:
    """The registered system shared memory regions of one server process.

    Register, unregister and status run on the event loop; reads and writes may run on
    any thread, so the table is guarded by a lock and every region counts its users.

    Args:
        unavailable: Why this server takes no registrations (several worker processes);
            None allows them. Defaults to None.
    """

    def __init__(self, *, unavailable: str | None = None) -> None:
        self.unavailable = unavailable
        """Why registering is refused here (UNAVAILABLE), or None when it is allowed."""
        self._lock = threading.Lock()
        self._regions: dict[str, _Region] = {}

    def register(self, name: str, key: str, *, offset: int, byte_size: int) -> None:
        """Maps ``byte_size`` bytes at ``offset`` of the object ``key`` as region ``name``.

        Raises:
            InvalidInput: No name, a name already registered, a bad key, an object that
                does not exist or is smaller than ``offset + byte_size``, or a zero size.
            SharedMemoryUnavailable: This server does not take registrations.
        """
        if self.unavailable is not None:
            raise SharedMemoryUnavailable(self.unavailable)
        if not name:
            raise InvalidInput("a shared memory region needs a name")
        if type(offset) is not int or offset < 0 or type(byte_size) is not int or byte_size <= 0:
            raise InvalidInput(
                f"shared memory region {name!r}: offset must be >= 0 and byte_size > 0, "
                f"got offset {offset!r} and byte_size {byte_size!r}"
            )
        path = _object_path(key)
        with self._lock:
            if name in self._regions:
                raise InvalidInput(
                    f"shared memory region {name!r} is already registered; unregister it first"
                )
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidInput(f"shared memory key {key!r}: no such shared memory object") from None
        except OSError as exc:
            raise InvalidInput(f"shared memory key {key!r} cannot be opened: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if offset + byte_size > size:
                raise InvalidInput(
                    f"shared memory region {name!r}: offset {offset} + byte_size {byte_size} is past "
                    f"the end of {key!r} ({size} bytes)"
                )
            mapping = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        region = _Region(name, key, offset, byte_size, fd, mapping)
        with self._lock:
            if name in self._regions:
                region.close()
                raise InvalidInput(
                    f"shared memory region {name!r} is already registered; unregister it first"
                )
            self._regions[name] = region

    def unregister(self, name: str | None = None) -> None:
        """Unregisters one region (nothing when it is not registered), or every region.

        A region in use by a request is closed when that request lets go of it.
        """
        with self._lock:
            if name is None:
                regions = list(self._regions.values())
                self._regions.clear()
            else:
                found = self._regions.pop(name, None)
                regions = [found] if found is not None else []
        for region in regions:
            with region.lock:
                region.closing = True
                if region.users:
                    continue
            region.close()

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        """``[{"name", "key", "offset", "byte_size"}]`` of one region or every region.

        Raises:
            InvalidInput: ``name`` is not registered.
        """
        with self._lock:
            if name is None:
                return [r.status() for _, r in sorted(self._regions.items())]
            region = self._regions.get(name)
        if region is None:
            raise InvalidInput(f"no system shared memory region {name!r} is registered")
        return [region.status()]

    def close(self) -> None:
        """Unregisters every region (the server is stopping)."""
        self.unregister(None)

    def _acquire(self, ref: SharedMemoryRef, where: str, *, writing: bool) -> _Region:
        with self._lock:
            region = self._regions.get(ref.region)
            if region is not None:
                with region.lock:
                    region.users += 1
        if region is None:
            raise InvalidInput(
                f"{where}: shared memory region {ref.region!r} is not registered"
                + (" (it was unregistered while the request ran)" if writing else "")
            )
        return region

    def _release(self, region: _Region) -> None:
        with region.lock:
            region.users -= 1
            last = region.closing and region.users == 0
        if last:
            region.close()

    def _span(self, region: _Region, ref: SharedMemoryRef, size: int, where: str) -> int:
        """Where ``size`` bytes at ``ref.offset`` start, checked against the region and the object."""
        if ref.offset + size > region.byte_size:
            raise InvalidInput(
                f"{where}: offset {ref.offset} + {size} bytes is past the end of shared memory region "
                f"{ref.region!r} ({region.byte_size} bytes)"
            )
        start = region.offset + ref.offset
        # The client may have shrunk the object since: touching a page past its end is SIGBUS.
        if start + size > min(os.fstat(region.fd).st_size, len(region.mapping)):
            raise InvalidInput(
                f"{where}: shared memory object {region.key!r} of region {ref.region!r} is now smaller "
                "than the region"
            )
        return start

    def read(self, ref: SharedMemoryRef, where: str) -> bytes:
        """A copy of the ``ref.byte_size`` bytes ``ref`` names.

        Raises:
            InvalidInput: Unknown region, or bytes outside it.
        """
        region = self._acquire(ref, where, writing=False)
        try:
            start = self._span(region, ref, ref.byte_size, where)
            return region.mapping[start : start + ref.byte_size]
        finally:
            self._release(region)

    def write(self, ref: SharedMemoryRef, data: bytes, where: str) -> None:
        """Writes ``data`` at ``ref``; it must fit in ``ref.byte_size``.

        Raises:
            InvalidInput: Unknown (or meanwhile unregistered) region, ``data`` larger than
                ``ref.byte_size``, or bytes outside the region.
        """
        if len(data) > ref.byte_size:
            raise InvalidInput(
                f"{where} has {len(data)} bytes but its shared memory byte size is {ref.byte_size}"
            )
        region = self._acquire(ref, where, writing=True)
        try:
            # The whole declared range must lie in the region, not only what this output fills.
            start = self._span(region, ref, ref.byte_size, where)
            region.mapping[start : start + len(data)] = data
        finally:
            self._release(region)


def _element_bytes(datatype: str, shape: Any, name: str) -> int | None:
    """Bytes of a fixed-size tensor in Triton's binary format; None for BYTES (length-prefixed)."""
    if datatype == "BYTES":
        return None
    itemsize = 1 if datatype == "BOOL" else np.dtype(to_numpy_dtype(datatype)).itemsize
    dims = list(shape)
    if not all(type(d) is int and d >= 0 for d in dims):
        raise InvalidInput(f"input {name!r} needs a shape of non-negative integers, got {dims!r}")
    return itemsize * math.prod(dims)


def read_shared_tensor(
    shared_memory: SystemSharedMemory | None, ref: SharedMemoryRef, datatype: str, shape: Any, name: str
) -> np.ndarray:
    """Decodes an input from the shared memory region its parameters name.

    Raises:
        InvalidInput: No regions here, an unknown region, bytes outside it, or a byte
            size that does not match the tensor's shape and datatype.
    """
    where = f"input {name!r}"
    if shared_memory is None:
        raise InvalidInput(f"{where} names shared memory region {ref.region!r}; this call takes none")
    expected = _element_bytes(datatype, shape, name)
    if expected is not None and expected != ref.byte_size:
        raise InvalidInput(
            f"{where}: {BYTE_SIZE} is {ref.byte_size} but a {datatype} tensor of shape {list(shape)} "
            f"has {expected} bytes"
        )
    # Copied out while the region is held: the tensor outlives any unregister.
    raw = shared_memory.read(ref, where)
    return decode_binary_tensor(raw, datatype, shape, name)


def write_shared_tensor(
    shared_memory: SystemSharedMemory | None,
    ref: SharedMemoryRef,
    array: np.ndarray,
    datatype: str,
    name: str,
) -> dict[str, Any]:
    """Writes an output to its shared memory region; returns the response's parameters for it.

    Raises:
        InvalidInput: No regions here, the region is gone, or the output does not fit.
    """
    where = f"output {name!r}"
    if shared_memory is None:
        raise InvalidInput(f"{where} names shared memory region {ref.region!r}; this call takes none")
    blob = encode_binary_tensor(array, datatype)
    shared_memory.write(ref, blob, where)
    return ref.response_parameters(len(blob))


CUDA_UNAVAILABLE = (
    "CUDA shared memory is not available: this server takes no CUDA IPC handles (its runtimes "
    "read tensors from host memory); use system shared memory (/v2/systemsharedmemory) instead"
)

"""CUDA helpers for the TensorRT backend, through cuda-python (imported lazily).

The device facts an engine is bound to (:class:`DeviceInfo`), the checked call
wrapper :func:`cuda_check`, and :class:`DeviceBuffer`: on integrated GPUs (Jetson:
``cudaDeviceProp.integrated``) IO buffers are mapped pinned host memory
(``cudaHostAlloc(cudaHostAllocMapped)``): CPU and GPU share the DRAM, so the GPU reads
the buffer numpy wrote and no second copy is made. On a discrete GPU, pinned host
staging buffers plus device buffers and async copies.
"""
from __future__ import annotations

import ctypes
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import EdgeDermError, MissingDependencyError
from ..optional import INSTALL_HINTS


class TensorRTError(EdgeDermError):
    """TensorRT or CUDA refused an operation (deserialise, allocate, execute)."""


def import_cudart() -> Any:
    """cuda-python's runtime API: ``cuda.bindings.runtime`` (12.x+), else the older ``cuda.cudart``."""
    try:
        from cuda.bindings import runtime  # type: ignore[import-not-found,unused-ignore]

        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart  # type: ignore[import-not-found,attr-defined,unused-ignore]

        return cudart
    except ImportError as exc:
        raise MissingDependencyError(
            f"cuda-python is not installed (needed for TensorRT buffers): {exc}. Fix: {INSTALL_HINTS['cuda']}"
        ) from exc


def cuda_check(result: Any, call: str) -> Any:
    """Unpack a cuda-python ``(err, value...)`` tuple; raise :class:`TensorRTError` on an error code."""
    err: Any = result[0] if isinstance(result, tuple) else result
    rest: tuple[Any, ...] = tuple(result[1:]) if isinstance(result, tuple) else ()
    code = int(getattr(err, "value", err))
    if code != 0:
        raise TensorRTError(f"CUDA call {call} failed with {err!r} (code {code})")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


@dataclass(frozen=True)
class DeviceInfo:
    """What an engine is bound to: the GPU and the TensorRT release on this machine."""

    gpu_name: str
    compute_capability: str  # "8.7"
    sm_count: int
    tensorrt_version: str
    integrated: bool = False
    total_memory_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def query_device(device: int = 0, tensorrt_version: str | None = None) -> DeviceInfo:
    """This machine's GPU (through cuda-python) and TensorRT version."""
    cudart = import_cudart()
    prop = cuda_check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode("utf-8", "replace") if isinstance(prop.name, (bytes, bytearray)) else str(prop.name)
    if tensorrt_version is None:
        from ..optional import import_tensorrt

        tensorrt_version = str(import_tensorrt().__version__)
    return DeviceInfo(
        gpu_name=name.rstrip("\x00").strip(),
        compute_capability=f"{int(prop.major)}.{int(prop.minor)}",
        sm_count=int(prop.multiProcessorCount),
        tensorrt_version=tensorrt_version,
        integrated=bool(prop.integrated),
        total_memory_bytes=int(prop.totalGlobalMem),
    )



class DeviceBuffer:
    """One IO tensor's memory: a host view numpy can write and the device address TensorRT reads."""

    def __init__(self, cudart: Any, nbytes: int, mapped: bool) -> None:
        self.cudart, self.nbytes, self.mapped = cudart, max(int(nbytes), 1), mapped
        self.device_ptr = 0
        flags = cudart.cudaHostAllocMapped if mapped else cudart.cudaHostAllocDefault
        self.host_ptr = int(cuda_check(cudart.cudaHostAlloc(self.nbytes, flags), "cudaHostAlloc"))
        if mapped:
            # Integrated GPU: the GPU reads the same DRAM pages; no device copy.
            self.device_ptr = int(cuda_check(cudart.cudaHostGetDevicePointer(self.host_ptr, 0), "cudaHostGetDevicePointer"))
        else:
            self.device_ptr = int(cuda_check(cudart.cudaMalloc(self.nbytes), "cudaMalloc"))

    def host_array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        count = int(np.prod(shape)) if shape else 1
        raw = (ctypes.c_ubyte * (count * dtype.itemsize)).from_address(self.host_ptr)
        return np.frombuffer(memoryview(raw), dtype=dtype, count=count).reshape(shape)

    def free(self) -> None:
        if self.host_ptr:
            self.cudart.cudaFreeHost(self.host_ptr)
            self.host_ptr = 0
        if self.device_ptr and not self.mapped:
            self.cudart.cudaFree(self.device_ptr)
        self.device_ptr = 0

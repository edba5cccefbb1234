"""TensorRT engine runner: the tensor-name API of TensorRT 8.5+ and 10.x.

Decisions (``docs/architecture.md``):

- One code path for 8.5 to 10.x: ``num_io_tensors`` / ``get_tensor_name`` /
  ``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3`` exist from 8.5
  on. Version differences are probed with ``hasattr`` (never by version number
  alone) so a point release that adds or removes a call does not break the runner.
- Which engine runs is decided before anything is deserialised
  (runtime/backends/engines.py); buffers and device facts: runtime/backends/cuda.py.
- Activation memory is supplied by the runtime where the API allows it (8.x
  ``create_execution_context_without_device_memory`` + ``context.device_memory``;
  10.1+ ``USER_MANAGED`` + ``set_device_memory(ptr, size)`` sized by
  ``device_memory_size_v2``), so the figure the memory planner sees is the figure
  that is allocated, once, at load.
- tensorrt and cuda-python are imported lazily (runtime/optional.py). A ``tensorrt``
  that imports but has no ``Builder`` (the ``tensorrt-stubs`` package installs a
  ``tensorrt/`` folder holding only ``.pyi`` files, which Python imports as an empty
  namespace package) counts as not installed.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from ..errors import InputError
from ..optional import import_tensorrt
from .base import Backend, TensorInfo
from .cuda import DeviceBuffer, DeviceInfo, TensorRTError, cuda_check, import_cudart, query_device
from .engines import check_engine_target

log = logging.getLogger(__name__)


# -- optional imports ------------------------------------------------------------------
class _LazyModule:
    """Stands in for a module and imports it on first attribute access (Polygraphy's ``lazy_import``)."""

    def __init__(self, loader: Callable[[], ModuleType]) -> None:
        self._loader = loader
        self._module: ModuleType | None = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name != "__version__":
            raise AttributeError(name)
        if self._module is None:
            self._module = self._loader()
        return getattr(self._module, name)


if TYPE_CHECKING:
    # mypy checks every ``trt.`` call against the tensorrt-stubs package.
    import tensorrt as trt
else:
    trt = _LazyModule(import_tensorrt)


_TRT_TO_NUMPY = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "INT32": "int32", "INT64": "int64",
                 "BOOL": "bool", "UINT8": "uint8", "BF16": "float32"}


def dims_tuple(dims: trt.Dims) -> tuple[int, ...]:
    """TensorRT ``Dims`` -> tuple of ints (-1 for a dynamic axis)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


class TensorRTBackend(Backend):
    """Runs one serialised engine; batches above the profile's maximum are split."""

    name = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike[str], entry: Mapping[str, Any] | None = None,
                 device: DeviceInfo | None = None, device_index: int = 0) -> None:
        import_tensorrt("the TensorRT backend")  # the install hint, before any CUDA call
        cudart = import_cudart()
        self._cudart = cudart
        self._buffers: dict[str, DeviceBuffer] = {}
        self._activation_ptr = 0
        self._activation_bytes = 0
        self._stream = 0
        device = device or query_device(device_index, str(trt.__version__))
        if entry is not None:
            reasons = check_engine_target(entry, device)
            if reasons:  # callers go through select_engine; this guards direct use
                raise TensorRTError(f"engine {engine_path} does not match this device: {'; '.join(reasons)}")
        cuda_check(cudart.cudaSetDevice(device_index), "cudaSetDevice")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        plan = Path(engine_path).read_bytes()
        engine: trt.ICudaEngine | None = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise TensorRTError(
                f"TensorRT {trt.__version__} could not deserialise {engine_path} (built for "
                f"{(entry or {}).get('target')}); rebuild it on this device with `edgederm build`"
            )
        self._engine = engine
        self._context = self._create_context(engine)
        self._stream = int(cuda_check(cudart.cudaStreamCreate(), "cudaStreamCreate"))
        self._inputs: list[TensorInfo] = []
        self._outputs: list[TensorInfo] = []
        self._max_shape: dict[str, tuple[int, ...]] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = _TRT_TO_NUMPY.get(engine.get_tensor_dtype(name).name, "float32")
            shape = dims_tuple(engine.get_tensor_shape(name))
            info = TensorInfo(name, tuple(d if d >= 0 else "batch" for d in shape), dtype)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self._inputs.append(info)
                self._max_shape[name] = dims_tuple(engine.get_tensor_profile_shape(name, 0)[2])
            else:
                self._outputs.append(info)
        self.max_batch = min(s[0] for s in self._max_shape.values()) if self._max_shape else 1
        # Output sizes at the largest profile shapes, so buffers are allocated once.
        for name, shape in self._max_shape.items():
            self._context.set_input_shape(name, shape)
        self._integrated = device.integrated
        for info in self._inputs + self._outputs:
            shape = self._max_shape.get(info.name) or dims_tuple(self._context.get_tensor_shape(info.name))
            nbytes = int(np.prod(shape)) * np.dtype(info.dtype).itemsize
            self._buffers[info.name] = DeviceBuffer(cudart, nbytes, mapped=self._integrated)

    def _create_context(self, engine: trt.ICudaEngine) -> trt.IExecutionContext:
        cudart = self._cudart
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        context: trt.IExecutionContext | None
        if strategy is not None and hasattr(trt.IExecutionContext, "set_device_memory"):
            # 10.1+: the runtime owns activation memory, sized for the largest profile.
            size = int(engine.device_memory_size_v2)
            context = engine.create_execution_context(strategy.USER_MANAGED)
            self._activation_bytes = size
            self._activation_ptr = int(cuda_check(cudart.cudaMalloc(max(size, 1)), "cudaMalloc"))
            if context is not None:
                context.set_device_memory(self._activation_ptr, size)
        elif hasattr(engine, "create_execution_context_without_device_memory"):
            # 8.5 to 10.0: same idea through the older calls.
            size = int(engine.device_memory_size)
            context = engine.create_execution_context_without_device_memory()
            self._activation_bytes = size
            self._activation_ptr = int(cuda_check(cudart.cudaMalloc(max(size, 1)), "cudaMalloc"))
            if context is not None:
                # Not in the 10.x stubs (removed there); set by name so 8.x keeps working.
                setattr(context, "device_memory", self._activation_ptr)
        else:
            context = engine.create_execution_context()
        if context is None:
            raise TensorRTError("TensorRT could not create an execution context (out of device memory?)")
        return context

    def memory_bytes(self) -> int | None:
        return self._activation_bytes + sum(b.nbytes * (1 if b.mapped else 2) for b in self._buffers.values())

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = next(iter(feed.values())).shape[0] if feed else 1
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, batch, self.max_batch):
            parts.append(self._run_batch({k: v[start:start + self.max_batch] for k, v in feed.items()}))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _run_batch(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, context = self._cudart, self._context
        kind_h2d, kind_d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for info in self._inputs:
            array = np.ascontiguousarray(feed[info.name])
            buffer = self._buffers[info.name]
            buffer.host_array(array.shape, array.dtype)[...] = array
            if not buffer.mapped:
                cuda_check(cudart.cudaMemcpyAsync(buffer.device_ptr, buffer.host_ptr, array.nbytes, kind_h2d, self._stream),
                           "cudaMemcpyAsync")
            if not context.set_input_shape(info.name, array.shape):
                raise InputError(f"TensorRT refused input {info.name!r} of shape {array.shape}; "
                                 f"the engine's profile allows up to {self._max_shape[info.name]}")
            context.set_tensor_address(info.name, buffer.device_ptr)
        shapes: dict[str, tuple[int, ...]] = {}
        for info in self._outputs:
            shapes[info.name] = dims_tuple(context.get_tensor_shape(info.name))
            context.set_tensor_address(info.name, self._buffers[info.name].device_ptr)
        if not context.execute_async_v3(self._stream):
            raise TensorRTError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        results = {}
        for info in self._outputs:
            buffer, dtype = self._buffers[info.name], np.dtype(info.dtype)
            nbytes = int(np.prod(shapes[info.name])) * dtype.itemsize
            if not buffer.mapped:
                cuda_check(cudart.cudaMemcpyAsync(buffer.host_ptr, buffer.device_ptr, nbytes, kind_d2h, self._stream),
                           "cudaMemcpyAsync")
        cuda_check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        for info in self._outputs:
            # Copy out: the host buffer is reused by the next batch.
            results[info.name] = self._buffers[info.name].host_array(shapes[info.name], np.dtype(info.dtype)).copy()
        return results

    def close(self) -> None:
        """Free CUDA memory now (it is also freed when the backend is garbage-collected)."""
        for buffer in self._buffers.values():
            buffer.free()
        self._buffers = {}
        if self._activation_ptr:
            self._cudart.cudaFree(self._activation_ptr)
            self._activation_ptr = 0
        if self._stream:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = 0

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass


def load_engines(manifest: Any, chosen: Mapping[str, Mapping[str, Any]],
                 device: DeviceInfo | None = None) -> dict[str, TensorRTBackend]:
    """``{stage: backend}`` for the engine entries ``select_engines`` chose; raises
    (TensorRTError, MissingDependencyError, BundleError, OSError) when one cannot be
    opened, after freeing those already opened."""
    from ..bundle import resolve_inside

    stages: dict[str, TensorRTBackend] = {}
    try:
        for stage, entry in chosen.items():
            stages[stage] = TensorRTBackend(resolve_inside(Path(manifest.root), entry["file"]), entry, device)
    except BaseException:
        for backend in stages.values():
            backend.close()
        raise
    return stages

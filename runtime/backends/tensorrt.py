"""TensorRT engine backend: the tensor-name API of TensorRT 8.5+ and 10.x, buffers through cuda-python.

Decisions (ARCHITECTURE.md, specs/JETSON.md):

- One code path for 8.5 to 10.x: ``num_io_tensors`` / ``get_tensor_name`` /
  ``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3`` exist from 8.5
  on. Version differences are probed with ``hasattr`` (never by version number
  alone) so a point release that adds or removes a call does not break the runner.
- An engine is checked against the device BEFORE it is deserialised
  (:func:`check_engine_target`): a plan built for another GPU, compute capability,
  SM count or TensorRT release either fails to deserialise or runs with tactics
  tuned for another chip. A mismatch is never silent: :func:`select_engine` returns
  the reason, and the runtime falls back to ONNX Runtime and records it.
- Engine files are named and checked by :func:`engine_cache_key`: a hash of the
  ONNX graph, TensorRT version, GPU name, compute capability, SM count, precision
  and profile shapes (STYLE.md 11). A file name alone is never trusted.
- Activation memory is supplied by the runtime where the API allows it (8.x
  ``create_execution_context_without_device_memory`` + ``context.device_memory``;
  10.1+ ``USER_MANAGED`` + ``set_device_memory(ptr, size)`` sized by
  ``device_memory_size_v2``), so the figure the memory planner sees is the figure
  that is allocated, once, at load.
- On integrated GPUs (Jetson: ``cudaDeviceProp.integrated``) IO buffers are mapped
  pinned host memory (``cudaHostAlloc(cudaHostAllocMapped)``): CPU and GPU share the
  DRAM, so the GPU reads the buffer numpy wrote and no second copy is made. On a
  discrete GPU, pinned host staging buffers plus device buffers and async copies.
- tensorrt and cuda-python are imported lazily (runtime/optional.py). A ``tensorrt``
  that imports but has no ``Builder`` (the ``tensorrt-stubs`` package installs a
  ``tensorrt/`` folder holding only ``.pyi`` files, which Python imports as an empty
  namespace package) counts as not installed.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import BundleError, EdgeDermError, InputError, MissingDependencyError
from ..optional import INSTALL_HINTS, optional_import
from .base import Backend, TensorInfo

log = logging.getLogger(__name__)

ENGINE_PRECISIONS = ("fp16", "int8")


class TensorRTError(EdgeDermError):
    """TensorRT or CUDA refused an operation (deserialise, allocate, execute)."""


# -- optional imports ------------------------------------------------------------------
def import_tensorrt(purpose: str = "TensorRT engines") -> ModuleType:
    """The real ``tensorrt`` module, or :class:`MissingDependencyError` with the install hint."""
    trt = optional_import("tensorrt", purpose)
    if not hasattr(trt, "Builder") or not hasattr(trt, "__version__"):
        # Type stubs alone make ``import tensorrt`` succeed as an empty namespace package.
        raise MissingDependencyError(
            f"TensorRT is not installed (needed for {purpose}): 'tensorrt' imports from "
            f"{list(getattr(trt, '__path__', []))} but is not the TensorRT Python package (type stubs only?). "
            f"Fix: {INSTALL_HINTS['tensorrt']}"
        )
    return trt


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


def tensorrt_available() -> bool:
    """True when the real TensorRT Python package imports; never raises."""
    try:
        import_tensorrt()
    except Exception:
        return False
    return True


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


# -- device and version facts ------------------------------------------------------------
def version_tuple(version: str | Sequence[int] | None) -> tuple[int, ...]:
    """``"10.3.0.30"`` -> ``(10, 3, 0, 30)``; empty for None or text without numbers."""
    if version is None:
        return ()
    if not isinstance(version, str):
        return tuple(int(v) for v in version)
    return tuple(int(p) for p in re.findall(r"\d+", version))


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
        tensorrt_version = str(import_tensorrt().__version__)
    return DeviceInfo(
        gpu_name=name.rstrip("\x00").strip(),
        compute_capability=f"{int(prop.major)}.{int(prop.minor)}",
        sm_count=int(prop.multiProcessorCount),
        tensorrt_version=tensorrt_version,
        integrated=bool(prop.integrated),
        total_memory_bytes=int(prop.totalGlobalMem),
    )


# -- engine cache key and target check (pure Python) --------------------------------------------
def engine_cache_key(model_sha256: str, tensorrt_version: str, gpu_name: str, sm_count: int, precision: str,
                     profile_shapes: Mapping[str, Mapping[str, Sequence[int]]],
                     compute_capability: str | None = None) -> str:
    """sha256 over everything that changes an engine (STYLE.md 11); used in engine file names and checked at load."""
    canonical = {
        "model_sha256": model_sha256,
        "tensorrt_version": ".".join(str(v) for v in version_tuple(tensorrt_version)),
        "gpu_name": gpu_name.strip(),
        "compute_capability": compute_capability,
        "sm_count": int(sm_count),
        "precision": precision,
        "profiles": {name: {k: [int(d) for d in dims] for k, dims in sorted(p.items())}
                     for name, p in sorted(profile_shapes.items())},
    }
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def check_engine_target(entry: Mapping[str, Any], device: DeviceInfo) -> list[str]:
    """Why the engine in manifest ``entry`` cannot run on ``device``; empty when it can.

    Compared: GPU name, compute capability, SM count and TensorRT major.minor.patch
    (plans are not portable across TensorRT releases; the build number may differ).
    """
    target = entry.get("target") or {}
    reasons: list[str] = []
    if not target:
        return [f"engine {entry.get('file')!r} records no target (GPU, compute capability, TensorRT version)"]
    name = str(target.get("gpu_name", "")).strip()
    if name.lower() != device.gpu_name.strip().lower():
        reasons.append(f"built for GPU {name!r}, this device is {device.gpu_name!r}")
    if str(target.get("compute_capability")) != device.compute_capability:
        reasons.append(f"built for compute capability {target.get('compute_capability')}, "
                       f"this device has {device.compute_capability}")
    if target.get("sm_count") is not None and int(target["sm_count"]) != device.sm_count:
        reasons.append(f"built for {target['sm_count']} SMs, this device has {device.sm_count}")
    built, have = version_tuple(target.get("tensorrt_version")), version_tuple(device.tensorrt_version)
    if built[:3] != have[:3]:
        reasons.append(f"built with TensorRT {target.get('tensorrt_version')}, this device has {device.tensorrt_version}")
    return reasons


def _manifest_data(manifest: Any) -> Mapping[str, Any]:
    return manifest.data if hasattr(manifest, "data") else manifest


def select_engine(manifest: Any, device: DeviceInfo, stage: str, precision: str | None = None
                  ) -> tuple[dict[str, Any] | None, str]:
    """The manifest's engine entry for ``stage`` that runs on ``device``, and why (or why none does).

    ``precision`` None prefers int8 over fp16. Returns ``(entry, "")`` on a match,
    ``(None, reason)`` otherwise; the reason names each engine and what did not match.
    """
    engines = [e for e in _manifest_data(manifest).get("engines") or [] if e.get("stage") == stage]
    if not engines:
        return None, f"bundle has no TensorRT engine for stage {stage!r} (build one with `edgederm build`)"
    order = [precision] if precision else ["int8", "fp16"]
    candidates = [e for p in order for e in engines if e.get("precision") == p]
    if not candidates:
        have = sorted({str(e.get("precision")) for e in engines})
        return None, f"bundle has no {precision} TensorRT engine for stage {stage!r} (has {', '.join(have)})"
    rejected = []
    for entry in candidates:
        reasons = check_engine_target(entry, device)
        if not reasons:
            return dict(entry), ""
        rejected.append(f"{entry.get('file')}: " + "; ".join(reasons))
    return None, "no TensorRT engine matches this device (" + " | ".join(rejected) + ")"


def select_engines(manifest: Any, device: DeviceInfo | None = None, precision: str | None = None
                   ) -> tuple[dict[str, dict[str, Any]] | None, str]:
    """One matching engine per stage, all of one precision, or ``(None, reason)`` to fall back to ONNX Runtime.

    Nothing is deserialised here: it checks that TensorRT and cuda-python import,
    queries the device (unless ``device`` is given) and compares the manifest's
    engine targets with it.
    """
    data = _manifest_data(manifest)
    if not data.get("engines"):
        return None, "bundle has no TensorRT engines (build them with `edgederm build BUNDLE --precision fp16|int8`)"
    if device is None:
        try:
            import_tensorrt()
            device = query_device()
        except (MissingDependencyError, TensorRTError) as exc:
            return None, f"TensorRT engines not used: {exc}"
    stages = [s["name"] for s in data["stages"]]
    reasons = []
    for p in [precision] if precision else ["int8", "fp16"]:
        chosen: dict[str, dict[str, Any]] = {}
        for stage in stages:
            entry, reason = select_engine(data, device, stage, p)
            if entry is None:
                reasons.append(reason)
                break
            chosen[stage] = entry
        else:
            return chosen, ""
    return None, "TensorRT engines not used: " + "; ".join(dict.fromkeys(reasons))


# -- memory size parsing (shared with the builder) ----------------------------------------------------
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_bytes(value: int | float | str | None) -> int | None:
    """``"3.5GiB"``, ``"512MiB"``, ``"2GB"`` or a number of bytes -> int; None stays None."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise InputError(f"memory size {value!r} must be positive (bytes), e.g. 3758096384 or '3.5GiB'")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise InputError(f"memory size {value!r} is not understood; expected a positive size like '3.5GiB', "
                         f"'512MiB', '2GB' or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


# -- the runner ---------------------------------------------------------------------------------------
_TRT_TO_NUMPY = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "INT32": "int32", "INT64": "int64",
                 "BOOL": "bool", "UINT8": "uint8", "BF16": "float32"}


def dims_tuple(dims: trt.Dims) -> tuple[int, ...]:
    """TensorRT ``Dims`` -> tuple of ints (-1 for a dynamic axis)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


class _Buffer:
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


class TensorRTBackend(Backend):
    """Runs one serialised engine; batches above the profile's maximum are split."""

    name = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike[str], entry: Mapping[str, Any] | None = None,
                 device: DeviceInfo | None = None, device_index: int = 0) -> None:
        import_tensorrt("the TensorRT backend")  # the install hint, before any CUDA call
        cudart = import_cudart()
        self._cudart = cudart
        self._buffers: dict[str, _Buffer] = {}
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
            self._buffers[info.name] = _Buffer(cudart, nbytes, mapped=self._integrated)

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


def load_engine_stages(manifest: Any, precision: str | None = None, device: DeviceInfo | None = None
                       ) -> tuple[dict[str, TensorRTBackend] | None, str | None, str]:
    """``({stage: backend}, precision, "")`` when every stage has a matching engine, else ``(None, None, reason)``.

    The runtime's backend choice calls this for ``backend="auto"`` and ``"tensorrt"``;
    a reason is recorded in the model's notes when it falls back to ONNX Runtime.
    """
    from .. import bundle as bundle_io

    chosen, reason = select_engines(manifest, device, precision)
    if chosen is None:
        return None, None, reason
    root = Path(manifest.root)
    stages: dict[str, TensorRTBackend] = {}
    try:
        for stage, entry in chosen.items():
            stages[stage] = TensorRTBackend(bundle_io.resolve_inside(root, entry["file"]), entry, device)
    except (TensorRTError, MissingDependencyError, BundleError, OSError) as exc:
        for backend in stages.values():
            backend.close()
        return None, None, f"TensorRT engines not used: {exc}"
    return stages, next(iter(chosen.values()))["precision"], ""

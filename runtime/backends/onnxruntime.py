"""ONNX Runtime backend: CPU (the embedded default), CUDA or TensorRT providers.

Sessions are set up for predictable memory on a device that shares DRAM between
CPU and GPU: a fixed number of threads (default 2, the device's big cores), the
memory-pattern planner on (shapes repeat tile after tile), and the CPU arena on
with ``kSameAsRequested`` growth so it does not double its reservation.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..cpu import cpu_identity
from ..errors import GraphLoadError
from ..optional import optional_import
from .base import Backend, TensorInfo

log = logging.getLogger(__name__)

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(bool)": "bool"}



def cpu_session(graph: str | os.PathLike[str] | Any, threads: int | None = None) -> Any:
    """A plain ONNX Runtime CPU session (quiet log, ORT's default optimisations) for the
    tools that run one graph directly: calibration, sensitivity, parity checks, benchmarks.

    ``graph``: a path or an in-memory ModelProto. ``threads``: intra-op threads (None:
    ORT's default, all cores). The runtime's own sessions are :class:`OnnxRuntimeBackend`.
    """
    ort = optional_import("onnxruntime", "the ONNX Runtime backend")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    source = graph.SerializeToString() if hasattr(graph, "SerializeToString") else str(graph)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def available_providers() -> list[str]:
    ort = optional_import("onnxruntime", "the ONNX Runtime backend")
    return list(ort.get_available_providers())


_SHARED_ARENA: list[bool] = []  # registered once per process (ORT keeps it global)


def _register_shared_cpu_arena(ort: object) -> bool:
    """Register one CPU arena with ``kSameAsRequested`` growth for the process; False if ORT refuses."""
    if not _SHARED_ARENA:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)  # type: ignore[attr-defined]
            config = ort.OrtArenaCfg({"arena_extend_strategy": 1, "max_mem": 0,  # type: ignore[attr-defined]
                                      "initial_chunk_size_bytes": -1, "max_dead_bytes_per_chunk": -1})
            ort.create_and_register_allocator(info, config)  # type: ignore[attr-defined]
            _SHARED_ARENA.append(True)
        except Exception:  # an ORT build without env allocators: per-session arenas
            _SHARED_ARENA.append(False)
    return _SHARED_ARENA[0]


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(
        self,
        graph: str | os.PathLike[str] | bytes,
        providers: list[str] | None = None,
        threads: int | None = None,
        optimized_cache: str | os.PathLike[str] | None = None,
        arena: str = "session",
        optimize: bool = True,
    ) -> None:
        """``arena``: "session" (ORT's own per-session CPU arena), "same_as_requested"
        (one process-wide CPU arena shared by all sessions that grows by exactly what
        is requested, so peak memory is linear in the tile batch), or "off".
        ``optimize=False`` loads a graph that is already optimised (a cached one)."""
        ort = optional_import("onnxruntime", "the ONNX Runtime backend")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads or min(2, os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.enable_mem_pattern = True
        options.enable_cpu_mem_arena = arena != "off"
        shared_arena = arena == "same_as_requested" and _register_shared_cpu_arena(ort)
        options.add_session_config_entry("session.use_env_allocators", "1" if shared_arena else "0")
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        if optimized_cache is not None:
            # ORT writes the optimised graph once; later starts load it directly.
            options.optimized_model_filepath = str(optimized_cache)
        providers = providers or ["CPUExecutionProvider"]
        source = graph if isinstance(graph, bytes) else str(Path(graph))  # bytes: a graph decrypted in memory
        try:
            self.session = ort.InferenceSession(source, options, providers=providers)
        except Exception as exc:  # InvalidProtobuf, Fail, NotImplemented ...: ORT's own types
            if type(exc).__module__.startswith("onnxruntime"):
                name = "<decrypted graph>" if isinstance(graph, bytes) else Path(graph).name
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise GraphLoadError(
                    f"ONNX Runtime cannot load graph {name!r} ({type(exc).__name__}: {first[:300]}); "
                    "it is not a valid ONNX model for this ONNX Runtime. Fix: re-export the bundle, or upgrade "
                    "onnxruntime if the graph needs a newer opset"
                ) from exc
            raise
        self.providers = self.session.get_providers()
        self._inputs = [TensorInfo(i.name, tuple(i.shape), _ORT_TYPES.get(i.type, i.type)) for i in self.session.get_inputs()]
        self._outputs = [TensorInfo(o.name, tuple(o.shape), _ORT_TYPES.get(o.type, o.type)) for o in self.session.get_outputs()]
        self._output_names = [o.name for o in self._outputs]

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.session.run(self._output_names, feed)
        return dict(zip(self._output_names, results))


# --------------------------------------------------------------------------- optimised-graph cache


def cache_dir() -> Path | None:
    """``$EDGEDERM_CACHE``, or ``$XDG_CACHE_HOME/edgederm``, or ``~/.cache/edgederm``; None if "off"."""
    configured = os.environ.get("EDGEDERM_CACHE")
    if configured is not None:
        if configured.strip().lower() in ("", "0", "off", "none", "false"):
            return None
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgederm"


def optimized_cache_key(graph_sha256: str, ort_version: str, providers: list[str], threads: int | None) -> str:
    """Everything that changes an optimised graph: the verified bytes of the source graph
    (never a manifest's claim), ONNX Runtime, providers, session options and the CPU."""
    text = "|".join([graph_sha256, ort_version, ",".join(providers), session_options_id(threads), cpu_identity()])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def session_options_id(threads: int | None) -> str:
    return f"opt=all;arena=same_as_requested;threads={threads or min(2, os.cpu_count() or 1)}"


def open_cached(graph: Path | bytes, graph_sha256: str | None, providers: list[str], threads: int | None,
                folder: Path | None) -> tuple[OnnxRuntimeBackend, bool | None]:
    """A runtime session for ``graph`` through the optimised-graph cache in ``folder``.

    ``graph_sha256``: the sha256 of the bytes the bundle check read (None: hashed here).
    Returns the backend and whether the cache was hit (None: cache off or unwritable).
    An entry is used only when its own sha256 (sidecar) matches; a damaged or
    unreadable entry is rebuilt, and writes are atomic (temp file + rename).
    """
    from ..bundle import sha256_file, write_json_atomic

    def session(path: str | os.PathLike[str] | bytes, **options: Any) -> OnnxRuntimeBackend:
        return OnnxRuntimeBackend(path, providers, threads, arena="same_as_requested", **options)

    if folder is None or isinstance(graph, bytes):  # bytes: decrypted in memory, never cached on disk
        return session(graph), None
    ort = optional_import("onnxruntime", "the ONNX Runtime backend")
    source_sha = graph_sha256 or sha256_file(graph)
    key = optimized_cache_key(source_sha, ort.__version__, providers, threads)
    cached, sidecar = folder / f"{key}.onnx", folder / f"{key}.json"
    if cached.is_file() and sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text())
            if meta.get("graph_sha256") == source_sha and meta.get("sha256") == sha256_file(cached):
                return session(cached, optimize=False), True
            log.warning("optimised-graph cache %s does not match its recorded sha256; rebuilding it", cached)
        except Exception as exc:  # a damaged cache never stops a load: rebuild it
            log.warning("optimised-graph cache %s unusable (%s); rebuilding it", cached, exc)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".onnx.tmp", dir=folder)
        os.close(fd)
    except OSError as exc:
        log.warning("optimised-graph cache disabled: cannot write %s (%s); set EDGEDERM_CACHE", folder, exc)
        return session(graph), None
    try:
        # The session that writes the optimised graph keeps ~the model's size of extra
        # memory for its life (measured: +120 MB on a ViT-S window encoder), so it is
        # only used to write the file; the model runs on a session loaded from it.
        writer = session(graph, optimized_cache=tmp)
        del writer
        digest = sha256_file(tmp)
        write_json_atomic(sidecar, {"sha256": digest, "graph_sha256": source_sha, "onnxruntime": ort.__version__,
                                    "providers": providers, "options": session_options_id(threads)})
        os.replace(tmp, cached)
        return session(cached, optimize=False), False
    except OSError as exc:
        log.warning("could not store optimised graph in %s: %s", folder, exc)
        return session(graph), None
    finally:
        Path(tmp).unlink(missing_ok=True)

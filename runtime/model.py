"""``load(bundle)`` -> :class:`DeployedModel` -> ``predict(...)`` -> :class:`Result`.

The runtime imports numpy, OpenCV and (lazily) ONNX Runtime only. It runs the
stages a bundle declares with the same preprocessing code training used
(``edgederm.runtime.preprocess``), applies the temperature stored in the bundle,
and decides ``needs_review`` from the bundle's clinical settings.

Everything is driven by the manifest; there is no model-specific code here.

* Segmenters (task ``segment``: one stage fed from ``"dermoscopy"``, output
  ``N x K x T x T`` logits): overlapping tiles of the model's input size
  (``tiling.tile``, ``overlap``, ``blend`` from the manifest; defaults tile =
  input size, 0.25, gaussian), each tile batch preprocessed from the uint8 image
  with colour statistics of the whole image taken once on a downsampled copy,
  blended in a band of rows (``runtime.tiling.sliding_window`` with ``on_rows``),
  and reduced on the fly to a uint8 mask and a float32 heatmap (lesion
  probability; ``1 - p(background)`` for K > 1, ``sigmoid`` for K = 1) at input
  resolution. Probabilities, not logits, are blended (as MONAI blends what the
  predictor returns).
* Staged models (several stages, e.g. RemixFormer++): each input names a
  ``source``: ``"dermoscopy"`` (whole image at the input size),
  ``"dermoscopy_windows"`` (the image resized to the manifest's window grid
  ``tiling.window x tiling.grid`` and streamed window batch by window batch; only
  the ``G x D`` embedding matrix is kept), ``"<stage>.<output>"`` (an earlier
  stage's output, reshaped to the declared shape, so ``B*G`` window embeddings
  become ``B x G x D``), ``"clinical"`` (the clinical image at the stage's input
  size, with its own colour statistics), ``"metadata"`` (encoded with the
  manifest's schema) and ``"modality_mask"`` (``1 x M``: which of the model's
  modalities, in manifest order, are present). A request runs only the stages it
  needs: a stage whose input comes from an absent modality is skipped, and a
  stage that takes a ``modality_mask`` gets zeros for what was skipped (what the
  model saw in training with that modality dropped).
* Memory: ``memory_budget`` is planned by ``runtime.memory`` from the profile
  export measured (``manifest["memory"]``) into a tile/window batch size, at
  load for a reference image (``plan_image_size``, default 2048 px a side) and
  again per image; a budget that cannot be met raises MemoryBudgetError naming
  the minimum.
* Fast start: the ONNX Runtime-optimised graph of each stage is cached in
  ``$EDGEDERM_CACHE`` (default ``~/.cache/edgederm``; ``off`` disables), keyed by
  the graph's sha256, the ONNX Runtime version, the providers and the CPU's
  feature flags (an optimised CPU graph bakes in the SIMD block layout). The
  cached file's own sha256 is kept beside it and checked before use; a mismatch
  rebuilds it.
* Input policy: images smaller than :data:`MIN_IMAGE_SIDE` px on a side are
  refused (there is no lesion in a 1x1 image), and so are whole-image
  classifier inputs with an aspect ratio above :data:`MAX_ASPECT_RATIO` (a
  20000x20 strip stretched to 224x224 is not a photo); segmenters tile any shape.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import cv2
import numpy as np

from . import preprocess as pp
from .backends.base import Backend
from .backends.remote import SCHEME as REMOTE_SCHEME  # backend="triton://HOST:PORT"
from .bundle import Manifest, read_manifest, sha256_file, write_json_atomic
from .errors import BundleError, InputError
from .imageio import DEFAULT_MAX_PIXELS, as_rgb_uint8, read_image_within
from .memory import MemoryPlan, MemoryProfile, parse_size, plan_batch, segment_buffers, window_buffers
from .result import Result

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt")
MIN_IMAGE_SIDE = 8
MAX_ASPECT_RATIO = 10.0
DEFAULT_OVERLAP = 0.25
DEFAULT_BLEND = "gaussian"
DEFAULT_TILE_BATCH = 4
IMAGE_SOURCES = ("dermoscopy", "dermoscopy_windows", "clinical")
OTHER_SOURCES = ("metadata", "modality_mask")


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this process's own
    address space. ``ru_maxrss`` is not used there because the kernel carries it
    over ``fork`` + ``exec``: a runtime started by a large parent (a Python that had
    torch loaded) would report the parent's peak.
    """
    peak_kib = _proc_status_kib("VmHWM")
    if peak_kib is not None:
        return peak_kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    """Resident set size now (Linux ``VmRSS``; elsewhere the peak, the best available)."""
    rss_kib = _proc_status_kib("VmRSS")
    return rss_kib * 1024 if rss_kib is not None else peak_rss_bytes()


def _proc_status_kib(field: str) -> int | None:
    """A ``kB`` field of Linux's /proc/self/status, or None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def softmax(logits: np.ndarray, temperature: float = 1.0, axis: int = -1) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


def tile_probabilities(logits: np.ndarray) -> np.ndarray:
    """``N x K x T x T`` logits -> probabilities in float32: softmax over K, or sigmoid for K = 1."""
    x = np.asarray(logits, dtype=np.float32)
    if x.shape[1] == 1:
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32, copy=False)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    e /= e.sum(axis=1, keepdims=True)
    return e


def _choose_precision(manifest: Manifest, precision: str, device: str) -> str:
    available = manifest.precisions()
    if precision != "auto":
        if precision not in available:
            raise BundleError(
                f"precision {precision!r} is not in bundle {manifest.root} (available: {available}); "
                f"fix: `edgederm quantize {manifest.root} --precision {precision}` or use precision='auto'"
            )
        return precision
    if device == "cpu":
        measured = _fastest_measured_on_cpu(manifest, available)
        if measured is not None:
            return measured
    preferred = ("fp16", "int8", "fp32") if device != "cpu" else ("int8", "int8_dynamic", "fp32")
    for p in preferred:
        if p in available:
            return p
    return available[0]


CPU_REDUCED = ("int8", "int8_dynamic")


def _fastest_measured_on_cpu(manifest: Manifest, available: list[str]) -> str | None:
    """``precision="auto"`` on CPU: the graph with the best speed-up over fp32 that
    ``edgederm quantize`` measured (calibration[p]["latency"], fp32 and p timed in one
    run), among those that met their agreement target; fp32 when none is faster.

    Why: on a CPU, INT8 is not always faster (small models spend their time in
    quantize/dequantize). None when a CPU graph of the bundle has no measurement
    (bundles quantized before it was recorded): the fixed order applies.
    """
    present = [p for p in CPU_REDUCED if p in available]
    calibration = manifest.data.get("calibration") or {}
    entries = {p: calibration.get(p) or {} for p in present}
    if not present or any((e.get("latency") or {}).get("speedup") is None for e in entries.values()):
        return None
    speedups = {p: float(e["latency"]["speedup"]) for p, e in entries.items()
                if (e.get("target") or {}).get("reached") is not False}
    best = max(speedups, key=lambda p: speedups[p], default=None)
    choice = best if best is not None and speedups[best] > 1.0 else "fp32"
    log.info("precision auto on CPU: %s (speed-up over fp32 measured at quantize time: %s)", choice, speedups)
    return choice


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


def _cpu_identity() -> str:
    """Machine + CPU feature flags: an ORT-optimised CPU graph may bake in the SIMD layout."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        flags = platform.processor()
    return f"{platform.machine()}|{hashlib.sha256(flags.encode()).hexdigest()[:16]}"


def optimized_cache_key(graph_sha256: str, ort_version: str, providers: list[str]) -> str:
    text = "|".join([graph_sha256, ort_version, ",".join(providers), _cpu_identity(), "opt=all"])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- the model


class DeployedModel:
    """A loaded bundle: its stages on one backend, ready to predict."""

    #: Pixels an image file may declare in ``predict_file`` (larger: reduced decoding or a refusal).
    max_image_pixels: int = DEFAULT_MAX_PIXELS

    def __init__(self, manifest: Manifest, backend: str = "auto", precision: str = "auto",
                 threads: int | None = None, memory_budget: int | str | None = None,
                 cache: bool = True, plan_image_size: int | tuple[int, int] = 2048, key_provider: Any = None) -> None:
        self.manifest = manifest
        self.key_provider = key_provider
        self.signature: Any = None  # runtime.signing.SignatureInfo when keys were pinned at load
        self.audit: Any = None  # runtime.audit.AuditLog when load(audit_log=...)
        self.notes: list[str] = []
        self.model_info = manifest.model
        self.task = self.model_info["task"]
        self.class_names: list[str] = list(self.model_info["class_names"])
        self.modalities: list[str] = list(self.model_info.get("modalities", ["dermoscopy"]))
        self.preprocess_config = pp.PreprocessConfig.from_dict(manifest.preprocess)
        self.clinical = manifest.clinical
        self.tiling: dict[str, Any] = dict(manifest.data.get("tiling") or {})
        self.memory_budget = memory_budget
        self.memory_budget_bytes = parse_size(memory_budget) if memory_budget is not None else None
        self.memory_profile = MemoryProfile.from_manifest(manifest.data.get("memory"))
        self.last_run: dict[str, Any] = {}  # tiles, batch size, plan of the latest predict (benchmarks read it)
        self._check_sources()
        self._requested_precision = precision  # TensorRT engines are chosen per precision in _choose_backend
        self.backend_name, providers = self._choose_backend(backend)
        device = "cpu" if providers == ["CPUExecutionProvider"] else "gpu"
        engine_precision: str | None = getattr(self, "_engine_precision", None)  # set with the engines
        self.precision: str = (engine_precision if self.backend_name == "tensorrt" and engine_precision
                               else _choose_precision(manifest, precision, device))
        self.cache_hits: dict[str, bool] = {}
        start = time.perf_counter()
        self.stages: dict[str, Backend] = {}
        for stage in manifest.stages:
            self.stages[stage["name"]] = self._open_stage(stage, providers, threads, cache)
        self.load_ms = (time.perf_counter() - start) * 1000
        log.info("loaded %s: backend %s, precision %s (%.0f ms)", manifest.root, self.backend_name, self.precision,
                 self.load_ms)
        self.memory_plan: MemoryPlan | None = None
        if self.memory_budget_bytes is not None:
            if self.memory_profile is None:
                self._fallback(
                    f"memory_budget {memory_budget!r} cannot be planned: bundle {manifest.root} has no measured "
                    "memory profile ('memory' in manifest.json); re-export it with this SDK to measure one. "
                    f"Using the bundle's tile batch {self._default_batch()}"
                )
            elif self._tiled_stage() is not None:
                side = (plan_image_size, plan_image_size) if isinstance(plan_image_size, int) else plan_image_size
                self.memory_plan = self.plan_memory(int(side[0]), int(side[1]))

    # -- setup ------------------------------------------------------------------------
    def _check_sources(self) -> None:
        seen: set[str] = set()
        for stage in self.manifest.stages:
            for spec in stage["inputs"]:
                source = spec.get("source", "dermoscopy")
                if source in IMAGE_SOURCES or source in OTHER_SOURCES:
                    pass
                elif "." in source and source.split(".", 1)[0] in seen:
                    pass
                else:
                    raise BundleError(
                        f"stage {stage['name']!r} input {spec['name']!r} has source {source!r}; expected one of "
                        f"{', '.join(IMAGE_SOURCES + OTHER_SOURCES)} or '<earlier stage>.<output>' "
                        f"(earlier stages: {sorted(seen) or 'none'}). Re-export the bundle"
                    )
                if source == "dermoscopy_windows" and not {"window", "grid"} <= set(self.tiling):
                    raise BundleError(
                        f"stage {stage['name']!r} takes dermoscopy windows but the manifest's tiling section "
                        f"{self.tiling!r} has no 'window' and 'grid'; re-export the bundle with this SDK"
                    )
            seen.add(stage["name"])
        if self.task == "segment":
            stages = self.manifest.stages
            if len(stages) != 1 or [i.get("source", "dermoscopy") for i in stages[0]["inputs"]] != ["dermoscopy"]:
                raise BundleError("a segmentation bundle must have one stage with one 'dermoscopy' input; "
                                  f"got {[(s['name'], [i.get('source') for i in s['inputs']]) for s in stages]}")

    def _open_stage(self, stage: dict[str, Any], providers: list[str], threads: int | None, cache: bool) -> Backend:
        if self.backend_name == "tensorrt":  # loaded (after the target check) by _choose_backend
            return self._engine_stages[stage["name"]]
        if self.backend_name.startswith(REMOTE_SCHEME):
            from .backends.remote import RemoteBackend, safe_model_name

            model = safe_model_name(str(self.model_info.get("name") or "model"))
            return RemoteBackend(self.backend_name, f"{model}_{stage['name']}", stage)
        from .backends.onnxruntime import OnnxRuntimeBackend

        def session(path: str | os.PathLike[str] | bytes, **options: Any) -> Backend:
            return OnnxRuntimeBackend(path, providers, threads, arena="same_as_requested", **options)

        graph = self.manifest.graph_path(stage, self.precision)
        from .crypto import decrypted_graph

        plaintext = decrypted_graph(self.manifest, stage, self.precision, self.key_provider)
        if plaintext is not None:  # decrypted in memory only; an optimised-graph cache would be plaintext on disk
            return session(plaintext)
        folder = cache_dir() if cache else None
        if folder is None:
            return session(graph)
        from .optional import optional_import

        ort = optional_import("onnxruntime", "the ONNX Runtime backend")
        graph_sha = stage["graphs"][self.precision]["sha256"]
        key = optimized_cache_key(graph_sha, ort.__version__, providers)
        cached, sidecar = folder / f"{key}.onnx", folder / f"{key}.json"
        if cached.is_file() and sidecar.is_file():
            try:
                expected = json.loads(sidecar.read_text()).get("sha256")
                if expected and sha256_file(cached) == expected:
                    backend = session(cached, optimize=False)
                    self.cache_hits[stage["name"]] = True
                    return backend
                log.warning("optimised-graph cache %s does not match its recorded sha256; rebuilding it", cached)
            except Exception as exc:  # a damaged cache never stops a load: rebuild it
                log.warning("optimised-graph cache %s unusable (%s); rebuilding it", cached, exc)
        self.cache_hits[stage["name"]] = False
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".onnx.tmp", dir=folder)
            os.close(fd)
        except OSError as exc:
            self._fallback(f"optimised-graph cache disabled: cannot write {folder} ({exc}); set EDGEDERM_CACHE")
            return session(graph)
        try:
            # The session that writes the optimised graph keeps ~the model's size of extra
            # memory for its life (measured: +120 MB on a ViT-S window encoder), so it is
            # only used to write the file; the model runs on a session loaded from it.
            writer = session(graph, optimized_cache=tmp)
            del writer
            digest = sha256_file(tmp)
            os.replace(tmp, cached)
            meta = {"sha256": digest, "graph_sha256": graph_sha, "onnxruntime": ort.__version__,
                    "providers": providers, "bundle": str(self.manifest.root), "stage": stage["name"]}
            write_json_atomic(sidecar, meta)
            backend = session(cached, optimize=False)
        except Exception as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                log.warning("could not store optimised graph in %s: %s", folder, exc)
                return session(graph)
            raise
        return backend

    def _choose_backend(self, backend: str) -> tuple[str, list[str]]:
        if backend.startswith(REMOTE_SCHEME):  # stage graphs on a KServe v2 server; no local provider
            from .backends.remote import parse_url

            parse_url(backend)
            return backend, []
        if backend not in BACKENDS:
            raise InputError(f"backend {backend!r} is not supported; choose one of {', '.join(BACKENDS)} "
                             f"or {REMOTE_SCHEME}HOST:PORT")
        from .backends.onnxruntime import available_providers

        have = available_providers()
        if backend in ("auto", "tensorrt"):
            # TensorRT engine > ORT-GPU > ORT-CPU. Engines are checked against the device before deserialising.
            from .backends.tensorrt import ENGINE_PRECISIONS, load_engine_stages

            wanted = getattr(self, "_requested_precision", "auto")
            if wanted == "auto" or wanted in ENGINE_PRECISIONS:
                stages, self._engine_precision, reason = load_engine_stages(
                    self.manifest, None if wanted == "auto" else wanted)
                if stages is not None:
                    self._engine_stages = stages
                    return "tensorrt", []
            else:
                reason = f"TensorRT engines are fp16/int8 and precision {wanted!r} was requested"
            if backend == "tensorrt" or self.manifest.data.get("engines"):
                self._fallback(f"{reason}; using ONNX Runtime")
            backend = "auto"
        if backend in ("onnxruntime-cuda", "auto") and "CUDAExecutionProvider" in have:
            return "onnxruntime-cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if backend == "onnxruntime-cuda":
            self._fallback("onnxruntime-cuda requested but CUDAExecutionProvider is not available; using CPU")
        return "onnxruntime-cpu", ["CPUExecutionProvider"]

    def _fallback(self, message: str) -> None:
        log.warning(message)
        self.notes.append(message)

    # -- tiling and memory ------------------------------------------------------------
    def _tiled_stage(self) -> dict[str, Any] | None:
        """The stage whose batch the memory plan sizes: segmenter tiles or dermoscopy windows."""
        for stage in self.manifest.stages:
            sources = [i.get("source", "dermoscopy") for i in stage["inputs"]]
            if "dermoscopy_windows" in sources or (self.task == "segment" and "dermoscopy" in sources):
                return stage
        return None

    def _default_batch(self) -> int:
        value = self.tiling.get("batch_size", DEFAULT_TILE_BATCH)
        return int(value) if isinstance(value, int) and value > 0 else DEFAULT_TILE_BATCH

    @property
    def tile_size(self) -> int:
        return int(self.tiling.get("tile") or self.preprocess_config.input_size[0])

    def _out_channels(self, stage: dict[str, Any]) -> int:
        shape = stage["outputs"][0]["shape"]
        return int(shape[1]) if len(shape) > 1 and isinstance(shape[1], int) else max(len(self.class_names), 1)

    def plan_memory(self, height: int, width: int) -> MemoryPlan:
        """The tile (or window) batch for a ``height x width`` image under the budget.

        Raises MemoryBudgetError when not even one tile fits, naming the minimum.
        """
        from .tiling import make_grid

        stage = self._tiled_stage()
        what = f"a {height}x{width} image"
        if stage is None:
            return plan_batch(None, self.memory_budget_bytes, height * width * 3, 0, default_batch=1, what=what)
        if self.task == "segment":
            tile = self.tile_size
            grid = make_grid(height, width, tile, float(self.tiling.get("overlap", DEFAULT_OVERLAP)))
            image, acc = segment_buffers(height, width, tile, grid.stride, self._out_channels(stage))
            tiles = len(grid)
        else:
            window = int(self.tiling["window"])
            rows, cols = (int(v) for v in self.tiling["grid"])
            dim = stage["outputs"][0]["shape"][-1]
            image, acc = window_buffers(height, width, window, rows, cols, dim if isinstance(dim, int) else 1024)
            tiles = rows * cols
        return plan_batch(self.memory_profile, self.memory_budget_bytes, image, acc,
                          default_batch=self._default_batch(), tiles=tiles, what=what)

    def _working_max_side(self) -> int | None:
        """The longest image side the model needs; None when it works at full resolution.

        A segmenter with ``tiling.working_max_side`` rescales to it. A classifier resizes
        the whole image to its input (or window grid) size and refuses aspect ratios over
        MAX_ASPECT_RATIO, so a longer side of that ratio times the input side keeps the
        shorter side at least the input side whatever the resize policy.
        """
        if self.task == "segment":
            working = self.tiling.get("working_max_side")
            return int(working) if working else None
        if self.preprocess_config.resize == "none":
            return None
        sides = [max(self.preprocess_config.input_size)]
        if {"window", "grid"} <= set(self.tiling):
            sides += [int(self.tiling["window"]) * int(n) for n in self.tiling["grid"]]
        for stage in self.manifest.stages:
            for spec in stage["inputs"]:
                if spec.get("source", "dermoscopy") in ("dermoscopy", "clinical"):
                    sides += [d for d in spec["shape"][2:4] if isinstance(d, int)]
        return int(math.ceil(max(sides) * MAX_ASPECT_RATIO))

    # -- public API -----------------------------------------------------------------
    def predict_file(self, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None,
                     clinical: str | os.PathLike[str] | None = None,
                     progress: Callable[[int, int], None] | None = None) -> Result:
        start = time.perf_counter()
        budget = self.memory_budget_bytes
        if budget is not None and self.memory_profile is not None and budget > self.memory_profile.fixed_bytes:
            budget -= self.memory_profile.fixed_bytes  # what the loaded model leaves for decoding
        decoded = [read_image_within(p, max_pixels=self.max_image_pixels, budget_bytes=budget,
                                     working_max_side=self._working_max_side()) if p is not None else None
                   for p in (path, clinical)]
        result = self.predict(dermoscopy=decoded[0].image if decoded[0] else None,
                              clinical=decoded[1].image if decoded[1] else None, metadata=metadata, progress=progress)
        result.notes += [d.note for d in decoded if d is not None and d.note]
        result.timings = {"decode": (time.perf_counter() - start) * 1000 - result.timings.get("total", 0.0), **result.timings}
        return result

    def predict(self, dermoscopy: np.ndarray | None = None, clinical: np.ndarray | None = None,
                metadata: Mapping[str, Any] | None = None,
                progress: Callable[[int, int], None] | None = None) -> Result:
        """Predict on a dermoscopy image (HxWx3 uint8 RGB, any size) and/or the other modalities.

        ``progress(done, total)`` is called after each tile/window batch.
        """
        timings: dict[str, float] = {}
        start = time.perf_counter()
        notes = list(self.notes)
        staged = any(i.get("source") in ("clinical", "modality_mask") for s in self.manifest.stages for i in s["inputs"])
        if dermoscopy is None and not staged:
            raise InputError("predict needs a dermoscopy image (H x W x 3 uint8 RGB); got None")
        image = self._check_image(dermoscopy, "dermoscopy") if dermoscopy is not None else None
        self._check_metadata(metadata, notes)
        clinical_image = None
        if clinical is not None:
            if "clinical" not in self.modalities:
                notes.append("clinical image ignored: this model does not take one")
            else:
                clinical_image = self._check_image(clinical, "clinical")
        if self.task == "segment":
            assert image is not None
            result = self._predict_segment(image, timings, progress)
        else:
            result = self._predict_stages(image, clinical_image, metadata, timings, notes, progress)
        result.notes = notes
        timings["total"] = (time.perf_counter() - start) * 1000
        result.timings = timings
        result.memory_peak_bytes = peak_rss_bytes()
        if self.audit is not None:
            self.audit.record(self, result, dermoscopy=image, clinical=clinical_image, metadata=metadata)
        return result

    # -- internals --------------------------------------------------------------------
    def _check_image(self, array: object, name: str) -> np.ndarray:
        image = as_rgb_uint8(array, name)
        height, width = image.shape[:2]
        if min(height, width) < MIN_IMAGE_SIDE:
            raise InputError(
                f"{name}: received a {height}x{width} image; expected at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} px "
                "(an image that small holds no lesion). Fix: pass the full photo, not a thumbnail or a crop of it"
            )
        if self.task != "segment":
            ratio = max(height, width) / min(height, width)
            if ratio > MAX_ASPECT_RATIO and self.preprocess_config.resize != "none":
                raise InputError(
                    f"{name}: received a {height}x{width} image (aspect ratio {ratio:.0f}:1); this classifier "
                    f"resizes the whole image to {self.preprocess_config.input_size[0]}x"
                    f"{self.preprocess_config.input_size[1]} and expects an aspect ratio of at most "
                    f"{MAX_ASPECT_RATIO:.0f}:1. Fix: crop the region around the lesion first"
                )
        return image

    def _check_metadata(self, metadata: Mapping[str, Any] | None, notes: list[str]) -> None:
        if metadata is None:
            return
        if not isinstance(metadata, Mapping):
            raise InputError(f"metadata must be a dict like {{'age': 54, 'sex': 'female'}}; got {type(metadata).__name__}")
        from .metadata import is_non_finite_number, shown

        for key, value in metadata.items():
            if is_non_finite_number(value):
                raise InputError(
                    f"metadata field {shown(key)} is {value!r}; expected a finite number. "
                    "Fix: leave the field out (or pass None) when it is unknown; missing is its own category"
                )
        if "metadata" not in self.modalities:
            notes.append("metadata ignored: this model does not use it")

    def _classification_result(self, logits: np.ndarray, image: np.ndarray | None = None) -> Result:
        from .safety import image_statistics, review  # reason codes and their rules: runtime/safety.py

        temperature = float(self.clinical.get("temperature", 1.0))
        probs = softmax(logits, temperature)
        label = self.class_names[int(np.argmax(probs))]
        stats = image_statistics(image) if image is not None else None
        reasons = review(probs, self.class_names, self.clinical, stats)
        return Result(
            label=label,
            probabilities={n: float(p) for n, p in zip(self.class_names, probs)},
            needs_review=bool(reasons), review_reasons=reasons,
            backend=self.backend_name, precision=self.precision,
        )

    # -- staged (classification) path ------------------------------------------------
    def _predict_stages(self, image: np.ndarray | None, clinical: np.ndarray | None,
                        metadata: Mapping[str, Any] | None, timings: dict[str, float], notes: list[str],
                        progress: Callable[[int, int], None] | None) -> Result:
        present = {
            "dermoscopy": image is not None,
            "clinical": clinical is not None,
            "metadata": metadata is not None and "metadata" in self.modalities,
        }
        if not any(present.values()):
            raise InputError(f"predict got no input this model uses; give at least one of {self.modalities}")
        outputs: dict[str, np.ndarray] = {}
        skipped: list[str] = []
        stats_cache: dict[str, pp.ColorStats | None] = {}
        timings.setdefault("preprocess", 0.0)
        timings.setdefault("inference", 0.0)
        stages = self.manifest.stages
        for stage in stages:
            takes_mask = any(i.get("source") == "modality_mask" for i in stage["inputs"])
            feed: dict[str, np.ndarray] = {}
            missing = []
            for spec in stage["inputs"]:
                source = spec.get("source", "dermoscopy")
                if source == "dermoscopy_windows":
                    continue  # streamed below
                value = self._source_value(source, spec, image, clinical, metadata, present, outputs,
                                           stats_cache, timings)
                if value is None:
                    missing.append(source)
                    if takes_mask:
                        value = np.zeros((1, *[int(d) for d in spec["shape"][1:]]), dtype=spec.get("dtype", "float32"))
                feed[spec["name"]] = value  # type: ignore[assignment]
            windows = [i for i in stage["inputs"] if i.get("source") == "dermoscopy_windows"]
            if windows and not present["dermoscopy"]:
                missing.append("dermoscopy_windows")
            if missing and not takes_mask:
                skipped.append(stage["name"])
                continue
            t0 = time.perf_counter()
            if windows:
                out = self._run_windows(stage, windows[0], image, feed, stats_cache, timings, progress)  # type: ignore[arg-type]
            else:
                out = self.stages[stage["name"]].run(feed)
            elapsed = (time.perf_counter() - t0) * 1000
            timings[f"stage:{stage['name']}"] = elapsed
            timings["inference"] += elapsed - timings.get(f"preprocess:{stage['name']}", 0.0)
            outputs.update({f"{stage['name']}.{k}": v for k, v in out.items()})
        if stages[-1]["name"] in skipped:
            given = [m for m, ok in present.items() if ok]
            raise InputError(
                f"the model's output stage {stages[-1]['name']!r} needs inputs this request lacks "
                f"(given: {given}; the stage takes {[i.get('source') for i in stages[-1]['inputs']]}). "
                "Fix: pass a dermoscopy image"
            )
        if skipped:
            log.debug("stages skipped for this request: %s", skipped)
        self.last_run = {**self.last_run, "stages_run": [s["name"] for s in stages if s["name"] not in skipped],
                         "stages_skipped": skipped}
        final = stages[-1]
        logits = outputs[f"{final['name']}.{final['outputs'][0]['name']}"][0]
        return self._classification_result(logits, image)

    def _stats(self, key: str, image: np.ndarray, cache: dict[str, pp.ColorStats | None]) -> pp.ColorStats | None:
        if key not in cache:
            cache[key] = pp.image_color_stats(image, self.preprocess_config)
        return cache[key]

    def _source_value(self, source: str, spec: dict[str, Any], image: np.ndarray | None,
                      clinical: np.ndarray | None, metadata: Mapping[str, Any] | None,
                      present: dict[str, bool], outputs: dict[str, np.ndarray],
                      stats_cache: dict[str, pp.ColorStats | None], timings: dict[str, float]) -> np.ndarray | None:
        shape = spec["shape"]
        if source in ("dermoscopy", "clinical"):
            picture = image if source == "dermoscopy" else clinical
            if picture is None:
                return None
            t0 = time.perf_counter()
            size = (int(shape[2]), int(shape[3])) if all(isinstance(d, int) for d in shape[2:4]) else \
                self.preprocess_config.input_size
            config = dataclasses.replace(self.preprocess_config, input_size=size)
            x = pp.preprocess(picture, config, self._stats(source, picture, stats_cache))[None]
            timings["preprocess"] += (time.perf_counter() - t0) * 1000
            return x
        if source == "metadata":
            if not present["metadata"]:
                return None
            from .metadata import load_schema

            schema = self.model_info.get("metadata_schema")
            if schema is None:
                raise BundleError(f"stage input {spec['name']!r} takes metadata but the manifest has no "
                                  "model.metadata_schema; re-export the bundle")
            return load_schema(schema).encode(metadata)[None]
        if source == "modality_mask":
            width = shape[-1]
            if isinstance(width, int) and width != len(self.modalities):
                raise BundleError(f"modality_mask input has {width} columns but the model lists "
                                  f"{len(self.modalities)} modalities {self.modalities}; re-export the bundle")
            return np.array([[float(present.get(m, False)) for m in self.modalities]], np.float32)
        # "<stage>.<output>"
        value = outputs.get(source)
        if value is None:
            return None
        tail = [int(d) for d in shape[1:]] if all(isinstance(d, int) for d in shape[1:]) else None
        return np.ascontiguousarray(value.reshape(-1, *tail)) if tail else value

    def _run_windows(self, stage: dict[str, Any], spec: dict[str, Any], image: np.ndarray,
                     feed: dict[str, np.ndarray], stats_cache: dict[str, pp.ColorStats | None],
                     timings: dict[str, float], progress: Callable[[int, int], None] | None) -> dict[str, np.ndarray]:
        """Window embeddings, batch by batch; only the ``G x D`` matrix is kept."""
        from .tiling import iter_windows

        window = int(self.tiling["window"])
        rows, cols = (int(v) for v in self.tiling["grid"])
        plan = self.plan_memory(*image.shape[:2])
        t0 = time.perf_counter()
        stats = self._stats("dermoscopy", image, stats_cache)
        # The same resize policy as training's preprocess (stretch, letterbox, crop) to
        # the grid's pixel size; colour constancy then per window with whole-image stats.
        resized = pp.resize_image(image, (rows * window, cols * window), self.preprocess_config.resize)
        config = dataclasses.replace(self.preprocess_config, input_size=(window, window), resize="none")
        prep_ms = (time.perf_counter() - t0) * 1000
        backend = self.stages[stage["name"]]
        out_name = stage["outputs"][0]["name"]
        embeddings: np.ndarray | None = None
        total = rows * cols
        for batch, indices in iter_windows(resized, window, rows, cols, plan.batch_size):
            t1 = time.perf_counter()
            x = pp.preprocess_batch(batch, config, stats)
            prep_ms += (time.perf_counter() - t1) * 1000
            result = backend.run({**feed, spec["name"]: x})[out_name]
            if embeddings is None:
                embeddings = np.empty((total, *result.shape[1:]), dtype=result.dtype)
            embeddings[indices] = result
            if progress is not None:
                progress(int(indices[-1]) + 1, total)
        assert embeddings is not None
        timings["preprocess"] += prep_ms
        timings[f"preprocess:{stage['name']}"] = prep_ms
        self.last_run = {"windows": total, "batch_size": plan.batch_size, "plan": plan.to_dict(),
                         "stage": stage["name"]}
        return {out_name: embeddings}

    # -- segmentation path -------------------------------------------------------------
    def _predict_segment(self, image: np.ndarray, timings: dict[str, float],
                         progress: Callable[[int, int], None] | None) -> Result:
        """Tiled segmentation; ``tiling.working_max_side`` (when set) rescales first."""
        full_height, full_width = image.shape[:2]
        working = self.tiling.get("working_max_side")
        if not working or max(full_height, full_width) <= int(working):
            return self._segment_tiled(image, timings, progress)
        # The model learnt lesions at this pixel scale (e.g. whole images resized to
        # its input size): tile a copy at that scale, then bring the mask and the
        # heatmap back to the input resolution.
        scale = int(working) / max(full_height, full_width)
        size = (max(1, round(full_width * scale)), max(1, round(full_height * scale)))
        result = self._segment_tiled(cv2.resize(image, size, interpolation=cv2.INTER_AREA), timings, progress)
        assert result.mask is not None and result.heatmap is not None
        result.mask = cv2.resize(result.mask, (full_width, full_height), interpolation=cv2.INTER_NEAREST)
        result.heatmap = cv2.resize(result.heatmap, (full_width, full_height), interpolation=cv2.INTER_LINEAR)
        result.probabilities = {"lesion_fraction": cv2.countNonZero(result.mask) / float(result.mask.size)}
        return result

    def _segment_tiled(self, image: np.ndarray, timings: dict[str, float],
                       progress: Callable[[int, int], None] | None) -> Result:
        """Tiled segmentation of an image already at the working scale."""
        from .tiling import TilingStats, sliding_window

        stage = self.manifest.stages[0]
        backend = self.stages[stage["name"]]
        config = self.preprocess_config
        tile = self.tile_size
        if config.input_size != (tile, tile):
            config = dataclasses.replace(config, input_size=(tile, tile))
        height, width = image.shape[:2]
        plan = self.plan_memory(height, width)
        t0 = time.perf_counter()
        stats = pp.image_color_stats(image, config)
        timings["color_stats"] = (time.perf_counter() - t0) * 1000
        input_name = stage["inputs"][0]["name"]
        output_name = stage["outputs"][0]["name"]
        mask = np.empty((height, width), np.uint8)
        heat = np.empty((height, width), np.float32)
        spent = {"preprocess": 0.0, "inference": 0.0}

        def predict_tiles(batch: np.ndarray) -> np.ndarray:
            t1 = time.perf_counter()
            x = pp.preprocess_batch(batch, config, stats)
            t2 = time.perf_counter()
            logits = backend.run({input_name: x})[output_name]
            spent["preprocess"] += t2 - t1
            spent["inference"] += time.perf_counter() - t2
            return tile_probabilities(logits)

        def on_rows(y0: int, block: np.ndarray) -> None:
            rows = slice(y0, y0 + block.shape[1])
            if block.shape[0] == 1:
                heat[rows] = block[0]
                np.greater(block[0], 0.5, out=mask[rows].view(bool))
            else:
                np.subtract(1.0, block[0], out=heat[rows])  # lesion probability = 1 - background
                if block.shape[0] == 2:
                    np.greater(block[1], block[0], out=mask[rows].view(bool))
                else:
                    mask[rows] = block.argmax(axis=0)

        t0 = time.perf_counter()
        tiling_stats = TilingStats()
        sliding_window(image, predict_tiles, tile=tile, overlap=float(self.tiling.get("overlap", DEFAULT_OVERLAP)),
                       blend=self.tiling.get("blend", DEFAULT_BLEND), batch_size=plan.batch_size,
                       on_rows=on_rows, progress=progress, stats=tiling_stats)
        elapsed = time.perf_counter() - t0
        timings["tiled_inference"] = elapsed * 1000
        timings["preprocess"] = spent["preprocess"] * 1000
        timings["inference"] = spent["inference"] * 1000
        self.last_run = {"tiles": tiling_stats.tiles, "batches": tiling_stats.batches, "batch_size": plan.batch_size,
                         "accumulator_bytes": tiling_stats.accumulator_bytes, "plan": plan.to_dict(),
                         "tiles_per_s": tiling_stats.tiles / elapsed if elapsed > 0 else float("nan"),
                         "stage": stage["name"]}
        fraction = cv2.countNonZero(mask) / float(mask.size)
        return Result(label=None, probabilities={"lesion_fraction": fraction}, needs_review=False, review_reasons=[],
                      backend=self.backend_name, precision=self.precision, mask=mask, heatmap=heat)


def load(bundle: str | os.PathLike[str], backend: str = "auto", precision: str = "auto",
         memory_budget: int | str | None = None, threads: int | None = None, verify: bool = True,
         cache: bool = True, plan_image_size: int | tuple[int, int] = 2048,
         trusted_keys: Sequence[Any] | None = None, key_provider: Any = None,
         audit_log: str | os.PathLike[str] | None = None, audit_fields: Sequence[str] = (),
         selftest: bool = False) -> DeployedModel:
    """Verify a bundle (hashes, paths) and load its graphs on ``backend``.

    ``memory_budget`` ("1.5GiB", "800MB" or bytes) sizes the tile batch from the
    bundle's measured memory profile, planned here for a ``plan_image_size`` image
    (MemoryBudgetError if even one tile does not fit) and again for each image.
    ``cache=False`` skips the optimised-graph cache (see ``cache_dir``).

    Device trust (runtime/trust.py): ``trusted_keys`` (public key files or PEM bytes)
    refuses a bundle whose signature is missing, by another key, or does not cover
    its exact files, before any graph is parsed; ``key_provider`` (a key file, an
    ``env:VAR`` or a callable returning 32 bytes) decrypts encrypted graphs into
    memory; ``selftest=True`` runs the bundle's golden inputs and refuses outputs
    outside their tolerance; ``audit_log`` appends one hash-chained JSON line per
    prediction, with the metadata fields named in ``audit_fields`` only.
    """
    from .trust import after_load, before_load

    signature = before_load(bundle, trusted_keys)
    manifest = read_manifest(Path(bundle), verify=verify)
    model = DeployedModel(manifest, backend=backend, precision=precision, threads=threads, memory_budget=memory_budget,
                          cache=cache, plan_image_size=plan_image_size, key_provider=key_provider)
    return after_load(model, signature, selftest=selftest, audit_log=audit_log, audit_fields=audit_fields)

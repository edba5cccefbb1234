"""``load(bundle)`` -> :class:`DeployedModel` -> ``predict(...)`` -> :class:`Result`.

The runtime imports numpy, OpenCV and (lazily) ONNX Runtime only. It runs the
stages a bundle declares with the same preprocessing code training used
(``edgederm.runtime.preprocess``), applies the temperature stored in the bundle,
and decides ``needs_review`` from the bundle's clinical settings.
"""
from __future__ import annotations

import logging
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from . import preprocess as pp
from .backends.base import Backend
from .bundle import Manifest, read_manifest
from .errors import BundleError, InputError
from .imageio import as_rgb_uint8, read_image
from .result import Result

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt")


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def softmax(logits: np.ndarray, temperature: float = 1.0, axis: int = -1) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


def _choose_precision(manifest: Manifest, precision: str, device: str) -> str:
    available = manifest.precisions()
    if precision != "auto":
        if precision not in available:
            raise BundleError(
                f"precision {precision!r} is not in bundle {manifest.root} (available: {available}); "
                f"fix: `edgederm quantize {manifest.root} --precision {precision}` or use precision='auto'"
            )
        return precision
    preferred = ("fp16", "int8", "fp32") if device != "cpu" else ("int8", "int8_dynamic", "fp32")
    for p in preferred:
        if p in available:
            return p
    return available[0]


class DeployedModel:
    """A loaded bundle: its stages on one backend, ready to predict."""

    def __init__(self, manifest: Manifest, backend: str = "auto", precision: str = "auto",
                 threads: int | None = None, memory_budget: int | str | None = None) -> None:
        self.manifest = manifest
        self.notes: list[str] = []
        self.model_info = manifest.model
        self.task = self.model_info["task"]
        self.class_names: list[str] = list(self.model_info["class_names"])
        self.preprocess_config = pp.PreprocessConfig.from_dict(manifest.preprocess)
        self.clinical = manifest.clinical
        self.memory_budget = memory_budget
        self.backend_name, providers = self._choose_backend(backend)
        device = "cpu" if providers == ["CPUExecutionProvider"] else "gpu"
        self.precision = _choose_precision(manifest, precision, device)
        from .backends.onnxruntime import OnnxRuntimeBackend

        self.stages: dict[str, Backend] = {}
        for stage in manifest.stages:
            self.stages[stage["name"]] = OnnxRuntimeBackend(manifest.graph_path(stage, self.precision), providers, threads)
        log.info("loaded %s: backend %s, precision %s", manifest.root, self.backend_name, self.precision)

    def _choose_backend(self, backend: str) -> tuple[str, list[str]]:
        if backend not in BACKENDS:
            raise InputError(f"backend {backend!r} is not supported; choose one of {', '.join(BACKENDS)}")
        from .backends.onnxruntime import available_providers

        have = available_providers()
        if backend == "tensorrt":
            self._fallback("TensorRT engines are not in this bundle or TensorRT is not installed; using ONNX Runtime")
            backend = "auto"
        if backend in ("onnxruntime-cuda", "auto") and "CUDAExecutionProvider" in have:
            return "onnxruntime-cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if backend == "onnxruntime-cuda":
            self._fallback("onnxruntime-cuda requested but CUDAExecutionProvider is not available; using CPU")
        return "onnxruntime-cpu", ["CPUExecutionProvider"]

    def _fallback(self, message: str) -> None:
        log.warning(message)
        self.notes.append(message)

    # -- public API -----------------------------------------------------------------
    def predict_file(self, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None,
                     clinical: str | os.PathLike[str] | None = None) -> Result:
        start = time.perf_counter()
        image = read_image(path)
        clinical_image = read_image(clinical) if clinical is not None else None
        result = self.predict(dermoscopy=image, clinical=clinical_image, metadata=metadata)
        result.timings = {"decode": (time.perf_counter() - start) * 1000 - result.timings.get("total", 0.0), **result.timings}
        return result

    def predict(self, dermoscopy: np.ndarray | None = None, clinical: np.ndarray | None = None,
                metadata: Mapping[str, Any] | None = None) -> Result:
        timings: dict[str, float] = {}
        start = time.perf_counter()
        notes = list(self.notes)
        if dermoscopy is None:
            raise InputError("predict needs a dermoscopy image (H x W x 3 uint8 RGB); got None")
        image = as_rgb_uint8(dermoscopy, "dermoscopy")
        self._check_metadata(metadata, notes)
        if clinical is not None and "clinical" not in self.model_info["modalities"]:
            notes.append("clinical image ignored: this model does not take one")
        if self.task == "segment":
            result = self._predict_segment(image, timings)
        else:
            result = self._predict_classify(image, timings)
        result.notes = notes
        timings["total"] = (time.perf_counter() - start) * 1000
        result.timings = timings
        result.memory_peak_bytes = peak_rss_bytes()
        return result

    # -- internals --------------------------------------------------------------------
    def _check_metadata(self, metadata: Mapping[str, Any] | None, notes: list[str]) -> None:
        if metadata is None:
            return
        if not isinstance(metadata, Mapping):
            raise InputError(f"metadata must be a dict like {{'age': 54, 'sex': 'female'}}; got {type(metadata).__name__}")
        for key, value in metadata.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(
                    f"metadata field {key!r} is {value}; expected a finite number. "
                    "Fix: leave the field out (or pass None) when it is unknown; missing is its own category"
                )
        if "metadata" not in self.model_info["modalities"]:
            notes.append("metadata ignored: this model does not use it")

    def _single_stage(self) -> tuple[dict[str, Any], Backend]:
        stage = self.manifest.stages[0]
        return stage, self.stages[stage["name"]]

    def _predict_classify(self, image: np.ndarray, timings: dict[str, float]) -> Result:
        if len(self.manifest.stages) != 1:
            raise BundleError("multi-stage classifiers need the hierarchical runtime (not in this SDK version)")
        stage, backend = self._single_stage()
        t0 = time.perf_counter()
        x = pp.preprocess(image, self.preprocess_config)[None]
        t1 = time.perf_counter()
        out = backend.run({stage["inputs"][0]["name"]: x})
        t2 = time.perf_counter()
        timings["preprocess"] = (t1 - t0) * 1000
        timings["inference"] = (t2 - t1) * 1000
        logits = out[stage["outputs"][0]["name"]][0]
        return self._classification_result(logits)

    def _classification_result(self, logits: np.ndarray) -> Result:
        temperature = float(self.clinical.get("temperature", 1.0))
        probs = softmax(logits, temperature)
        order = np.argsort(-probs)
        label = self.class_names[int(order[0])]
        reasons = []
        threshold = float(self.clinical.get("review_threshold", 0.0))
        if probs[order[0]] < threshold:
            reasons.append(f"low_confidence:{probs[order[0]]:.2f}<{threshold:.2f}")
        # A safety-listed class (rare, or one the model is known to miss, e.g. vascular
        # lesions) triggers review when it is the top class, or second with a
        # probability that is not negligible.
        floor = float(self.clinical.get("review_class_min_probability", 0.1))
        for rank, idx in enumerate(order[:2]):
            name = self.class_names[int(idx)]
            if name in self.clinical.get("review_classes", []) and (rank == 0 or probs[idx] >= floor):
                reasons.append(f"review_class:{name}:rank{rank + 1}:{probs[idx]:.2f}")
        return Result(
            label=label,
            probabilities={n: float(p) for n, p in zip(self.class_names, probs)},
            needs_review=bool(reasons), review_reasons=reasons,
            backend=self.backend_name, precision=self.precision,
        )

    def _predict_segment(self, image: np.ndarray, timings: dict[str, float]) -> Result:
        from .tiling import sliding_window

        stage, backend = self._single_stage()
        config = self.preprocess_config
        tile = config.input_size[0]
        tiling = self.manifest.data.get("tiling") or {}
        t0 = time.perf_counter()
        stats = pp.color_stats(image)
        input_name = stage["inputs"][0]["name"]
        output_name = stage["outputs"][0]["name"]
        mask = np.zeros(image.shape[:2], np.uint8)
        heat = np.zeros(image.shape[:2], np.float32)

        def predict_tiles(batch: np.ndarray) -> np.ndarray:
            x = np.stack([pp.preprocess(t, config, stats) for t in batch])
            logits = backend.run({input_name: x})[output_name]
            return softmax(logits, axis=1) if logits.shape[1] > 1 else 1 / (1 + np.exp(-logits))

        def on_rows(y0: int, block: np.ndarray) -> None:
            rows = block.shape[1]
            if block.shape[0] == 1:
                heat[y0:y0 + rows] = block[0]
                mask[y0:y0 + rows] = block[0] > 0.5
            else:
                mask[y0:y0 + rows] = block.argmax(axis=0)
                heat[y0:y0 + rows] = 1.0 - block[0]  # lesion probability = 1 - background

        sliding_window(image, predict_tiles, tile=tile, overlap=float(tiling.get("overlap", 0.25)),
                       blend=tiling.get("blend", "gaussian"), batch_size=int(tiling.get("batch_size", 4)),
                       on_rows=on_rows)
        timings["tiled_inference"] = (time.perf_counter() - t0) * 1000
        fraction = float((mask > 0).mean())
        return Result(label=None, probabilities={"lesion_fraction": fraction}, needs_review=False, review_reasons=[],
                      backend=self.backend_name, precision=self.precision, mask=mask, heatmap=heat)


def load(bundle: str | os.PathLike[str], backend: str = "auto", precision: str = "auto",
         memory_budget: int | str | None = None, threads: int | None = None, verify: bool = True) -> DeployedModel:
    """Verify a bundle (hashes, paths) and load its graphs on ``backend``."""
    manifest = read_manifest(Path(bundle), verify=verify)
    return DeployedModel(manifest, backend=backend, precision=precision, threads=threads, memory_budget=memory_budget)

"""``load(bundle)`` -> :class:`DeployedModel` -> ``predict(...)`` -> :class:`Result`.

The runtime imports numpy, OpenCV and (lazily) ONNX Runtime only. This module is the
facade: it verifies the bundle (runtime/bundle.py), chooses backend and precision
(runtime/selection.py), opens each stage on its backend (through the optimised-graph
cache of runtime/backends/onnxruntime.py), checks the request once, and hands it to
the stage pipeline (runtime/pipeline.py), which owns every stage feed: tiles,
windows, clinical image, metadata, earlier stages' outputs. It then applies the
temperature stored in the bundle and decides ``needs_review`` from the bundle's
clinical settings (runtime/safety.py). There is no model-specific code here.

* Memory: ``memory_budget`` is planned by ``runtime.memory.plan`` from the profile
  export measured (``memory`` in manifest.json) into a tile/window batch size, at load
  for a reference image (``plan_image_size``, default 2048 px a side) and again per
  image size (cached); a budget that cannot be met raises MemoryBudgetError naming
  the minimum.
* Fast start: the ONNX Runtime-optimised graph of each stage is cached in
  ``$EDGEDERM_CACHE`` (default ``~/.cache/edgederm``; ``off`` disables), keyed by the
  sha256 of the graph bytes verified at load, the ONNX Runtime version, the session
  options, the providers and the CPU's feature flags.
* Input policy: images smaller than :data:`MIN_IMAGE_SIDE` px on a side are
  refused (there is no lesion in a 1x1 image), and so are whole-image classifier
  inputs with an aspect ratio above :data:`MAX_ASPECT_RATIO` (a 20000x20 strip
  stretched to 224x224 is not a photo); segmenters tile any shape.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .backends.base import Backend
from .backends.remote import SCHEME as REMOTE_SCHEME
from .bundle import Clinical, Manifest, read_manifest, resolve_inside, verified_graph
from .errors import BundleError, InputError, MissingDependencyError
from .imageio import DEFAULT_MAX_PIXELS, as_rgb_uint8, read_image_within
from .memory import MemoryPlan, parse_size, plan
from .targets import TargetProfile, detect_target, load_target
from .pipeline import Pipeline, Request
from .probabilities import softmax
from .result import Result
from .rss import peak_rss_bytes
from .selection import Choice, choose, wants_engines
from .timings import timed

log = logging.getLogger(__name__)

MIN_IMAGE_SIDE = 8
MAX_ASPECT_RATIO = 10.0
PLAN_CACHE_SIZE = 16  # image sizes whose memory plan is kept
GPU_BACKENDS = ("tensorrt", "onnxruntime-cuda")  # the backends whose memory is a device target's unified memory


class DeployedModel:
    """A loaded bundle: its stages on one backend, ready to predict.

    ``graph_overrides`` (stage -> ONNX file) runs other graphs than the bundle's for
    ``precision`` (the quantizer evaluates candidate graphs this way); they are not
    in the manifest, so they bypass the optimised-graph cache.

    ``stage_backends`` (stage -> :class:`Backend`) runs those backends in place of the
    bundle's graphs, reported as ``precision``: the decode, stage pipeline and review
    stay the runtime's, so a benchmark's PyTorch peer differs from the runtime only in
    what runs the stages (nothing of the bundle's graphs is opened).
    """

    #: Pixels an image file may declare in ``predict_file`` (larger: reduced decoding or a refusal).
    max_image_pixels: int = DEFAULT_MAX_PIXELS

    def __init__(self, manifest: Manifest, backend: str = "auto", precision: str = "auto",
                 threads: int | None = None, memory_budget: int | str | None = None,
                 cache: bool = True, plan_image_size: int | tuple[int, int] = 2048,
                 graph_overrides: Mapping[str, str | os.PathLike[str]] | None = None, key_provider: Any = None,
                 target: str | TargetProfile | None = None,
                 stage_backends: Mapping[str, Backend] | None = None) -> None:
        self.manifest = manifest
        self.key_provider = key_provider  # decrypts encrypted graphs (runtime/crypto.py)
        self.signature: Any = None  # runtime.signing.SignatureInfo when keys were pinned at load
        self.audit: Any = None  # runtime.audit.AuditLog when load(audit_log=...)
        self.task = manifest.model.task
        self.class_names: list[str] = list(manifest.model.class_names)
        self.modalities: list[str] = list(manifest.model.modalities)
        self.preprocess_config = manifest.preprocess
        self.memory_budget = memory_budget
        self.memory_budget_bytes = parse_size(memory_budget) if memory_budget is not None else None
        self.last_run: dict[str, Any] = {}  # tiles, batch size, plan of the latest predict (benchmarks read it)
        self.cache_hits: dict[str, bool] = {}
        start = time.perf_counter()
        if stage_backends is not None:
            missing = [s.name for s in manifest.stages if s.name not in stage_backends]
            if missing or precision == "auto":
                raise BundleError(f"stage_backends must give a backend for every stage ({missing} missing) and come "
                                  f"with an explicit precision (got {precision!r})")
            names = sorted({b.name for b in stage_backends.values()})
            choice = Choice("+".join(names), (), precision)
            engine_backends: Mapping[str, Backend] | None = dict(stage_backends)
        else:
            choice, engine_backends = self._choose(backend, precision, graph_overrides)
        self.backend_name, self.precision = choice.backend, choice.precision
        # Temperature and review thresholds of the graph that runs (refitted per precision by quantize);
        # candidate graphs (overrides) have none of their own yet and are judged at the fp32 values.
        self.clinical = manifest.clinical if graph_overrides else manifest.clinical.for_precision(self.precision)
        self.notes: list[str] = list(choice.notes)
        for note in choice.notes:
            log.warning(note)
        opened: dict[str, dict[str, Backend]] = {}
        if precision == "auto" and engine_backends is None and not graph_overrides \
                and choice.backend == "onnxruntime-cpu":
            choice = self._measured_cpu_precision(choice, threads, cache, opened)
            self.precision = choice.precision
            self.clinical = manifest.clinical.for_precision(self.precision)
        self.stages: dict[str, Backend]
        if engine_backends is not None:
            self.stages = dict(engine_backends)
        elif choice.precision in opened:
            self.stages = opened[choice.precision]
        else:
            self.stages = {s.name: self._open_stage(s.name, choice, threads, cache, graph_overrides)
                           for s in manifest.stages}
        if precision != "auto" and choice.backend == "onnxruntime-cpu" and not graph_overrides:
            from .backends.onnxruntime import cache_dir
            from .cpu_check import require_trusted

            recheck = require_trusted(manifest, self.precision, self.stages, cache_dir() if cache else None)
            self.notes += [recheck] if recheck else []
        self.load_ms = (time.perf_counter() - start) * 1000
        log.info("loaded %s: backend %s, precision %s (%.0f ms)", manifest.root, self.backend_name, self.precision,
                 self.load_ms)
        self.target = self._device_target(target)
        self.plan_memory: Callable[[int, int], MemoryPlan] = lru_cache(maxsize=PLAN_CACHE_SIZE)(self._plan)
        self.pipeline = Pipeline(manifest, self.stages, self.plan_memory)
        self.memory_plan: MemoryPlan | None = None
        if self.memory_budget_bytes is not None or (self.target is not None and manifest.memory is not None):
            if manifest.memory is None:
                self._note(f"memory_budget {memory_budget!r} cannot be planned: bundle {manifest.root} has no measured "
                           "memory profile ('memory' in manifest.json); re-export it with this SDK to measure one. "
                           f"Using the bundle's tile batch {manifest.tiling.batch_size}")
            else:
                side = (plan_image_size, plan_image_size) if isinstance(plan_image_size, int) else plan_image_size
                self.memory_plan = self.plan_memory(int(side[0]), int(side[1]))

    # -- setup ------------------------------------------------------------------------
    def _choose(self, backend: str, precision: str, overrides: Mapping[str, Any] | None
                ) -> tuple[Choice, Mapping[str, Backend] | None]:
        """The choice, and the TensorRT engines already opened when it is TensorRT."""
        from .backends.onnxruntime import available_providers

        engines = None
        opened = None
        if wants_engines(backend, precision) and not overrides:
            from .backends.cuda import TensorRTError
            from .backends.engines import select_engines
            from .backends.tensorrt import load_engines

            engines = select_engines([s.name for s in self.manifest.stages], self.manifest.engines, None,
                                     None if precision == "auto" else precision)
            if engines[0] is not None:
                try:
                    opened = load_engines(self.manifest, engines[0])
                except (TensorRTError, MissingDependencyError, BundleError, OSError) as exc:  # fall back, and say so
                    engines = (None, f"TensorRT engines not used: {exc}")
        if not overrides:
            return choose(self.manifest, backend, precision, available_providers(), engines), opened
        missing = [s.name for s in self.manifest.stages if s.name not in overrides]
        if missing or precision == "auto":
            raise BundleError(f"graph_overrides must name a graph for every stage ({missing} missing) and come with "
                              f"an explicit precision (got {precision!r})")
        # The override graphs are the precision's; the manifest may not list it yet.
        return dataclasses.replace(choose(self.manifest, backend, "fp32", available_providers(), engines),
                                   precision=precision), None

    def _measured_cpu_precision(self, choice: Choice, threads: int | None, cache: bool,
                                opened: dict[str, dict[str, Backend]]) -> Choice:
        """``precision="auto"`` on a CPU: choose by the speed-ups measured on this CPU
        (runtime/latency.py) and say so in the notes; the graphs it opened to measure
        are left in ``opened`` (precision -> stage backends) for reuse."""
        from .backends.onnxruntime import cache_dir
        from .cpu_check import trusted_candidates
        from .latency import cpu_speedups
        from .selection import CPU_REDUCED, auto_precision_note, fastest_measured_on_cpu

        available = self.manifest.precisions()
        candidates = [p for p in CPU_REDUCED if p in available]
        if "fp32" not in available or not candidates:
            return choice

        hits: dict[str, dict[str, bool]] = {}

        def open_stages(precision: str) -> dict[str, Backend]:
            if precision not in opened:
                variant = dataclasses.replace(choice, precision=precision)
                self.cache_hits = {}
                opened[precision] = {s.name: self._open_stage(s.name, variant, threads, cache, None)
                                     for s in self.manifest.stages}
                hits[precision] = self.cache_hits
            return opened[precision]

        # An int8 graph made on a CPU of other int8 arithmetic competes only once its self-test passes here.
        trusted, notes = trusted_candidates(self.manifest, candidates, open_stages, cache_dir() if cache else None)
        self.notes += notes
        available = [p for p in available if p in trusted or p not in candidates]
        if not trusted:
            self.cache_hits = {}
            return dataclasses.replace(choice, precision="fp32")
        speedups, source = cpu_speedups(self.manifest, trusted, threads, cache_dir() if cache else None,
                                        open_stages, self._plan)
        chosen = fastest_measured_on_cpu(self.manifest, available, speedups) or \
            (choice.precision if choice.precision in available else "fp32")
        self.cache_hits = hits.get(chosen, {})  # the graphs that will run, not the last ones measured
        note = auto_precision_note(self.manifest, chosen, speedups, source)
        log.info(note)
        self.notes.append(note)
        return dataclasses.replace(choice, precision=chosen)

    def _open_stage(self, name: str, choice: Choice, threads: int | None, cache: bool,
                    overrides: Mapping[str, str | os.PathLike[str]] | None) -> Backend:
        from .backends.onnxruntime import cache_dir, open_cached

        stage = self.manifest.stage(name)
        if choice.backend.startswith(REMOTE_SCHEME):  # the stage runs on a KServe v2 server
            from .backends.remote import RemoteBackend, safe_model_name

            return RemoteBackend(choice.backend, f"{safe_model_name(self.manifest.model.name or 'model')}_{name}", stage)
        from .crypto import decrypted_graph

        overridden = bool(overrides and name in overrides)
        # The bundle's graph is checked before a byte of it is parsed (decrypted or not).
        verified = None if overridden or choice.precision not in stage.graphs else \
            verified_graph(self.manifest, stage.graphs[choice.precision].file)
        plaintext = decrypted_graph(self.manifest, stage, choice.precision, self.key_provider)
        if plaintext is not None:  # decrypted in memory only; an optimised-graph cache would be plaintext on disk
            return open_cached(plaintext, None, list(choice.providers), threads, None)[0]
        if overrides and overridden:
            graph, folder = resolve_inside(self.manifest.root, str(overrides[name])), None
        else:
            graph = self.manifest.graph_path(stage, choice.precision)
            folder = cache_dir() if cache else None
        backend, hit = open_cached(graph, verified, list(choice.providers), threads, folder)
        if hit is not None:
            self.cache_hits[name] = hit
        return backend

    def _note(self, message: str) -> None:
        log.warning(message)
        self.notes.append(message)

    def _device_target(self, target: str | TargetProfile | None) -> TargetProfile | None:
        """The device whose unified memory the plan is for: the one named, else on a Jetson
        the detected one when the graphs run on its GPU (on its CPU the CPU plan holds)."""
        if isinstance(target, str):
            return load_target(target)
        if target is not None or self.backend_name not in GPU_BACKENDS:
            return target
        found = detect_target()
        if found is not None:
            log.info("planning memory for %s (detected)", found.name)
        return found

    def _plan(self, height: int, width: int) -> MemoryPlan:
        """The tile (or window) batch for a ``height x width`` image under the budget
        (on a device target: its unified memory at this precision, runtime/memory.py)."""
        if self.target is not None and self.manifest.memory is not None:
            return plan(self.manifest, self.memory_budget_bytes, height, width, target=self.target,
                        precision=self.precision)
        return plan(self.manifest, self.memory_budget_bytes, height, width)

    @property
    def tile_size(self) -> int:
        return self.manifest.tile_size

    def _working_max_side(self) -> int | None:
        """The longest image side the model needs; None when it works at full resolution.

        A segmenter with ``tiling.working_max_side`` rescales to it. A classifier resizes
        the whole image to its input (or window grid) size and refuses aspect ratios over
        MAX_ASPECT_RATIO, so a longer side of that ratio times the input side keeps the
        shorter side at least the input side whatever the resize policy.
        """
        tiling = self.manifest.tiling
        if self.task == "segment":
            return tiling.working_max_side
        if self.preprocess_config.resize == "none":
            return None
        sides = [max(self.preprocess_config.input_size)]
        if tiling.window is not None and tiling.grid is not None:
            sides += [tiling.window * n for n in tiling.grid]
        for stage in self.manifest.stages:
            for spec in stage.inputs:
                if spec.source in ("dermoscopy", "clinical"):
                    sides += [d for d in spec.shape[2:4] if isinstance(d, int)]
        return int(math.ceil(max(sides) * MAX_ASPECT_RATIO))

    # -- public API -----------------------------------------------------------------
    def predict_file(self, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None,
                     clinical: str | os.PathLike[str] | None = None,
                     progress: Callable[[int, int], None] | None = None) -> Result:
        start = time.perf_counter()
        budget = self.memory_budget_bytes
        profile = self.manifest.memory
        if budget is not None and profile is not None and budget > profile.fixed_bytes:
            budget -= profile.fixed_bytes  # what the loaded model leaves for decoding
        decoded = [read_image_within(p, max_pixels=self.max_image_pixels, budget_bytes=budget,
                                     working_max_side=self._working_max_side()) if p is not None else None
                   for p in (path, clinical)]
        decode_ms = (time.perf_counter() - start) * 1000
        result = self.predict(dermoscopy=decoded[0].image if decoded[0] else None,
                              clinical=decoded[1].image if decoded[1] else None, metadata=metadata, progress=progress)
        result.notes += [d.note for d in decoded if d is not None and d.note]
        result.timings = {"decode": decode_ms, **result.timings}
        return result

    def predict(self, dermoscopy: np.ndarray | None = None, clinical: np.ndarray | None = None,
                metadata: Mapping[str, Any] | None = None,
                progress: Callable[[int, int], None] | None = None) -> Result:
        """Predict on a dermoscopy image (HxWx3 uint8 RGB, any size) and/or the other modalities.

        ``progress(done, total)`` is called after each tile/window batch.
        """
        timings: dict[str, float] = {}  # per step, runtime/timings.py
        start = time.perf_counter()
        notes = list(self.notes)
        staged = any(src in ("clinical", "modality_mask") for s in self.manifest.stages for src in s.sources)
        if dermoscopy is None and not staged:
            raise InputError("predict needs a dermoscopy image (H x W x 3 uint8 RGB); got None")
        with timed(timings, "checks"):
            image = self._check_image(dermoscopy, "dermoscopy") if dermoscopy is not None else None
            self._check_metadata(metadata, notes)
            clinical_image = None
            if clinical is not None:
                if "clinical" not in self.modalities:
                    notes.append("clinical image ignored: this model does not take one")
                else:
                    clinical_image = self._check_image(clinical, "clinical")
        run = self.pipeline.run(Request(image, clinical_image, metadata), timings, progress)
        # The latest run's figures (benchmarks) and, for classifiers, its logits (quantize refits on them).
        self.last_run = {**run.info, "logits": run.logits} if run.logits is not None else run.info
        with timed(timings, "review"):
            if self.task == "segment":
                assert run.mask is not None
                lesion = float(np.count_nonzero(run.mask)) / run.mask.size
                result = Result(label=None, probabilities={"lesion_fraction": lesion}, needs_review=False,
                                review_reasons=[], backend=self.backend_name, precision=self.precision,
                                mask=run.mask, heatmap=run.heatmap)
            else:
                assert run.logits is not None
                result = classification_result(run.logits, self.class_names, self.clinical, image,
                                               self.backend_name, self.precision)
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


def classification_result(logits: np.ndarray, class_names: Sequence[str], clinical: Clinical,
                          image: np.ndarray | None, backend: str, precision: str) -> Result:
    """A classifier's Result: temperature-scaled probabilities and the review rules
    (reason codes and their rules: runtime/safety.py) on the logits of one image."""
    from .safety import image_statistics, review

    probs = softmax(logits, clinical.temperature)
    reasons = review(probs, list(class_names), clinical.settings, image_statistics(image) if image is not None else None)
    return Result(
        label=class_names[int(np.argmax(probs))],
        probabilities={n: float(p) for n, p in zip(class_names, probs)},
        needs_review=bool(reasons), review_reasons=reasons, backend=backend, precision=precision,
    )


def load(bundle: str | os.PathLike[str], backend: str = "auto", precision: str = "auto",
         memory_budget: int | str | None = None, threads: int | None = None, verify: bool = True,
         cache: bool = True, plan_image_size: int | tuple[int, int] = 2048,
         graph_overrides: Mapping[str, str | os.PathLike[str]] | None = None,
         trusted_keys: Sequence[Any] | None = None, key_provider: Any = None,
         audit_log: str | os.PathLike[str] | None = None, audit_fields: Sequence[str] = (),
         selftest: bool = False, target: str | TargetProfile | None = None) -> DeployedModel:
    """Verify a bundle (hashes, paths) and load its graphs on ``backend``.

    ``memory_budget`` ("1.5GiB", "800MB" or bytes; see ``runtime.memory.parse_size``)
    sizes the tile batch from the bundle's measured memory profile, planned here for a
    ``plan_image_size`` image (MemoryBudgetError if even one tile does not fit, or the
    budget exceeds this machine's memory) and again for each image size.
    ``cache=False`` skips the optimised-graph cache (``backends.onnxruntime.cache_dir``).
    ``graph_overrides``: see :class:`DeployedModel`. ``backend="triton://HOST:PORT"``
    runs the stage graphs on a KServe v2 server (``edgederm serve`` or Triton) while
    decoding, tiling and review stay here (runtime/backends/remote.py).

    Device trust (runtime/trust.py): ``trusted_keys`` (public key files or PEM bytes)
    refuses a bundle whose signature is missing, by another key, or does not cover
    its exact files, before any graph is parsed; ``key_provider`` (a key file, an
    ``env:VAR`` or a callable returning 32 bytes) decrypts encrypted graphs into
    memory; ``selftest=True`` runs the bundle's golden inputs and refuses outputs
    outside their tolerance; ``audit_log`` appends one hash-chained JSON line per
    prediction, with the metadata fields named in ``audit_fields`` only.

    ``target`` (a profile name from runtime/target_profiles, or a TargetProfile) plans the
    batch for that device's unified memory (``edgederm plan``; without a budget, the
    target's memory less its OS's share). Left None, a Jetson running the graphs on its
    GPU plans for the profile ``targets.detect_target`` finds.
    """
    from .trust import after_load, before_load

    signature = before_load(bundle, trusted_keys)
    manifest = read_manifest(Path(bundle), verify=verify, defer_graphs=True)
    model = DeployedModel(manifest, backend=backend, precision=precision, threads=threads, memory_budget=memory_budget,
                          cache=cache, plan_image_size=plan_image_size, graph_overrides=graph_overrides,
                          key_provider=key_provider, target=target)
    return after_load(model, signature, selftest=selftest, audit_log=audit_log, audit_fields=audit_fields)

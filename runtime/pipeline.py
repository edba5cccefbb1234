"""One stage pipeline: a bundle plus a request -> per-stage feeds, run on backends.

Everything that feeds a stage lives here, once: ``predict`` runs it, and so do the
calibration data and the quantize evaluator (so INT8 ranges come from the pixels the
device feeds), the export-time memory profile and the benchmarks. Nothing here is
model-specific; the manifest says what each input is.

* Segmenters (task ``segment``: one stage fed ``"dermoscopy"``, output
  ``N x K x T x T`` logits): overlapping tiles of ``tiling.tile`` (default: the input
  size), ``overlap`` and ``blend`` from the manifest, each tile batch preprocessed
  from the uint8 image with the colour statistics of the whole image taken once,
  blended in a band of rows (``runtime.tiling.sliding_window`` with ``on_rows``) and
  reduced on the fly to a uint8 mask and a float32 heatmap (lesion probability;
  ``1 - p(background)`` for K > 1, ``sigmoid`` for K = 1) at input resolution.
  Probabilities, not logits, are blended (as MONAI blends what the predictor
  returns). ``tiling.working_max_side`` (when set) first rescales a larger image to
  the pixel scale the model learnt; mask and heatmap come back at input resolution.
* Staged models: each input names a ``source``: ``"dermoscopy"`` (whole image at
  the input size), ``"dermoscopy_windows"`` (the image resized to the window grid
  ``tiling.window x tiling.grid`` and streamed window batch by window batch; only the
  ``G x D`` embedding matrix is kept), ``"<stage>.<output>"`` (an earlier stage's
  output, reshaped to the declared shape, so ``B*G`` window embeddings become
  ``B x G x D``), ``"clinical"`` (the clinical image at the stage's input size, with
  its own colour statistics), ``"metadata"`` (encoded with the manifest's schema) and
  ``"modality_mask"`` (``1 x M``: which of the model's modalities, in manifest order,
  are present). A request runs only the stages it needs: a stage whose input comes
  from an absent modality is skipped, and a stage that takes a ``modality_mask`` gets
  zeros for what was skipped (what the model saw in training with that modality
  dropped).

``record(stage, feed)`` (optional) sees every feed handed to a backend: calibration
collects its INT8 ranges through it. ``timings`` gains each step's milliseconds
under the names of runtime/timings.py, and the sums ``preprocess`` and ``inference``.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Mapping

import cv2
import numpy as np

from . import preprocess as pp
from .backends.base import Backend
from .bundle import Manifest, Stage, TensorSpec
from .errors import BundleError, InputError
from .memory import MemoryPlan
from .probabilities import tile_probabilities
from .timings import Timings, add_sums, timed

Recorder = Callable[[str, Dict[str, np.ndarray]], None]
Progress = Callable[[int, int], None]
Planner = Callable[[int, int], MemoryPlan]


@dataclass
class Request:
    """What one prediction is given (already checked by the caller)."""

    dermoscopy: np.ndarray | None = None
    clinical: np.ndarray | None = None
    metadata: Mapping[str, Any] | None = None


@dataclass
class Run:
    """What a pipeline run produced: stage outputs (``"<stage>.<output>"``), or a mask
    and heatmap for segmenters, plus what the run did (tiles, batch, plan, stages)."""

    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    logits: np.ndarray | None = None
    mask: np.ndarray | None = None
    heatmap: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


def iter_window_batches(image: np.ndarray, config: pp.PreprocessConfig, window: int, rows: int, cols: int,
                        batch_size: int, stats: pp.ColorStats | None = None, timings: Timings | None = None
                        ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Preprocessed window batches ``(N x 3 x window x window, indices)``, row-major.

    The same resize policy as training's preprocess (stretch, letterbox, crop) to the
    grid's pixel size; colour constancy then per window with whole-image stats.
    """
    from .tiling import iter_windows

    if stats is None:
        with timed(timings, "color_stats"):
            stats = pp.image_color_stats(image, config)
    with timed(timings, "resize"):
        resized = pp.resize_image(image, (rows * window, cols * window), config.resize, config.crop_fraction)
    window_config = dataclasses.replace(config, input_size=(window, window), resize="none",
                                        crop_fraction=1.0)
    windows = iter_windows(resized, window, rows, cols, batch_size)
    while True:
        with timed(timings, "tiles"):
            item = next(windows, None)
        if item is None:
            return
        batch, indices = item
        yield pp.preprocess_batch(batch, window_config, stats, timings), indices


def image_windows(image: np.ndarray, config: pp.PreprocessConfig, window: int, rows: int, cols: int) -> np.ndarray:
    """All ``rows*cols`` windows of ``image`` (row-major), preprocessed as :class:`Pipeline` feeds them."""
    out = np.empty((rows * cols, 3, window, window), np.float32)
    for x, indices in iter_window_batches(image, config, window, rows, cols, batch_size=16):
        out[indices] = x
    return out


class Pipeline:
    """Feeds a bundle's stages from a :class:`Request` and runs them on ``backends``
    (stage name -> backend). ``planner(height, width)`` gives the tile/window batch."""

    def __init__(self, bundle: Manifest, backends: Mapping[str, Backend], planner: Planner) -> None:
        self.bundle = bundle
        self.backends = backends
        self.planner = planner
        self.config = bundle.preprocess
        self._schema: Any = None

    # -- requests ------------------------------------------------------------------------
    def run(self, request: Request, timings: Timings | None = None, progress: Progress | None = None,
            record: Recorder | None = None) -> Run:
        timings = timings if timings is not None else {}
        if self.bundle.model.task == "segment":
            if request.dermoscopy is None:
                raise InputError("a segmenter needs a dermoscopy image (H x W x 3 uint8 RGB); got None")
            run = self.segment(request.dermoscopy, timings, progress, record)
        else:
            run = self.stages(request, timings, progress, record)
        add_sums(timings)
        return run

    # -- staged (classification) path ----------------------------------------------------
    def stages(self, request: Request, timings: Timings, progress: Progress | None = None,
               record: Recorder | None = None) -> Run:
        modalities = self.bundle.model.modalities
        present = {
            "dermoscopy": request.dermoscopy is not None,
            "clinical": request.clinical is not None,
            "metadata": request.metadata is not None and "metadata" in modalities,
        }
        if not any(present.values()):
            raise InputError(f"predict got no input this model uses; give at least one of {list(modalities)}")
        run = Run()
        skipped: list[str] = []
        stats_cache: dict[str, pp.ColorStats | None] = {}
        stages = self.bundle.stages
        for stage in stages:
            takes_mask = "modality_mask" in stage.sources
            feed: dict[str, np.ndarray] = {}
            missing = []
            for spec in stage.inputs:
                if spec.source == "dermoscopy_windows":
                    continue  # streamed below
                value = self._source_value(spec, request, present, run.outputs, stats_cache, timings)
                if value is None:
                    missing.append(spec.source)
                    if not takes_mask:
                        continue
                    value = np.zeros((1, *(spec.static(1) or ())), dtype=spec.dtype)
                feed[spec.name] = value.astype(spec.dtype, copy=False)
            windows = [i for i in stage.inputs if i.source == "dermoscopy_windows"]
            if windows and not present["dermoscopy"]:
                missing.append("dermoscopy_windows")
            if missing and not takes_mask:
                skipped.append(stage.name)
                continue
            t0 = time.perf_counter()
            if windows:
                assert request.dermoscopy is not None
                out = self._run_windows(stage, windows[0], request.dermoscopy, feed, stats_cache, timings, run,
                                        progress, record)
            else:
                if record is not None:
                    record(stage.name, feed)
                with timed(timings, f"inference:{stage.name}"):
                    out = self.backends[stage.name].run(feed)
            timings[f"stage:{stage.name}"] = (time.perf_counter() - t0) * 1000
            run.outputs.update({f"{stage.name}.{k}": v for k, v in out.items()})
        final = stages[-1]
        if final.name in skipped:
            given = [m for m, ok in present.items() if ok]
            raise InputError(
                f"the model's output stage {final.name!r} needs inputs this request lacks "
                f"(given: {given}; the stage takes {list(final.sources)}). Fix: pass a dermoscopy image"
            )
        run.info.update(stages_run=[s.name for s in stages if s.name not in skipped], stages_skipped=skipped)
        run.logits = run.outputs[f"{final.name}.{final.outputs[0].name}"][0]
        return run

    def _stats(self, key: str, image: np.ndarray, cache: dict[str, pp.ColorStats | None],
               timings: Timings) -> pp.ColorStats | None:
        if key not in cache:
            with timed(timings, "color_stats"):
                cache[key] = pp.image_color_stats(image, self.config)
        return cache[key]

    def _source_value(self, spec: TensorSpec, request: Request, present: dict[str, bool],
                      outputs: dict[str, np.ndarray], stats_cache: dict[str, pp.ColorStats | None],
                      timings: Timings) -> np.ndarray | None:
        source = spec.source
        if source in ("dermoscopy", "clinical"):
            picture = request.dermoscopy if source == "dermoscopy" else request.clinical
            if picture is None:
                return None
            size = spec.static(2)
            config = dataclasses.replace(self.config, input_size=(size[0], size[1])) if size and len(size) == 2 \
                else self.config
            return pp.preprocess(picture, config, self._stats(source, picture, stats_cache, timings), timings)[None]
        if source == "metadata":
            if not present["metadata"]:
                return None
            with timed(timings, "metadata"):
                return self.schema(spec).encode(request.metadata)[None]
        if source == "modality_mask":
            modalities = self.bundle.model.modalities
            width = spec.shape[-1]
            if isinstance(width, int) and width != len(modalities):
                raise BundleError(f"modality_mask input has {width} columns but the model lists "
                                  f"{len(modalities)} modalities {list(modalities)}; re-export the bundle")
            return np.array([[float(present.get(m, False)) for m in modalities]], np.float32)
        value = outputs.get(source)  # "<stage>.<output>"
        if value is None:
            return None
        tail = spec.static(1)
        return np.ascontiguousarray(value.reshape(-1, *tail)) if tail else value

    def schema(self, spec: TensorSpec) -> Any:
        if self._schema is None:
            from .metadata import load_schema

            if self.bundle.model.metadata_schema is None:
                raise BundleError(f"stage input {spec.name!r} takes metadata but the manifest has no "
                                  "model.metadata_schema; re-export the bundle")
            self._schema = load_schema(self.bundle.model.metadata_schema)
        return self._schema

    def _run_windows(self, stage: Stage, spec: TensorSpec, image: np.ndarray, feed: dict[str, np.ndarray],
                     stats_cache: dict[str, pp.ColorStats | None], timings: Timings, run: Run,
                     progress: Progress | None, record: Recorder | None) -> dict[str, np.ndarray]:
        """Window embeddings, batch by batch; only the ``G x D`` matrix is kept."""
        window, rows, cols = self.bundle.window_layout
        plan = self.planner(*image.shape[:2])
        backend = self.backends[stage.name]
        out_name = stage.outputs[0].name
        embeddings: np.ndarray | None = None
        total = rows * cols
        batches = iter_window_batches(image, self.config, window, rows, cols, plan.batch_size,
                                      self._stats("dermoscopy", image, stats_cache, timings), timings)
        for x, indices in batches:
            stage_feed = {**feed, spec.name: x}
            if record is not None:
                record(stage.name, stage_feed)
            with timed(timings, f"inference:{stage.name}"):
                result = backend.run(stage_feed)[out_name]
            if embeddings is None:
                embeddings = np.empty((total, *result.shape[1:]), dtype=result.dtype)
            embeddings[indices] = result
            if progress is not None:
                progress(int(indices[-1]) + 1, total)
        assert embeddings is not None
        run.info.update(windows=total, batch_size=plan.batch_size, plan=plan.to_dict(), stage=stage.name)
        return {out_name: embeddings}

    # -- segmentation path ---------------------------------------------------------------
    def segment(self, image: np.ndarray, timings: Timings, progress: Progress | None = None,
                record: Recorder | None = None) -> Run:
        """Tiled segmentation; ``tiling.working_max_side`` (when set) rescales first."""
        full_height, full_width = image.shape[:2]
        working = self.bundle.tiling.working_max_side
        if not working or max(full_height, full_width) <= working:
            return self._segment_tiled(image, timings, progress, record)
        # The model learnt lesions at this pixel scale (e.g. whole images resized to
        # its input size): tile a copy at that scale, then bring the mask and the
        # heatmap back to the input resolution.
        scale = working / max(full_height, full_width)
        size = (max(1, round(full_width * scale)), max(1, round(full_height * scale)))
        with timed(timings, "resize"):
            working_image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        run = self._segment_tiled(working_image, timings, progress, record)
        assert run.mask is not None and run.heatmap is not None
        with timed(timings, "resize"):
            run.mask = cv2.resize(run.mask, (full_width, full_height), interpolation=cv2.INTER_NEAREST)
            run.heatmap = cv2.resize(run.heatmap, (full_width, full_height), interpolation=cv2.INTER_LINEAR)
        return run

    def _segment_tiled(self, image: np.ndarray, timings: Timings, progress: Progress | None,
                       record: Recorder | None) -> Run:
        """Tiled segmentation of an image already at the working scale."""
        from .tiling import TilingStats, sliding_window

        stage = self.bundle.stages[0]
        backend = self.backends[stage.name]
        tile = self.bundle.tile_size
        config = self.config
        if config.input_size != (tile, tile):
            config = dataclasses.replace(config, input_size=(tile, tile))
        height, width = image.shape[:2]
        plan = self.planner(height, width)
        with timed(timings, "color_stats"):
            stats = pp.image_color_stats(image, config)
        input_name, output_name = stage.inputs[0].name, stage.outputs[0].name
        mask = np.empty((height, width), np.uint8)
        heat = np.empty((height, width), np.float32)

        def predict_tiles(batch: np.ndarray) -> np.ndarray:
            x = pp.preprocess_batch(batch, config, stats, timings)
            if record is not None:
                record(stage.name, {input_name: x})
            with timed(timings, f"inference:{stage.name}"):
                logits = backend.run({input_name: x})[output_name]
            with timed(timings, "probabilities"):
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
        sliding_window(image, predict_tiles, tile=tile, overlap=self.bundle.tiling.overlap,
                       blend=self.bundle.tiling.blend, batch_size=plan.batch_size,
                       on_rows=on_rows, progress=progress, stats=tiling_stats, timings=timings)
        elapsed = time.perf_counter() - t0
        timings["tiled_inference"] = elapsed * 1000
        info = {"tiles": tiling_stats.tiles, "batches": tiling_stats.batches, "batch_size": plan.batch_size,
                "accumulator_bytes": tiling_stats.accumulator_bytes, "plan": plan.to_dict(),
                "tiles_per_s": tiling_stats.tiles / elapsed if elapsed > 0 else float("nan"), "stage": stage.name}
        return Run(mask=mask, heatmap=heat, info=info)

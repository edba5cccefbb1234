"""Calibration data: the inputs each stage really sees, made by the runtime's own code.

Images come from a folder (recursively: jpg, jpeg, png, bmp, tif, tiff, webp) or a
labelled folder (``labels.csv`` + ``images/``, optionally ``masks/<id>.png`` and
``clinical/<id>.<ext>``; the other CSV columns are metadata). Sampling is seeded; with
labels it is stratified (round robin over classes) so every class is represented.
The set's hash (sha256 of the chosen files' bytes, in order) is recorded in the bundle.

What a stage is calibrated on (decisions; they mirror runtime/model.py so INT8 ranges
come from the pixels the device will feed):
- ``dermoscopy`` of a segmenter (or any bundle with ``tiling.tile``): the tiles of
  ``runtime.tiling.make_grid`` (tile size and overlap from the manifest), cut from the
  uint8 image (reflect-padded along an axis shorter than the tile, as the tiler does)
  and preprocessed with the colour statistics of the whole image.
- ``dermoscopy`` of a classifier: the whole image through ``preprocess``.
- ``dermoscopy_windows``: the image resized to the window grid with the bundle's
  resize policy, cut by ``runtime.tiling.iter_windows``, each window preprocessed with
  whole-image statistics.
- ``clinical``: ``clinical/<id>.*`` when the folder has it; otherwise the dermoscopy
  image stands in (a warning says so and the bundle records it).
- ``metadata``: the CSV columns encoded with the manifest's schema (unknown columns
  dropped, empty = missing); ``modality_mask``: what the case has.
- ``<stage>.<output>``: the fp32 output of the earlier stage on the same case (run in
  ONNX Runtime), reshaped as the runtime reshapes it.
Tiles and windows are many per image; at most ``max_units`` per stage are kept for
calibration, drawn with the seed, all images represented.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgederm.runtime import preprocess as pp
from edgederm.runtime.errors import BundleError, InputError
from edgederm.runtime.imageio import read_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
MIN_RECOMMENDED = 32
_NOT_METADATA = {"id", "label", "class_name"}


@dataclass
class Case:
    """One calibration or evaluation case: a dermoscopy image and what else the folder has."""

    image: Path
    label: int | None = None
    metadata: dict[str, Any] | None = None
    mask: Path | None = None
    clinical: Path | None = None


@dataclass
class CalibrationSet:
    paths: list[Path]
    labels: list[int] | None
    sha256: str
    cases: list[Case] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def read_cases(root: str | Path) -> list[Case]:
    """Every case under ``root`` (labels.csv layout or a plain image folder)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"calibration folder {str(root)!r} does not exist or is not a folder; "
                         "give a folder of images, or labels.csv + images/")
    from edgederm.data.labels import LABELS_CSV
    from edgederm.data.layouts import read_dataset

    if (root / LABELS_CSV).is_file():
        return [Case(r.image, r.label, r.metadata or None, r.mask, r.clinical) for r in read_dataset(root, layout="edgederm")]
    return [Case(p) for p in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())]


def _stratified(labels: list[int], count: int, rng: np.random.Generator) -> list[int]:
    by_class: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(lab, []).append(i)
    queues = {k: [int(i) for i in rng.permutation(v)] for k, v in sorted(by_class.items())}
    chosen: list[int] = []
    while len(chosen) < count:
        for k in list(queues):
            if queues[k] and len(chosen) < count:
                chosen.append(queues[k].pop(0))
    return chosen


def select_calibration(root: str | Path, max_images: int = 64, seed: int = 0, exclude: set[str] | None = None,
                       warn: bool = True) -> CalibrationSet:
    """A seeded (stratified when labelled) sample of at most ``max_images`` cases from ``root``."""
    if max_images < 1:
        raise InputError(f"max_images must be >= 1; got {max_images}")
    cases = read_cases(root)
    if exclude:
        cases = [c for c in cases if str(c.image) not in exclude and c.image.name not in exclude]
    if not cases:
        raise InputError(f"no images found in {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, "
                         "or labels.csv + images/)")
    rng = np.random.default_rng(seed)
    labelled = all(c.label is not None for c in cases)
    if len(cases) > max_images:
        if labelled:
            chosen = _stratified([int(c.label) for c in cases], max_images, rng)  # type: ignore[arg-type]
        else:
            chosen = sorted(int(i) for i in rng.choice(len(cases), max_images, replace=False))
        cases = [cases[i] for i in chosen]
    if warn and len(cases) < MIN_RECOMMENDED:
        warnings.warn(
            f"only {len(cases)} calibration images; INT8 ranges from fewer than {MIN_RECOMMENDED} are often unstable. "
            "Add more representative images (all classes, skin tones, devices)", stacklevel=2,
        )
    digest = hashlib.sha256()
    for c in cases:
        digest.update(c.image.read_bytes())
    labels = [int(c.label) for c in cases] if labelled else None  # type: ignore[arg-type]
    return CalibrationSet([c.image for c in cases], labels, digest.hexdigest(), cases)


# -- what each stage sees ---------------------------------------------------------------
def image_tiles(image: np.ndarray, config: pp.PreprocessConfig, tile: int, overlap: float) -> np.ndarray:
    """The runtime's tiles of ``image`` (make_grid), preprocessed with whole-image colour stats."""
    from edgederm.runtime.tiling import cut_tile, make_grid

    grid = make_grid(image.shape[0], image.shape[1], tile, overlap)
    stats = pp.image_color_stats(image, config)
    tile_config = dataclasses.replace(config, input_size=(tile, tile))
    crops = [cut_tile(image, y, x, tile) for y, x in grid.tiles()]
    return pp.preprocess_batch(crops, tile_config, stats)


def image_windows(image: np.ndarray, config: pp.PreprocessConfig, window: int, rows: int, cols: int) -> np.ndarray:
    """All ``rows*cols`` windows of ``image`` (row-major), preprocessed as the runtime does."""
    from edgederm.runtime.tiling import iter_windows

    stats = pp.image_color_stats(image, config)
    resized = pp.resize_image(image, (rows * window, cols * window), config.resize)
    window_config = dataclasses.replace(config, input_size=(window, window), resize="none")
    out = np.empty((rows * cols, 3, window, window), np.float32)
    for batch, indices in iter_windows(resized, window, rows, cols, batch_size=16):
        out[indices] = pp.preprocess_batch(batch, window_config, stats)
    return out


class StageInputs:
    """Builds every stage's inputs for a list of cases from a bundle manifest.

    ``run(cases, graphs)`` walks the stages in manifest order; ``graphs`` maps a stage
    name to an ONNX file or ModelProto (fp32 for calibration). Returns, per stage, the
    per-case input dicts (arrays whose first axis is the stage's batch axis).
    """

    def __init__(self, manifest: Any, say: Callable[[str], None] = lambda m: None) -> None:
        self.manifest = manifest
        self.say = say
        self.config = pp.PreprocessConfig.from_dict(manifest.preprocess)
        self.tiling = dict(manifest.data.get("tiling") or {})
        self.task = manifest.model["task"]
        self.modalities = list(manifest.model.get("modalities", ["dermoscopy"]))
        schema = manifest.model.get("metadata_schema")
        self.schema = None
        if schema is not None:
            from edgederm.runtime.metadata import load_schema

            self.schema = load_schema(schema)
        self.notes: list[str] = []

    def window_layout(self, spec: dict[str, Any]) -> tuple[int, int, int]:
        shape = spec["shape"]
        window = int(self.tiling.get("window") or shape[-1])
        if "grid" in self.tiling:
            rows, cols = (int(v) for v in self.tiling["grid"])
        else:
            height, width = self.manifest.model.get("input_size", [window, window])
            rows, cols = max(1, int(height) // window), max(1, int(width) // window)
        return window, rows, cols

    def tiled(self) -> bool:
        return self.task == "segment" or "tile" in self.tiling

    def _image_input(self, source: str, spec: dict[str, Any], case: Case, image: np.ndarray) -> np.ndarray:
        shape = spec["shape"]
        size = (int(shape[2]), int(shape[3])) if all(isinstance(d, int) for d in shape[2:4]) else self.config.input_size
        if source == "dermoscopy_windows":
            window, rows, cols = self.window_layout(spec)
            return image_windows(image, self.config, window, rows, cols)
        if source == "dermoscopy" and self.tiled():
            tile = int(self.tiling.get("tile", size[0]))
            return image_tiles(image, self.config, tile, float(self.tiling.get("overlap", 0.25)))
        picture = image
        if source == "clinical":
            if case.clinical is not None:
                picture = read_image(case.clinical)
            else:
                note = "no clinical images in the calibration folder (clinical/<id>.jpg): the dermoscopy image stood in"
                if note not in self.notes:
                    self.notes.append(note)
                    warnings.warn(note, stacklevel=3)
        return pp.preprocess(picture, dataclasses.replace(self.config, input_size=size))[None]

    def _metadata(self, case: Case) -> np.ndarray:
        if self.schema is None:
            raise BundleError("a stage takes metadata but the manifest has no model.metadata_schema; re-export the bundle")
        return self.schema.encode(self.schema.select(case.metadata))[None]

    def run(self, cases: list[Case], graphs: dict[str, Any], threads: int = 2) -> dict[str, list[dict[str, np.ndarray]]]:
        from edgederm.runtime.backends.onnxruntime import cpu_session

        sessions = {stage["name"]: cpu_session(graphs[stage["name"]], threads) for stage in self.manifest.stages}
        per_stage: dict[str, list[dict[str, np.ndarray]]] = {s["name"]: [] for s in self.manifest.stages}
        for n, case in enumerate(cases):
            image = read_image(case.image)
            outputs: dict[str, np.ndarray] = {}
            for stage in self.manifest.stages:
                feed: dict[str, np.ndarray] = {}
                for spec in stage["inputs"]:
                    source = spec.get("source", "dermoscopy")
                    if source in ("dermoscopy", "dermoscopy_windows", "clinical"):
                        value = self._image_input(source, spec, case, image)
                    elif source == "metadata":
                        value = self._metadata(case)
                    elif source == "modality_mask":
                        present = {"dermoscopy": True, "clinical": True, "metadata": case.metadata is not None}
                        value = np.array([[float(present.get(m, False)) for m in self.modalities]], np.float32)
                    elif source in outputs:
                        tail = spec["shape"][1:]
                        value = outputs[source]
                        if all(isinstance(d, int) for d in tail):
                            value = np.ascontiguousarray(value.reshape(-1, *[int(d) for d in tail]))
                    else:
                        raise BundleError(f"stage {stage['name']!r} input {spec['name']!r} has source {source!r}, "
                                          "which calibration does not know; re-export the bundle with this SDK")
                    feed[spec["name"]] = value.astype(spec.get("dtype", "float32"), copy=False)
                per_stage[stage["name"]].append(feed)
                session = sessions[stage["name"]]
                names = [o.name for o in session.get_outputs()]
                results = session.run(names, feed)
                outputs.update({f"{stage['name']}.{k}": v for k, v in zip(names, results)})
            if (n + 1) % 16 == 0 or n + 1 == len(cases):
                self.say(f"  stage inputs: {n + 1}/{len(cases)} images")
        return per_stage


def batch_feeds(per_case: list[dict[str, np.ndarray]], batch_size: int = 8, max_units: int | None = None,
                seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Per-case feeds -> calibration batches; at most ``max_units`` rows, sampled evenly over cases."""
    if not per_case:
        return []
    names = list(per_case[0])
    rows = {n: np.concatenate([f[n] for f in per_case]) for n in names}
    total = len(next(iter(rows.values())))
    if max_units is not None and total > max_units:
        rng = np.random.default_rng(seed)
        # Every case contributes: an even share per case, then the remainder at random.
        owners = np.concatenate([np.full(len(next(iter(f.values()))), i) for i, f in enumerate(per_case)])
        share = max(1, max_units // len(per_case))
        picked: list[int] = []
        for i in range(len(per_case)):
            idx = np.flatnonzero(owners == i)
            picked += [int(j) for j in rng.permutation(idx)[:share]]
        rest = np.setdiff1d(np.arange(total), picked)
        picked += [int(j) for j in rng.permutation(rest)[:max(0, max_units - len(picked))]]
        keep = np.sort(np.array(picked[:max_units]))
        rows = {n: v[keep] for n, v in rows.items()}
        total = len(keep)
    return [{n: np.ascontiguousarray(v[i:i + batch_size]) for n, v in rows.items()} for i in range(0, total, batch_size)]

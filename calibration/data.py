"""Calibration data: the inputs each stage really sees, made by the runtime's own code.

Images come from a folder (recursively: jpg, jpeg, png, bmp, tif, tiff, webp) or a
labelled folder (``labels.csv`` + ``images/``, optionally ``masks/<id>.png`` and
``clinical/<id>.<ext>``; the other CSV columns are metadata). Sampling is seeded; with
labels it is stratified (round robin over classes) so every class is represented.
The set's hash (sha256 of the chosen files' bytes, in order) is recorded in the bundle.

What a stage is calibrated on: exactly what the device feeds it, because the feeds
come from the runtime's own stage pipeline (runtime/pipeline.py: tiles of a
segmenter at its working scale, windows, whole images, metadata, modality mask,
earlier stages' fp32 outputs), run on the fp32 graphs; :class:`StageInputs` records
every feed the pipeline hands a backend. Decisions taken here:
- ``clinical``: ``clinical/<id>.*`` when the folder has it; otherwise the dermoscopy
  image stands in (a warning says so and the bundle records it).
- ``metadata``: the CSV columns encoded with the manifest's schema (unknown columns
  dropped, empty = missing).
Tiles and windows are many per image (64 windows of a 2048x2048 image): each image
keeps a seeded sample of its rows per stage, drawn while the pipeline streams them
(:class:`RowSample`), so memory holds the sample and not every window of every image;
then at most ``max_units`` rows per stage are kept for calibration, all images
represented. The fp32 pass that records the feeds also keeps each case's fp32 logits:
``quantize`` takes its reference decisions from them instead of a second fp32 pass.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from edgederm.runtime.bundle import Manifest
from edgederm.runtime.errors import InputError
from edgederm.runtime.imageio import read_image
from edgederm.runtime.pipeline import Pipeline, Request

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
class StageInputs:
    """Every stage's inputs for a list of cases, recorded from the runtime's pipeline.

    ``request(case, image)`` is the request a case makes (the quantize evaluator sends
    the same one); ``run(cases, graphs)`` runs the pipeline with ``graphs`` (stage name
    -> ONNX file, fp32 for calibration) on ONNX Runtime's CPU provider and returns, per
    stage, the per-case input dicts (arrays whose first axis is the stage's batch axis).
    """

    def __init__(self, manifest: Manifest, say: Callable[[str], None] = lambda m: None) -> None:
        self.manifest = manifest
        self.say = say
        self.notes: list[str] = []
        self._schema: Any = None
        self.logits: list[np.ndarray] = []  # fp32 logits per case of the latest run (classifiers)

    def request(self, case: Case, image: np.ndarray, read: Callable[[Path], np.ndarray] = read_image) -> Request:
        model = self.manifest.model
        clinical = None
        if "clinical" in model.modalities:
            if case.clinical is not None:
                clinical = read(case.clinical)
            else:
                clinical = image
                note = "no clinical images in the calibration folder (clinical/<id>.jpg): the dermoscopy image stood in"
                if note not in self.notes:
                    self.notes.append(note)
                    warnings.warn(note, stacklevel=3)
        metadata = None
        if "metadata" in model.modalities and case.metadata is not None and model.metadata_schema is not None:
            if self._schema is None:
                from edgederm.runtime.metadata import load_schema

                self._schema = load_schema(model.metadata_schema)
            metadata = self._schema.select(case.metadata)
        return Request(image, clinical, metadata)

    def run(self, cases: list[Case], graphs: Mapping[str, str | os.PathLike[str]], threads: int = 2,
            rows_per_case: int | None = None, seed: int = 0,
            tick: Callable[[int], None] | None = None) -> dict[str, list[dict[str, np.ndarray]]]:
        """Per stage, the per-case input dicts; ``rows_per_case``: keep at most that many rows
        (tiles, windows) of each case per stage, a seeded uniform sample drawn while the
        pipeline streams them (memory stays at that many rows, not all of them).
        ``tick(k)``: called after the k-th case. The fp32 logits of every case (classifiers)
        are kept in :attr:`logits`: the reference decisions, without a second fp32 pass."""
        from edgederm.runtime.backends.onnxruntime import OnnxRuntimeBackend
        from edgederm.runtime.memory import plan

        manifest = self.manifest
        backends = {s.name: OnnxRuntimeBackend(graphs[s.name], threads=threads) for s in manifest.stages}
        pipeline = Pipeline(manifest, backends, lambda height, width: plan(manifest, None, height, width))
        per_stage: dict[str, list[dict[str, np.ndarray]]] = {s.name: [] for s in manifest.stages}
        index = {s.name: i for i, s in enumerate(manifest.stages)}
        self.logits = []
        for n, case in enumerate(cases):
            image = read_image(case.image)
            samplers: dict[str, RowSample] = {}

            def record(stage: str, feed: dict[str, np.ndarray]) -> None:
                if stage not in samplers:
                    samplers[stage] = RowSample(rows_per_case, np.random.default_rng([seed, n, index[stage]]))
                samplers[stage].add(feed)

            run = pipeline.run(self.request(case, image), record=record)
            if run.logits is not None:
                self.logits.append(np.asarray(run.logits))
            for stage, sample in samplers.items():
                per_stage[stage].append(sample.rows())
            if tick is not None:
                tick(n + 1)
        return per_stage


class RowSample:
    """A seeded uniform sample of at most ``size`` rows (first axis) of a stream of feed
    dicts (reservoir sampling, Vitter's algorithm R), rows kept in stream order;
    ``size=None`` keeps every row."""

    def __init__(self, size: int | None, rng: np.random.Generator) -> None:
        if size is not None and size < 1:
            raise InputError(f"rows per case must be >= 1; got {size}")
        self.size = size
        self.rng = rng
        self.seen = 0
        self._parts: list[dict[str, np.ndarray]] = []  # size None: every feed
        self._slots: dict[str, np.ndarray] = {}
        self._order = np.zeros(0, np.int64)  # stream position of each kept row

    def add(self, feed: dict[str, np.ndarray]) -> None:
        count = len(next(iter(feed.values())))
        if self.size is None:
            self._parts.append({k: np.array(v, copy=True) for k, v in feed.items()})
            self.seen += count
            return
        for r in range(count):
            position = self.seen + r
            if position < self.size:
                slot = position
            else:
                slot = int(self.rng.integers(0, position + 1))
                if slot >= self.size:
                    continue
            if not self._slots:
                self._slots = {k: np.empty((self.size, *v.shape[1:]), v.dtype) for k, v in feed.items()}
                self._order = np.full(self.size, -1, np.int64)
            for k, v in feed.items():
                self._slots[k][slot] = v[r]
            self._order[slot] = position
        self.seen += count

    def rows(self) -> dict[str, np.ndarray]:
        if self.size is None:
            return {k: np.concatenate([p[k] for p in self._parts]) for k in self._parts[0]}
        kept = min(self.seen, self.size)
        order = np.argsort(self._order[:kept], kind="stable")
        return {k: v[:kept][order] for k, v in self._slots.items()}


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

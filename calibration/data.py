"""Calibration data: images read and preprocessed exactly as the runtime does.

Images come from a folder (recursively: jpg, jpeg, png, bmp, tif, tiff, webp) or a
labelled folder (``labels.csv`` + ``images/``). Sampling is seeded; with labels it is
stratified so every class is represented. The set's hash (of the file bytes of the
chosen images, in order) is recorded in the bundle.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgederm.runtime import preprocess as pp
from edgederm.runtime.errors import InputError
from edgederm.runtime.imageio import read_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
MIN_RECOMMENDED = 32


@dataclass
class CalibrationSet:
    paths: list[Path]
    labels: list[int] | None
    sha256: str

    def __len__(self) -> int:
        return len(self.paths)


def list_images(root: str | Path) -> tuple[list[Path], list[int] | None]:
    """Image paths under ``root`` and their labels when a labels.csv is present."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"calibration folder {str(root)!r} does not exist or is not a folder")
    table = root / "labels.csv"
    if table.is_file():
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
        paths, labels = [], []
        for r in rows:
            for ext in (".jpg", ".png", ".jpeg"):
                p = root / "images" / f"{r['id']}{ext}"
                if p.exists():
                    paths.append(p)
                    labels.append(int(r["label"]))
                    break
        return paths, labels
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return paths, None


def select_calibration(root: str | Path, max_images: int = 64, seed: int = 0, exclude: set[str] | None = None) -> CalibrationSet:
    paths, labels = list_images(root)
    if exclude:
        keep = [i for i, p in enumerate(paths) if p.name not in exclude]
        paths = [paths[i] for i in keep]
        labels = [labels[i] for i in keep] if labels is not None else None
    if not paths:
        raise InputError(f"no images found in {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    rng = np.random.default_rng(seed)
    if len(paths) > max_images:
        if labels is not None:
            # Stratified: round-robin over classes, each class's order seeded.
            by_class: dict[int, list[int]] = {}
            for i, lab in enumerate(labels):
                by_class.setdefault(lab, []).append(i)
            queues = {k: list(rng.permutation(v)) for k, v in sorted(by_class.items())}
            chosen: list[int] = []
            while len(chosen) < max_images:
                for k in list(queues):
                    if queues[k] and len(chosen) < max_images:
                        chosen.append(int(queues[k].pop(0)))
        else:
            chosen = sorted(int(i) for i in rng.choice(len(paths), max_images, replace=False))
        paths = [paths[i] for i in chosen]
        labels = [labels[i] for i in chosen] if labels is not None else None
    if len(paths) < MIN_RECOMMENDED:
        warnings.warn(
            f"only {len(paths)} calibration images; INT8 ranges from fewer than {MIN_RECOMMENDED} are often unstable. "
            "Add more representative images (all classes, skin tones, devices)", stacklevel=2,
        )
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.read_bytes())
    return CalibrationSet(paths, labels, digest.hexdigest())


def load_batch(paths: list[Path], config: pp.PreprocessConfig) -> np.ndarray:
    """Preprocessed N x 3 x H x W float32, through the runtime's code."""
    return np.stack([pp.preprocess(read_image(p), config) for p in paths]).astype(np.float32)

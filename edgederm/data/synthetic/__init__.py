"""Synthetic dermoscopy images: a stand-in for ISIC-like data in quickstarts and tests.

Real dermoscopy archives (ISIC and friends) are large, licence-bound and cannot ship
with an SDK or run in CI, yet every stage of EdgeDerm (training, export, INT8
calibration, tiled high-resolution inference) needs images whose classes a model can
actually learn. This module draws such images procedurally, from a seed, with numpy
and OpenCV only (no torch), at any size from 32x32 to 4096x4096.

Visual grammar (what a model has to learn; loosely after the dermoscopic criteria of
the ABCD rule and the 7-point checklist):

* ``nevus`` (benign melanocytic): a regular, round-to-elliptical, symmetric lesion,
  uniformly brown, with a smooth border and a *regular* pigment network (a fine
  honeycomb of darker lines) that fades towards the periphery.
* ``melanoma``: an *irregular*, asymmetric border (radius perturbed by several
  harmonics plus jagged high-frequency ones), several colours (light brown, dark
  brown, black, grey) placed asymmetrically, a blue-white veil, irregular streaks
  (pseudopods) in one or two sectors of the periphery, irregular black dots, and an
  *atypical* network (distorted cells, thick lines, present only in patches).
* ``vascular`` (angioma-like): a red to red-purple lesion with a well demarcated
  border containing red lacunae (round red-to-dark-red blobs) separated by paler
  septa, and no pigment network.

Around the lesion: skin of Fitzpatrick I-VI-like tones with low-frequency shading and
mottled texture; artefacts that real images carry and a deployed model must ignore:
hair (sometimes none), the dermoscope's dark circular vignette, slight sensor noise
and a JPEG round trip at quality 70-95. Metadata (age, sex, anatomic site) is
correlated with the class as in registries (melanoma: older, more often male, back
and trunk; vascular: more often face and lower extremity), and the skin tone is
recorded so fairness checks can stratify by it.

Decisions taken here:

* Geometry is resolution independent. Every random quantity is drawn from
  ``np.random.default_rng(seed)`` in an order that does not depend on the image size;
  positions and lengths are fractions of ``s = min(height, width)``, and random
  fields are drawn as small fixed-size grids that are resized to the image. The same
  seed rendered at 128 and at 2048 is the same lesion; only the per-pixel sensor
  noise (a second generator keyed by seed and size) differs.
* Speed comes from rendering the smooth part of the picture (skin, lesion colours,
  lesion edge, veil, streaks, vignette) at most 512 pixels on the long side and
  resizing it up once; what must stay crisp at full resolution (pigment network,
  lacunae, dots, hair, noise, the mask itself) is drawn at full resolution, the
  network only inside the lesion's bounding box.
* Clarity over realism: the classes are meant to be separable by a small CNN in a
  minute of training at 128x128, yet their mean colours overlap through skin tone,
  lesion darkness and vignetting, so colour alone is not the whole story.
"""
from __future__ import annotations

import csv
import io
import operator
import os
import pathlib
import sys
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from edgederm.data.synthetic.plan import CLASS_NAMES, SEXES, SITES, draw_plan
from edgederm.data.synthetic.render import render
from edgederm.runtime.bundle import write_bytes_atomic
from edgederm.runtime.errors import InputError

__all__ = [
    "CLASS_NAMES",
    "SITES",
    "SEXES",
    "CSV_FIELDS",
    "MIN_SIZE",
    "MAX_SIZE",
    "SyntheticCase",
    "generate_case",
    "generate_dataset",
    "read_labels_csv",
]

CSV_FIELDS: tuple[str, ...] = ("id", "label", "class_name", "age", "sex", "site", "skin_tone")
MIN_SIZE = 32
MAX_SIZE = 4096


@dataclass(frozen=True, eq=False)
class SyntheticCase:
    """One synthetic dermoscopy case.

    ``eq=False``: the fields are numpy arrays, so compare ``image``/``mask`` with
    ``np.array_equal`` rather than ``==`` on the cases.
    """

    image: np.ndarray  # H x W x 3 uint8 RGB
    mask: np.ndarray  # H x W uint8 in {0, 1}; 1 = lesion (streaks included, hair not)
    label: int
    class_name: str
    metadata: dict  # {"age": int, "sex": str, "site": str, "skin_tone": int}


# --------------------------------------------------------------------------- checks


def _check_size(size: Any, where: str = "generate_case") -> tuple[int, int]:
    """``size`` (int or (height, width)) -> (height, width), or a clear InputError."""
    fix = (
        f"pass size=128 (square) or size=(height, width) with both sides in "
        f"{MIN_SIZE}..{MAX_SIZE}"
    )
    try:
        if isinstance(size, (tuple, list)):
            if len(size) != 2:
                raise TypeError
            height, width = (_strict_int(v) for v in size)
        else:
            height = width = _strict_int(size)
    except TypeError:
        raise InputError(
            f"{where}: size {size!r} is not an image size; expected an int or a "
            f"(height, width) pair of ints; fix: {fix}"
        ) from None
    if not (MIN_SIZE <= height <= MAX_SIZE and MIN_SIZE <= width <= MAX_SIZE):
        raise InputError(
            f"{where}: size {size!r} is out of range (received height={height}, "
            f"width={width}); expected each side between {MIN_SIZE} and {MAX_SIZE} "
            f"pixels; fix: {fix}"
        )
    return height, width


def _strict_int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError
    return operator.index(value)  # accepts numpy integers, rejects floats and strings


def _check_label(label: Any) -> int | None:
    if label is None:
        return None
    names = ", ".join(f"{i}={name!r}" for i, name in enumerate(CLASS_NAMES))
    try:
        value = _strict_int(label)
    except TypeError:
        value = None
    if value is None or not 0 <= value < len(CLASS_NAMES):
        raise InputError(
            f"generate_case: label {label!r} is not a valid class; expected an int in "
            f"0..{len(CLASS_NAMES) - 1} ({names}) or None to draw one from the seed; "
            f"fix: pass e.g. label=CLASS_NAMES.index('melanoma')"
        )
    return value


def _check_seed(seed: Any) -> int:
    try:
        value = _strict_int(seed)
    except TypeError:
        value = -1
    if value < 0:
        raise InputError(
            f"generate_case: seed {seed!r} is not usable; expected a non-negative int; "
            f"fix: pass e.g. seed=0"
        )
    return value


# --------------------------------------------------------------------------- public API


def generate_case(seed: int, size: int | tuple[int, int] = 256, label: int | None = None) -> SyntheticCase:
    """Render one synthetic dermoscopy case.

    Args:
        seed: non-negative int; the same seed, size and label give identical bytes.
        size: side of a square image, or (height, width); each side 32..4096.
        label: index into CLASS_NAMES, or None to draw the class from the seed (the
            case is then identical to passing the drawn label explicitly).

    Returns:
        SyntheticCase with an H x W x 3 uint8 RGB image, an H x W {0, 1} uint8 mask,
        the label, its class name and metadata {age, sex, site, skin_tone}.
    """
    height, width = _check_size(size)
    label = _check_label(label)
    seed = _check_seed(seed)
    plan = draw_plan(np.random.default_rng(seed), label)
    # Per-pixel noise needs a stream of the image's size; key it by size, so that the
    # geometry stream above stays the same at every resolution.
    noise_rng = np.random.default_rng([seed, height, width, 0x5EED])
    image, mask = render(plan, height, width, noise_rng)
    return SyntheticCase(
        image=image,
        mask=mask,
        label=plan.label,
        class_name=CLASS_NAMES[plan.label],
        metadata=dict(plan.metadata),
    )


def generate_dataset(
    out_dir: str | os.PathLike,
    n_per_class: int,
    size: int | tuple[int, int] = 128,
    seed: int = 0,
    progress: bool = False,
) -> pathlib.Path:
    """Write a balanced synthetic dataset and return its directory.

    Layout: ``images/<id>.jpg`` (RGB, JPEG quality 95), ``masks/<id>.png`` (0/255) and
    ``labels.csv`` with columns CSV_FIELDS. Case i (ids ``syn_000000``, ...) uses seed
    ``seed * 1_000_003 + i`` and label ``i % 3``. labels.csv is written last and
    atomically, so a directory with a labels.csv is complete.
    """
    height, width = _check_size(size, where="generate_dataset")
    try:
        n_per_class = _strict_int(n_per_class)
    except TypeError:
        n_per_class = -1
    if n_per_class < 1:
        raise InputError(
            f"generate_dataset: n_per_class must be a positive int (received {n_per_class!r}); "
            f"fix: pass e.g. n_per_class=100"
        )
    seed = _check_seed(seed)
    out = pathlib.Path(out_dir)
    images_dir, masks_dir = out / "images", out / "masks"
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)

    total = n_per_class * len(CLASS_NAMES)
    step = max(1, total // 10)
    rows = []
    for i in range(total):
        case = generate_case(seed * 1_000_003 + i, (height, width), label=i % len(CLASS_NAMES))
        case_id = f"syn_{i:06d}"
        image_path = images_dir / f"{case_id}.jpg"
        if not cv2.imwrite(str(image_path), cv2.cvtColor(case.image, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, 95]):
            raise OSError(f"generate_dataset: could not write {image_path}; check the directory is writable")
        mask_path = masks_dir / f"{case_id}.png"
        if not cv2.imwrite(str(mask_path), case.mask * np.uint8(255)):
            raise OSError(f"generate_dataset: could not write {mask_path}; check the directory is writable")
        rows.append({"id": case_id, "label": case.label, "class_name": case.class_name, **case.metadata})
        if progress and ((i + 1) % step == 0 or i + 1 == total):
            print(f"generate_dataset: {i + 1}/{total} cases ({100 * (i + 1) // total}%)",
                  file=sys.stderr, flush=True)

    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(out / "labels.csv", table.getvalue().encode("utf-8"))
    return out


def read_labels_csv(path: str | os.PathLike) -> list[dict]:
    """Read a labels.csv written by generate_dataset (or the dataset directory).

    Returns one dict per row with keys CSV_FIELDS; label, age and skin_tone are ints.
    The file is parsed by :func:`edgederm.data.labels.read_labels_table`, the one
    labels.csv parser; this adds the checks of the synthetic columns.
    """
    from edgederm.data.labels import read_labels_table
    from edgederm.data.tables import parse_csv_value

    table = read_labels_table(path)
    missing = [name for name in CSV_FIELDS if name not in table.header]
    if missing:
        raise InputError(
            f"read_labels_csv: {str(table.path)!r} lacks columns {missing} (found "
            f"{table.header}); expected header {','.join(CSV_FIELDS)}; fix: "
            f"regenerate it with generate_dataset"
        )
    rows = []
    for row in table.rows:
        values = {k: parse_csv_value(v) for k, v in row.values.items()}
        class_name = table.class_names[row.label] if row.label is not None else None
        record = {"id": row.id, "label": row.label, "class_name": class_name, **values}
        if not all(isinstance(record[k], int) for k in ("label", "age", "skin_tone")):
            raise InputError(
                f"read_labels_csv: {str(table.path)!r} line {row.line}: label, age and skin_tone "
                f"must be integers (received {record!r}); fix: regenerate the file"
            )
        rows.append(record)
    return rows

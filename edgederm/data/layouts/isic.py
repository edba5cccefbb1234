"""``isic``: ISIC 2018 Task 3 / ISIC 2019 classification.

A ground-truth CSV with an ``image`` column and one-hot class columns (MEL, NV, BCC,
AKIEC or AK, BKL, DF, VASC, SCC, UNK), classes in the CSV's column order. ISIC 2019's
``UNK`` column has no positive in the training CSV (it exists for the test set's
out-of-distribution images) and is dropped when empty, so the model does not get a
class it never sees; the dataset's ``notes`` say so. ISIC 2019's metadata CSV is read
when present (schema ``isic2019``); its ``lesion_id`` becomes the record's ``group``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from edgederm.data.files import ImageIndex
from edgederm.data.layouts.common import MetadataReader, find_markers, missing_images_error, one_file
from edgederm.data.layouts.registry import LAYOUTS, register_layout
from edgederm.data.records import Dataset, Record, SchemaLike, resolve_schema
from edgederm.data.tables import csv_header, read_table
from edgederm.runtime.errors import InputError

ISIC_CLASS_COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")

DESCRIPTION = (
    "ISIC 2018/2019 classification: a ground-truth CSV with an 'image' column and one-hot class columns "
    "(MEL, NV, BCC, AKIEC or AK, BKL, DF, VASC[, SCC, UNK]) + <image>.jpg below the root "
    "[+ ISIC 2019 metadata CSV: image, age_approx, anatom_site_general, lesion_id, sex]"
)


def _gt_header(header: Sequence[str]) -> bool:
    return "image" in header and sum(c in ISIC_CLASS_COLUMNS for c in header) >= 2


def _gt_files(root: Path) -> list[Path]:
    return [p for p in find_markers(root, lambda n: n.lower().endswith(".csv"))
            if "metadata" not in p.name.lower() and _gt_header(csv_header(p))]


def _metadata_files(root: Path) -> list[Path]:
    return [p for p in find_markers(root, lambda n: n.lower().endswith(".csv"))
            if {"image", "age_approx"} <= set(csv_header(p)) or {"image", "anatom_site_general"} <= set(csv_header(p))]


def _detect(root: Path) -> str | None:
    return next((f"one-hot ground truth {p.relative_to(root)}" for p in _gt_files(root)), None)


def _detect_file(path: Path) -> str | None:
    return f"one-hot ground truth {path.name}" if _gt_header(csv_header(path)) else None


@register_layout("isic", DESCRIPTION, _detect, detect_file=_detect_file,
                 aliases=("isic2018", "isic2019", "isic_2018", "isic_2019"))
def read_isic(root: Path, schema: SchemaLike) -> Dataset:
    if root.is_file():
        table, search = root, root.parent
    else:
        table, search = one_file(_gt_files(root), root, "ISIC one-hot ground-truth CSV", "isic"), root
    header, rows = read_table(table)
    if "image" not in header:
        raise InputError(f"{table} has no 'image' column (columns: {header}); the isic layout expects {LAYOUTS['isic']}")
    class_columns = [c for c in header if c in ISIC_CLASS_COLUMNS]
    ignored = [c for c in header if c != "image" and c not in ISIC_CLASS_COLUMNS]
    if len(class_columns) < 2:
        raise InputError(f"{table} has class columns {class_columns}; expected at least two of {list(ISIC_CLASS_COLUMNS)}")
    notes = [f"ignored columns {ignored}"] if ignored else []
    onehot = np.zeros((len(rows), len(class_columns)), np.float64)
    for i, row in enumerate(rows):
        try:
            onehot[i] = [float(row[c]) for c in class_columns]
        except ValueError:
            raise InputError(f"{table} line {i + 2} (image {row['image']!r}): class columns must be 0 or 1; "
                             f"got {[row[c] for c in class_columns]}") from None
        if (onehot[i] > 0.5).sum() != 1:
            raise InputError(f"{table} line {i + 2} (image {row['image']!r}) marks {int((onehot[i] > 0.5).sum())} "
                             f"classes of {class_columns}; expected exactly one 1.0 per row")
    keep = [j for j, c in enumerate(class_columns) if not (c == "UNK" and onehot[:, j].max(initial=0) < 0.5)]
    if len(keep) < len(class_columns):
        notes.append("dropped class UNK: no image of it in this CSV (ISIC 2019 keeps it for the test set)")
    class_names = tuple(class_columns[j] for j in keep)
    labels = onehot[:, keep].argmax(1)

    meta_tables = _metadata_files(search)
    meta_rows: dict[str, dict[str, str]] = {}
    pick = None
    chosen = None
    if len(meta_tables) > 1:
        raise InputError(f"{search} holds several ISIC metadata CSVs: {[str(p) for p in meta_tables]}; "
                         "keep the one that belongs to the ground truth next to it")
    if meta_tables:
        meta_header, meta_list = read_table(meta_tables[0])
        meta_rows = {r["image"]: r for r in meta_list}
        chosen = resolve_schema(schema, "isic2019")
        available = [c for c in meta_header if c not in ("image", "lesion_id")]
        pick = MetadataReader(meta_tables[0], available, chosen)
        notes.append(f"metadata from {meta_tables[0].name}")
    elif schema is not None:
        chosen = resolve_schema(schema, None)
        pick = MetadataReader(table, [], chosen)  # raises: no metadata to fill the schema
    index = ImageIndex(search)
    records, missing = [], []
    for row, label in zip(rows, labels):
        image = index.find(row["image"])
        if image is None:
            missing.append(row["image"])
            continue
        meta_row = meta_rows.get(row["image"], {})
        metadata = pick(meta_row, f"image {row['image']!r}") if pick else {}
        records.append(Record(row["image"], image, int(label), class_names, metadata,
                              group=meta_row.get("lesion_id") or None))
    if missing:
        raise missing_images_error(missing, table, search, "isic")
    return Dataset("isic", root, records, class_names, chosen, notes)

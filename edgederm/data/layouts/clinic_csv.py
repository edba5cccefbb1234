"""``csv``: a clinic's own CSV.

An image path column, a label column (class names, or integer indices), an optional
mask column; other columns are metadata. With a schema (a JSON file, see
``edgederm.runtime.metadata``) only its fields are metadata and each must be a column.
Paths are relative to the CSV unless absolute.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from edgederm.data.layouts.common import MetadataReader
from edgederm.data.layouts.registry import LAYOUTS, register_layout
from edgederm.data.records import Dataset, Record, SchemaLike, resolve_schema
from edgederm.data.tables import csv_header, read_table
from edgederm.runtime.errors import InputError

_GROUP_COLUMNS = ("lesion_id", "patient_id", "group")

DESCRIPTION = (
    "a CSV file (or a folder holding one) with an image path column (image, image_path, path, file), "
    "a label column (label, diagnosis, dx, class), an optional mask column (mask, mask_path) and "
    "metadata columns (validated by schema=...); paths relative to the CSV"
)


def _columns(header: Sequence[str]) -> tuple[str | None, str | None]:
    """(image path column, label column) of a clinic CSV, by their usual names."""
    lowered = {c.lower(): c for c in header}
    image = next((lowered[c] for c in ("image", "image_path", "path", "file", "filename", "img") if c in lowered), None)
    label = next((lowered[c] for c in ("label", "diagnosis", "dx", "class") if c in lowered), None)
    return image, label


def _detect(root: Path) -> str | None:
    tables = [p for p in sorted(root.glob("*.csv")) if all(_columns(csv_header(p)))]
    return f"{tables[0].name} with image and label columns" if len(tables) == 1 else None


def _detect_file(path: Path) -> str | None:
    return f"{path.name} with image and label columns" if all(_columns(csv_header(path))) else None


@register_layout("csv", DESCRIPTION, _detect, generic=True, detect_file=_detect_file)
def read_clinic_csv(root: Path, schema: SchemaLike) -> Dataset:
    if root.is_file():
        table = root
    else:
        tables = sorted(root.glob("*.csv"))
        if len(tables) != 1:
            raise InputError(f"{root} holds {len(tables)} CSV files {[t.name for t in tables]}; the csv layout needs "
                             "exactly one, or pass the CSV file itself")
        table = tables[0]
    header, rows = read_table(table)
    image_column, label_column = _columns(header)
    if image_column is None or label_column is None:
        raise InputError(f"{table} has columns {header}; the csv layout expects {LAYOUTS['csv']}")
    lowered = {c.lower(): c for c in header}
    mask_column = next((lowered[c] for c in ("mask", "mask_path", "segmentation") if c in lowered), None)
    id_column = next((lowered[c] for c in ("id", "image_id") if c in lowered), None)
    group_column = next((lowered[c] for c in _GROUP_COLUMNS if c in lowered), None)
    name_column = lowered.get("class_name")
    identifiers = {image_column, label_column, mask_column, id_column, name_column,
                   *(lowered[c] for c in _GROUP_COLUMNS if c in lowered)}
    chosen = resolve_schema(schema, None)
    pick = MetadataReader(table, [c for c in header if c not in identifiers], chosen)
    values = [row[label_column] for row in rows]
    empty = [line for line, v in enumerate(values, start=2) if v == ""]
    if empty:
        raise InputError(f"{table} line {empty[0]}: empty {label_column!r}; every image needs a label")
    if all(re.fullmatch(r"\d+", v) for v in values):
        # Integer labels are indices; class names come from a class_name column when there is one.
        names: dict[int, str] = {}
        for row, v in zip(rows, values):
            names[int(v)] = (row.get(name_column) if name_column else "") or f"class_{v}"
        class_names = tuple(names.get(i, f"class_{i}") for i in range(max(names) + 1))
        labels = [int(v) for v in values]
    else:
        class_names = tuple(sorted(set(values)))
        labels = [class_names.index(v) for v in values]
    base = table.parent
    records, missing = [], []
    for line, (row, label) in enumerate(zip(rows, labels), start=2):
        image = _resolve_path(base, row[image_column])
        if not image.is_file():
            missing.append(f"line {line}: {row[image_column]}")
            continue
        mask = _resolve_path(base, row[mask_column]) if mask_column and row[mask_column] else None
        if mask is not None and not mask.is_file():
            missing.append(f"line {line}: {mask.relative_to(base) if mask.is_relative_to(base) else mask}")
            continue
        record_id = (row[id_column] if id_column else "") or Path(row[image_column]).with_suffix("").as_posix()
        records.append(Record(record_id, image, label, class_names, pick(row, f"line {line}"), mask,
                              group=(row[group_column] or None) if group_column else None))
    if missing:
        raise InputError(f"{table} names {len(missing)} file(s) that do not exist ({missing[:3]}); paths are relative "
                         f"to {base} unless absolute")
    return Dataset("csv", root, records, class_names, chosen)


def _resolve_path(base: Path, text: str) -> Path:
    path = Path(text)
    return path if path.is_absolute() else base / path

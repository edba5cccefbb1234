"""``ham10000``: HAM10000_metadata.csv and its images.

Classes ``akiec bcc bkl df mel nv vasc`` (the alphabetical order most code uses);
metadata age, sex, localization (schema ``ham10000``). ``dx_type`` (how the diagnosis
was confirmed) leaks the label and a schema that asks for it is refused. Images may
sit in HAM10000_images_part_1/2, in one folder, or twice (Kaggle's copy ships both
upper- and lower-case folders): the first path in sorted order wins.
"""
from __future__ import annotations

import re
from pathlib import Path

from edgederm.data.files import ImageIndex
from edgederm.data.layouts.common import (
    MetadataReader, diagnosis_labels, find_markers, indexed_images, one_file, require_columns,
)
from edgederm.data.layouts.registry import register_layout
from edgederm.data.records import Dataset, Record, SchemaLike, resolve_schema
from edgederm.data.tables import read_table

HAM10000_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
# Columns decided by (or with) the diagnosis: feeding them to a model leaks the label.
_LEAKS = {"dx_type": "how the diagnosis was confirmed (histopathology for most malignant lesions)"}

DESCRIPTION = (
    "HAM10000_metadata.csv (lesion_id, image_id, dx, dx_type, age, sex, localization) + <image_id>.jpg "
    "in HAM10000_images_part_1/2 or one folder"
)


def _is_marker(name: str) -> bool:
    return re.fullmatch(r"ham10000_metadata(\.csv|\.tab|\.txt)?", name.lower()) is not None


def _detect(root: Path) -> str | None:
    return next((f"{p.relative_to(root)}" for p in find_markers(root, _is_marker)), None)


def _detect_file(path: Path) -> str | None:
    return path.name if _is_marker(path.name) else None


@register_layout("ham10000", DESCRIPTION, _detect, detect_file=_detect_file, aliases=("ham",))
def read_ham10000(root: Path, schema: SchemaLike) -> Dataset:
    table = root if root.is_file() else one_file(find_markers(root, _is_marker), root, "HAM10000_metadata.csv", "ham10000")
    search = table.parent if root.is_file() else root
    header, rows = read_table(table)
    require_columns(table, header, ["image_id", "dx"], "ham10000")
    chosen = resolve_schema(schema, "ham10000")
    available = [c for c in header if c not in ("lesion_id", "image_id", "dx")]
    pick = MetadataReader(table, available, chosen, _LEAKS)
    index = ImageIndex(search)
    labels = diagnosis_labels(table, rows, "dx", "image_id", HAM10000_CLASSES, str.lower)
    images = indexed_images(table, rows, "image_id", index, "ham10000")
    records = [Record(row["image_id"], image, label, HAM10000_CLASSES, pick(row, f"line {line}"),
                      group=row.get("lesion_id") or None)
               for line, (row, label, image) in enumerate(zip(rows, labels, images), start=2)]
    notes = [f"{index.duplicates} duplicate image files ignored (first in path order used)"] if index.duplicates else []
    return Dataset("ham10000", root, records, HAM10000_CLASSES, chosen, notes)

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
from edgederm.data.layouts.common import MetadataReader, find_markers, missing_images_error, one_file, require_columns
from edgederm.data.layouts.registry import register_layout
from edgederm.data.records import Dataset, Record, SchemaLike, resolve_schema
from edgederm.data.tables import read_table
from edgederm.runtime.errors import InputError

HAM10000_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
# Columns decided by (or with) the diagnosis: feeding them to a model leaks the label.
_LEAKS = {"dx_type": "how the diagnosis was confirmed (histopathology for most malignant lesions)"}


def _is_marker(name: str) -> bool:
    return re.fullmatch(r"ham10000_metadata(\.csv|\.tab|\.txt)?", name.lower()) is not None


def _detect(root: Path) -> str | None:
    found = find_markers(root, _is_marker)
    return f"{found[0].relative_to(root)}" if found else None


def _detect_file(path: Path) -> str | None:
    return path.name if _is_marker(path.name) else None


@register_layout(
    "ham10000",
    "HAM10000_metadata.csv (lesion_id, image_id, dx, dx_type, age, sex, localization) + <image_id>.jpg "
    "in HAM10000_images_part_1/2 or one folder",
    _detect, detect_file=_detect_file, aliases=("ham",))
def read_ham10000(root: Path, schema: SchemaLike) -> Dataset:
    table = root if root.is_file() else one_file(find_markers(root, _is_marker), root, "HAM10000_metadata.csv", "ham10000")
    search = table.parent if root.is_file() else root
    header, rows = read_table(table)
    require_columns(table, header, ["image_id", "dx"], "ham10000")
    chosen = resolve_schema(schema, "ham10000")
    available = [c for c in header if c not in ("lesion_id", "image_id", "dx")]
    pick = MetadataReader(table, available, chosen, _LEAKS)
    index = ImageIndex(search)
    records, missing = [], []
    for line, row in enumerate(rows, start=2):
        dx = row["dx"].lower()
        if dx not in HAM10000_CLASSES:
            raise InputError(f"{table} line {line} (image {row['image_id']!r}): dx {row['dx']!r} is not one of "
                             f"{list(HAM10000_CLASSES)}")
        image = index.find(row["image_id"])
        if image is None:
            missing.append(row["image_id"])
            continue
        records.append(Record(row["image_id"], image, HAM10000_CLASSES.index(dx), HAM10000_CLASSES,
                              pick(row, f"line {line}"), group=row.get("lesion_id") or None))
    if missing:
        raise missing_images_error(missing, table, search, "ham10000")
    notes = [f"{index.duplicates} duplicate image files ignored (first in path order used)"] if index.duplicates else []
    return Dataset("ham10000", root, records, HAM10000_CLASSES, chosen, notes)

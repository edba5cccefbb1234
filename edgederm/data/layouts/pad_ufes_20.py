"""``pad_ufes_20``: PAD-UFES-20's metadata.csv and images.

Classes ``ACK BCC MEL NEV SCC SEK``; the 21 clinical fields through schema
``pad_ufes_20``. MetaBlock (Pacheco & Krohling 2021) one-hot encodes them into 81
values (78 one-hot slots with an empty cell as all zeros, and the 3 numbers unscaled);
this SDK's schema encoding gives each categorical field its own *missing* slot and
each number a value in [0, 1] plus a missing flag: 102 values. A model trained here
therefore does not take MetaBlock's vectors, by design: a blank answer (a third of the
patients have none) is information, not zeros. ``biopsed`` leaks the label (every
BCC, SCC and MEL was biopsied) and is refused. The group is ``patient_id`` (several
lesions per patient).
"""
from __future__ import annotations

from pathlib import Path

from edgederm.data.files import ImageIndex
from edgederm.data.layouts.common import (
    MetadataReader, diagnosis_labels, find_markers, indexed_images, one_file, require_columns,
)
from edgederm.data.layouts.registry import register_layout
from edgederm.data.records import Dataset, Record, SchemaLike, resolve_schema
from edgederm.data.tables import csv_header, read_table

PAD_UFES_20_CLASSES = ("ACK", "BCC", "MEL", "NEV", "SCC", "SEK")
_LEAKS = {"biopsed": "whether the lesion was biopsied (every BCC, SCC and MEL in PAD-UFES-20 was)"}

DESCRIPTION = (
    "metadata.csv (patient_id, lesion_id, smoke, ..., diagnostic, ..., img_id, biopsed) + images/ "
    "(any sub-folders) holding <img_id>"
)


def _tables(root: Path) -> list[Path]:
    return [p for p in find_markers(root, lambda n: n.lower() == "metadata.csv")
            if {"img_id", "diagnostic"} <= set(csv_header(p))]


def _detect(root: Path) -> str | None:
    return next((f"{p.relative_to(root)} with img_id,diagnostic" for p in _tables(root)), None)


def _detect_file(path: Path) -> str | None:
    return f"{path.name} with img_id,diagnostic" if {"img_id", "diagnostic"} <= set(csv_header(path)) else None


@register_layout("pad_ufes_20", DESCRIPTION, _detect, detect_file=_detect_file, aliases=("pad", "padufes20", "pad_ufes20"))
def read_pad_ufes_20(root: Path, schema: SchemaLike) -> Dataset:
    table = root if root.is_file() else one_file(_tables(root), root, "PAD-UFES-20 metadata.csv", "pad_ufes_20")
    search = table.parent
    header, rows = read_table(table)
    require_columns(table, header, ["img_id", "diagnostic"], "pad_ufes_20")
    chosen = resolve_schema(schema, "pad_ufes_20")
    available = [c for c in header if c not in ("patient_id", "lesion_id", "img_id", "diagnostic")]
    pick = MetadataReader(table, available, chosen, _LEAKS)
    labels = diagnosis_labels(table, rows, "diagnostic", "img_id", PAD_UFES_20_CLASSES, str.upper)
    images = indexed_images(table, rows, "img_id", ImageIndex(search), "pad_ufes_20")
    records = [Record(Path(row["img_id"]).stem, image, label, PAD_UFES_20_CLASSES, pick(row, f"line {line}"),
                      group=row.get("patient_id") or row.get("lesion_id") or None)
               for line, (row, label, image) in enumerate(zip(rows, labels, images), start=2)]
    return Dataset("pad_ufes_20", root, records, PAD_UFES_20_CLASSES, chosen)

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
from edgederm.data.layouts.common import MetadataReader, find_markers, missing_images_error, one_file, require_columns
from edgederm.data.layouts.registry import register_layout
from edgederm.data.records import Dataset, Record, SchemaLike, resolve_schema
from edgederm.data.tables import csv_header, read_table
from edgederm.runtime.errors import InputError

PAD_UFES_20_CLASSES = ("ACK", "BCC", "MEL", "NEV", "SCC", "SEK")
_LEAKS = {"biopsed": "whether the lesion was biopsied (every BCC, SCC and MEL in PAD-UFES-20 was)"}


def _tables(root: Path) -> list[Path]:
    return [p for p in find_markers(root, lambda n: n.lower() == "metadata.csv") if {"img_id", "diagnostic"} <= set(csv_header(p))]


def _detect(root: Path) -> str | None:
    found = _tables(root)
    return f"{found[0].relative_to(root)} with img_id,diagnostic" if found else None


def _detect_file(path: Path) -> str | None:
    return f"{path.name} with img_id,diagnostic" if {"img_id", "diagnostic"} <= set(csv_header(path)) else None


@register_layout(
    "pad_ufes_20",
    "metadata.csv (patient_id, lesion_id, smoke, ..., diagnostic, ..., img_id, biopsed) + images/ "
    "(any sub-folders) holding <img_id>",
    _detect, detect_file=_detect_file, aliases=("pad", "padufes20", "pad_ufes20"))
def read_pad_ufes_20(root: Path, schema: SchemaLike) -> Dataset:
    table = root if root.is_file() else one_file(_tables(root), root, "PAD-UFES-20 metadata.csv", "pad_ufes_20")
    search = table.parent
    header, rows = read_table(table)
    require_columns(table, header, ["img_id", "diagnostic"], "pad_ufes_20")
    chosen = resolve_schema(schema, "pad_ufes_20")
    available = [c for c in header if c not in ("patient_id", "lesion_id", "img_id", "diagnostic")]
    pick = MetadataReader(table, available, chosen, _LEAKS)
    index = ImageIndex(search)
    records, missing = [], []
    for line, row in enumerate(rows, start=2):
        diagnostic = row["diagnostic"].upper()
        if diagnostic not in PAD_UFES_20_CLASSES:
            raise InputError(f"{table} line {line} (image {row['img_id']!r}): diagnostic {row['diagnostic']!r} is not "
                             f"one of {list(PAD_UFES_20_CLASSES)}")
        image = index.find(row["img_id"])
        if image is None:
            missing.append(row["img_id"])
            continue
        records.append(Record(Path(row["img_id"]).stem, image, PAD_UFES_20_CLASSES.index(diagnostic),
                              PAD_UFES_20_CLASSES, pick(row, f"line {line}"),
                              group=row.get("patient_id") or row.get("lesion_id") or None))
    if missing:
        raise missing_images_error(missing, table, search, "pad_ufes_20")
    return Dataset("pad_ufes_20", root, records, PAD_UFES_20_CLASSES, chosen)

"""``edgederm``: labels.csv + images/ (+ masks/, clinical/), as ``edgederm data`` writes it.

The table is parsed by :mod:`edgederm.data.labels`. Without a schema a metadata cell
that is a number becomes one (``edgederm.data.tables.parse_csv_value``); with a schema
the cells are validated against it.
"""
from __future__ import annotations

from pathlib import Path

from edgederm.data.files import find_by_id
from edgederm.data.labels import FORMAT, LABELS_CSV, read_labels_table
from edgederm.data.layouts.common import MetadataReader
from edgederm.data.layouts.registry import register_layout
from edgederm.data.records import Dataset, Record, SchemaLike, resolve_schema
from edgederm.data.tables import csv_header, parse_csv_value
from edgederm.runtime.errors import InputError


def _detect(root: Path) -> str | None:
    table = root / LABELS_CSV
    if table.is_file() and (root / "images").is_dir() and {"id", "label"} <= set(csv_header(table)):
        return "labels.csv with id,label + images/"
    return None


@register_layout("edgederm", FORMAT + ", as written by `edgederm data`", _detect, aliases=("synthetic",))
def read_edgederm(root: Path, schema: SchemaLike) -> Dataset:
    table = read_labels_table(root)
    base = table.path.parent
    chosen = resolve_schema(schema, None)
    pick = MetadataReader(table.path, table.metadata_columns, chosen) if chosen is not None else None
    records, missing = [], []
    for row in table.rows:
        image = find_by_id(base / "images", row.id)
        if image is None:
            missing.append(row.id)
            continue
        metadata = pick(row.values, f"line {row.line}") if pick else {k: parse_csv_value(v) for k, v in row.values.items()}
        records.append(Record(row.id, image, row.label, table.class_names, metadata,
                              find_by_id(base / "masks", row.id), find_by_id(base / "clinical", row.id)))
    if missing:
        raise InputError(f"{table.path} lists {len(missing)} id(s) with no image in {base / 'images'} "
                         f"(e.g. {missing[:3]}); expected images/<id>.jpg (or .png)")
    return Dataset("edgederm", root, records, table.class_names, chosen)

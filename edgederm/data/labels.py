"""``labels.csv``, the table of the edgederm layout: the one parser of it.

``edgederm data`` (``edgederm.data.synthetic.generate_dataset``) writes
``labels.csv`` (``id,label,class_name[,metadata...]``) beside ``images/<id>.jpg``
(``masks/<id>.png``, ``clinical/<id>.jpg`` when it has them). The edgederm layout
reader, the trainer, calibration and the synthetic data's own round trip all read it
here, so a cell means the same thing to each of them.

Decisions: ``id`` is required; a ``label`` is an integer class index, and an empty
cell (or no ``label`` column) means "no diagnosis", as in the segmentation layouts.
Class names come from the ``class_name`` column (``class_<i>`` where a class has
none). Every other column is metadata, kept as the raw text of the cell.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgederm.data.files import describe_folder
from edgederm.data.tables import read_table
from edgederm.runtime.errors import InputError

LABELS_CSV = "labels.csv"
KEY_COLUMNS = ("id", "label", "class_name")
FORMAT = "labels.csv (id,label,class_name[,metadata...]) + images/<id>.jpg [+ masks/<id>.png, clinical/<id>.jpg]"


@dataclass(frozen=True)
class LabelRow:
    line: int  # line of the CSV file (the header is line 1), for error messages
    id: str
    label: int | None
    values: dict[str, str]  # the metadata columns, raw text ("" = missing)


@dataclass(frozen=True)
class LabelsTable:
    path: Path
    header: list[str]
    rows: list[LabelRow]
    class_names: tuple[str, ...]

    @property
    def metadata_columns(self) -> list[str]:
        return [c for c in self.header if c not in KEY_COLUMNS]


def read_labels_table(path: str | os.PathLike) -> LabelsTable:
    """Parse ``labels.csv`` (or the folder holding it); InputError naming file and line on bad cells."""
    path = Path(path)
    table = path / LABELS_CSV if path.is_dir() else path
    if not table.is_file():
        raise InputError(f"{table} does not exist ({table.parent} holds {describe_folder(table.parent)}); expected "
                         f"{FORMAT}, as written by `edgederm data` (edgederm.data.synthetic.generate_dataset)")
    header, cells = read_table(table)
    if "id" not in header:
        raise InputError(f"{table} has no 'id' column (columns: {header}); expected {FORMAT}")
    names: dict[int, str] = {}
    rows: list[LabelRow] = []
    for line, row in enumerate(cells, start=2):
        if not row["id"]:
            raise InputError(f"{table} line {line}: empty id; every row names its image images/<id>.jpg")
        text = row.get("label", "")
        label = None
        if text != "":
            try:
                label = int(text)
            except ValueError:
                raise InputError(f"{table} line {line}: label {text!r} is not an integer class index") from None
            if label < 0:
                raise InputError(f"{table} line {line}: label {label} is negative; expected a class index 0, 1, ...")
            names[label] = row.get("class_name") or f"class_{label}"
        rows.append(LabelRow(line, row["id"], label, {k: v for k, v in row.items() if k not in KEY_COLUMNS}))
    if not rows:
        raise InputError(f"{table} lists no images; expected a header and one row per image ({FORMAT})")
    class_names = tuple(names.get(i, f"class_{i}") for i in range(max(names) + 1)) if names else ()
    return LabelsTable(table, header, rows, class_names)

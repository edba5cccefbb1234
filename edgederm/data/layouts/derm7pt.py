"""``derm7pt``: the seven-point checklist dataset's meta/meta.csv and images.

Dermoscopic image from ``derm``, clinical image from ``clinic`` (``Record.clinical``);
metadata elevation, sex, location (schema ``derm7pt``). Left out because they leak
the label: level_of_diagnostic_difficulty, management, the seven-point score and its
seven criteria, notes. Diagnoses map to the five classes of Kawahara et al. (IEEE
JBHI 2019) in their order ``BCC NEV MEL MISC SK`` (``DERM7PT_DIAGNOSES``): all nevus
kinds -> NEV, all melanoma stages and metastasis -> MEL, dermatofibroma, lentigo,
melanosis, miscellaneous, vascular lesion -> MISC. meta/{train,valid,test}_indexes.csv,
when present, give ``Record.split``.
"""
from __future__ import annotations

from pathlib import Path

from edgederm.data.layouts.common import MetadataReader, find_markers, missing_images_error, one_file, require_columns
from edgederm.data.layouts.registry import register_layout
from edgederm.data.records import Dataset, Record, SchemaLike, resolve_schema
from edgederm.data.tables import csv_header, read_table
from edgederm.runtime.errors import InputError

DERM7PT_CLASSES = ("BCC", "NEV", "MEL", "MISC", "SK")
# Kawahara et al.'s grouping of the 20 raw diagnoses into five classes (derm7pt's
# ArgenzianoDatasetGroupInfrequent): the rare ones share MISC.
DERM7PT_DIAGNOSES: dict[str, str] = {
    "basal cell carcinoma": "BCC",
    **{name: "NEV" for name in ("blue nevus", "clark nevus", "combined nevus", "congenital nevus", "dermal nevus",
                                "recurrent nevus", "reed or spitz nevus")},
    **{name: "MEL" for name in ("melanoma", "melanoma (in situ)", "melanoma (less than 0.76 mm)",
                                "melanoma (0.76 to 1.5 mm)", "melanoma (more than 1.5 mm)", "melanoma metastasis")},
    **{name: "MISC" for name in ("dermatofibroma", "lentigo", "melanosis", "miscellaneous", "vascular lesion")},
    "seborrheic keratosis": "SK",
}
# Columns decided by (or with) the diagnosis: feeding them to a model leaks the label.
_LEAKS = {
    "level_of_diagnostic_difficulty": "the difficulty of the diagnosis, rated with the diagnosis known",
    "management": "the treatment decided from the diagnosis",
    "seven_point_score": "the 7-point checklist score, an expert's dermoscopic assessment",
    "notes": "free-text notes written with the diagnosis known",
    **{c: "one of the 7-point checklist criteria, an expert's dermoscopic assessment" for c in (
        "pigment_network", "streaks", "pigmentation", "regression_structures", "dots_and_globules",
        "blue_whitish_veil", "vascular_structures")},
}

DESCRIPTION = (
    "meta/meta.csv (case_num, diagnosis, ..., elevation, location, sex, clinic, derm, ...) + images/<derm> "
    "[+ meta/train_indexes.csv, valid_indexes.csv, test_indexes.csv]"
)


def _tables(root: Path) -> list[Path]:
    return [p for p in find_markers(root, lambda n: n.lower() == "meta.csv")
            if p.parent.name.lower() == "meta" and {"case_num", "diagnosis", "derm"} <= set(csv_header(p))]


def _detect(root: Path) -> str | None:
    return next((f"{p.relative_to(root)} with case_num,diagnosis,derm" for p in _tables(root)), None)


@register_layout("derm7pt", DESCRIPTION, _detect, aliases=("derm7",))
def read_derm7pt(root: Path, schema: SchemaLike) -> Dataset:
    table = one_file(_tables(root), root, "Derm7pt meta/meta.csv", "derm7pt")
    base = table.parent.parent
    images_dir = base / "images"
    header, rows = read_table(table)
    require_columns(table, header, ["case_num", "diagnosis", "derm"], "derm7pt")
    chosen = resolve_schema(schema, "derm7pt")
    available = [c for c in header if c not in ("case_num", "diagnosis", "derm", "clinic") and c not in _LEAKS]
    pick = MetadataReader(table, available, chosen, _LEAKS)
    splits = _splits(table.parent, len(rows))
    records, missing = [], []
    for i, row in enumerate(rows):
        diagnosis = row["diagnosis"].lower()
        if diagnosis not in DERM7PT_DIAGNOSES:
            raise InputError(f"{table} line {i + 2} (case {row['case_num']}): diagnosis {row['diagnosis']!r} is not one "
                             f"of Derm7pt's {sorted(DERM7PT_DIAGNOSES)}")
        image = images_dir / row["derm"]
        if not image.is_file():
            missing.append(row["derm"])
            continue
        clinical = images_dir / row["clinic"] if row.get("clinic") else None
        records.append(Record(f"case_{row['case_num']}", image, DERM7PT_CLASSES.index(DERM7PT_DIAGNOSES[diagnosis]),
                              DERM7PT_CLASSES, pick(row, f"line {i + 2}"),
                              clinical=clinical if clinical is not None and clinical.is_file() else None,
                              split=splits.get(i)))
    if missing:
        raise missing_images_error(missing, table, images_dir, "derm7pt")
    notes = ["splits from meta/*_indexes.csv"] if splits else []
    return Dataset("derm7pt", root, records, DERM7PT_CLASSES, chosen, notes)


def _splits(meta_dir: Path, n_rows: int) -> dict[int, str]:
    splits: dict[int, str] = {}
    for split in ("train", "valid", "test"):
        path = meta_dir / f"{split}_indexes.csv"
        if not path.is_file():
            continue
        header, rows = read_table(path)
        column = "indexes" if "indexes" in header else header[0]
        for row in rows:
            try:
                index = int(row[column])
            except ValueError:
                raise InputError(f"{path}: {column} {row[column]!r} is not a row index of meta.csv") from None
            if not 0 <= index < n_rows:
                raise InputError(f"{path}: row index {index} is outside meta.csv's {n_rows} rows")
            splits[index] = split
    return splits

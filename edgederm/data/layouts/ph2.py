"""``ph2``: PH2's folder per case with a .bmp image and lesion mask.

The label is the clinical diagnosis in PH2_dataset.txt (0 common nevus, 1 atypical
nevus, 2 melanoma), or the X marks of PH2_dataset.xlsx when openpyxl is installed.
Without either file the records have masks and no labels (a warning says so).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from edgederm.data.files import subdirs, walk
from edgederm.data.layouts.common import MARKER_DEPTH, find_markers, one_file, refuse_schema
from edgederm.data.layouts.registry import LAYOUTS, register_layout
from edgederm.data.records import Dataset, Record, SchemaLike, resolve_schema
from edgederm.runtime.errors import InputError

log = logging.getLogger(__name__)

PH2_CLASSES = ("common_nevus", "atypical_nevus", "melanoma")
_CASE = re.compile(r"^IMD\d+$", re.IGNORECASE)
_MARKS = ("common nevus", "atypical nevus", "melanoma")

DESCRIPTION = (
    "'PH2 Dataset images'/IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp + IMDxxx_lesion/IMDxxx_lesion.bmp, "
    "labels in PH2_dataset.txt (or PH2_dataset.xlsx with openpyxl installed)"
)


def _images_dirs(root: Path) -> list[Path]:
    found = [here / d for here, dirs, _ in walk(root, MARKER_DEPTH - 1) for d in dirs if d.lower() == "ph2 dataset images"]
    if not found and any(_CASE.match(d) for d in subdirs(root)):
        found = [root]
    return found


def _detect(root: Path) -> str | None:
    return next((f"PH2 case folders in {d}" for d in _images_dirs(root)), None)


@register_layout("ph2", DESCRIPTION, _detect)
def read_ph2(root: Path, schema: SchemaLike) -> Dataset:
    images_dir = one_file(_images_dirs(root), root, "'PH2 Dataset images' folder", "ph2")
    refuse_schema(root, resolve_schema(schema, None))  # PH2 has no patient metadata
    labels, source, notes = _labels(root)
    records, missing = [], []
    for case in subdirs(images_dir):
        if not _CASE.match(case):
            continue
        image = images_dir / case / f"{case}_Dermoscopic_Image" / f"{case}.bmp"
        mask = images_dir / case / f"{case}_lesion" / f"{case}_lesion.bmp"
        if not image.is_file():
            missing.append(str(image))
            continue
        if labels is not None and case not in labels:
            raise InputError(f"{source} has no diagnosis for {case}; the file must list every case folder")
        records.append(Record(case, image, labels[case] if labels is not None else None, PH2_CLASSES if labels is not None else (),
                              {}, mask if mask.is_file() else None))
    if missing:
        raise InputError(f"{len(missing)} PH2 case(s) have no dermoscopic image (e.g. {missing[:3]}); the ph2 layout "
                         f"expects {LAYOUTS['ph2']}")
    if labels is not None:
        unused = sorted(set(labels) - {r.id for r in records})
        if unused:
            log.warning("%s lists %d cases with no image folder (e.g. %s)", source, len(unused), unused[:3])
            notes.append(f"{len(unused)} cases of {source.name} have no image folder")
    return Dataset("ph2", root, records, PH2_CLASSES if labels is not None else (), None, notes)


def _labels(root: Path) -> tuple[dict[str, int] | None, Path, list[str]]:
    txt = find_markers(root, lambda n: n.lower() == "ph2_dataset.txt")
    if txt:
        return _labels_txt(txt[0]), txt[0], [f"labels from {txt[0].name}"]
    xlsx = find_markers(root, lambda n: n.lower() == "ph2_dataset.xlsx")
    if xlsx:
        return _labels_xlsx(xlsx[0]), xlsx[0], [f"labels from {xlsx[0].name}"]
    log.warning("PH2 at %s: no PH2_dataset.txt or .xlsx; records carry masks and no diagnosis", root)
    return None, root, ["no PH2_dataset.txt/.xlsx: masks only, no labels"]


def _labels_txt(path: Path) -> dict[str, int]:
    """PH2_dataset.txt: a '||'-separated table; 'Clinical Diagnosis' is 0, 1 or 2."""
    column = 3  # where the distributed file has it; the header, when found, says so too
    labels: dict[str, int] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            cells = [c.strip() for c in line.split("||")]
            if len(cells) < 3:
                continue
            lowered = [c.lower() for c in cells]
            if "clinical diagnosis" in lowered:
                column = lowered.index("clinical diagnosis")
                continue
            if not _CASE.match(cells[1]):
                continue
            value = cells[column] if column < len(cells) else ""
            if value not in ("0", "1", "2"):
                raise InputError(f"{path} line {number} ({cells[1]}): clinical diagnosis {value!r}; expected 0 "
                                 "(common nevus), 1 (atypical nevus) or 2 (melanoma)")
            labels[cells[1]] = int(value)
    if not labels:
        raise InputError(f"{path} lists no cases; expected rows like '|| IMD003 || ... || 0 || ...'")
    return labels


def _labels_xlsx(path: Path) -> dict[str, int]:
    """PH2_dataset.xlsx: an 'X' under Common Nevus, Atypical Nevus or Melanoma."""
    from edgederm.runtime.optional import optional_import

    openpyxl = optional_import("openpyxl", "reading PH2_dataset.xlsx (or place PH2_dataset.txt beside it)")
    sheet = openpyxl.load_workbook(path, read_only=True, data_only=True).active
    columns: dict[str, int] | None = None
    labels: dict[str, int] = {}
    for row in sheet.iter_rows(values_only=True):
        cells = ["" if c is None else str(c).strip() for c in row]
        lowered = [c.lower() for c in cells]
        if columns is None:
            if all(k in lowered for k in _MARKS):
                columns = {k: lowered.index(k) for k in _MARKS}
                name_column = next((i for i, c in enumerate(lowered) if "name" in c), 0)
            continue
        name = cells[name_column] if name_column < len(cells) else ""
        if not _CASE.match(name):
            continue
        marked = [k for k, j in columns.items() if j < len(cells) and cells[j].upper() == "X"]
        if len(marked) != 1:
            raise InputError(f"{path}: {name} has {len(marked)} diagnoses marked; expected one X")
        labels[name] = _MARKS.index(marked[0])
    if columns is None or not labels:
        raise InputError(f"{path}: no header with Common Nevus, Atypical Nevus, Melanoma, or no IMD rows under it")
    return labels

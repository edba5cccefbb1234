"""Readers for the public dermatology datasets' own layouts and for a clinic's own data.

Every reader returns the same thing, a :class:`Dataset` of :class:`Record` s (id,
image path, label index, class names, metadata as raw values, optional mask path), so
training, calibration and evaluation never care where the images came from.
``read_dataset(root)`` detects the layout; ``load_labelled_images`` turns records into
the trainer's :class:`edgederm.train.LabelledImages` through the runtime's
preprocessing, so training sees the pixels the device will see.

Layouts (``LAYOUTS`` has the one-line description each error message quotes):

* ``isic``: ISIC 2018 Task 3 / ISIC 2019 classification. A ground-truth CSV with an
  ``image`` column and one-hot class columns (MEL, NV, BCC, AKIEC or AK, BKL, DF,
  VASC, SCC, UNK), classes in the CSV's column order. ISIC 2019's ``UNK`` column has no
  positive in the training CSV (it exists for the test set's out-of-distribution
  images) and is dropped when empty, so the model does not get a class it never sees;
  the dataset's ``notes`` say so. ISIC 2019's metadata CSV is read when present
  (schema ``isic2019``); its ``lesion_id`` becomes the record's ``group``.
* ``ham10000``: HAM10000_metadata.csv, classes ``akiec bcc bkl df mel nv vasc`` (the
  alphabetical order most code uses); metadata age, sex, localization (schema
  ``ham10000``). ``dx_type`` (how the diagnosis was confirmed) leaks the label and a
  schema that asks for it is refused. Images may sit in HAM10000_images_part_1/2, in
  one folder, or twice (Kaggle's copy ships both upper- and lower-case folders): the
  first path in sorted order wins.
* ``pad_ufes_20``: metadata.csv, classes ``ACK BCC MEL NEV SCC SEK``; the 21 clinical
  fields through schema ``pad_ufes_20``. MetaBlock (Pacheco & Krohling 2021) one-hot
  encodes them into 81 values (78 one-hot slots with an empty cell as all zeros, and
  the 3 numbers unscaled); this SDK's schema encoding gives each categorical field its
  own *missing* slot and each number a value in [0, 1] plus a missing flag: 102 values.
  A model trained here therefore does not take MetaBlock's vectors, by design: a blank
  answer (a third of the patients have none) is information, not zeros. ``biopsed``
  leaks the label (every BCC, SCC and MEL was biopsied) and is refused. The group is
  ``patient_id`` (several lesions per patient).
* ``derm7pt``: meta/meta.csv; dermoscopic image from ``derm``, clinical image from
  ``clinic`` (``Record.clinical``); metadata elevation, sex, location (schema
  ``derm7pt``). Left out because they leak the label: level_of_diagnostic_difficulty,
  management, the seven-point score and its seven criteria, notes. Diagnoses map to
  the five classes of Kawahara et al. (IEEE JBHI 2019) in their order
  ``BCC NEV MEL MISC SK`` (``DERM7PT_DIAGNOSES`` below): all nevus kinds -> NEV, all
  melanoma stages and metastasis -> MEL, dermatofibroma, lentigo, melanosis,
  miscellaneous, vascular lesion -> MISC. meta/{train,valid,test}_indexes.csv, when
  present, give ``Record.split``.
* ``isic_segmentation``: ISIC 2016-2018 lesion segmentation, ``<id>.jpg`` + mask
  ``<id>_segmentation.png`` (2016: ``_Segmentation.png``) anywhere below the root;
  2017's ``_superpixels.png`` files are skipped. No diagnosis: labels are None.
  An image without its mask, or a mask without its image, is an error, not a skip.
* ``ph2``: PH2's folder per case with a .bmp image and lesion mask; the label is the
  clinical diagnosis in PH2_dataset.txt (0 common nevus, 1 atypical nevus,
  2 melanoma), or the X marks of PH2_dataset.xlsx when openpyxl is installed. Without
  either file the records have masks and no labels (a warning says so).
* ``folder``: ``root/<class>/<images>``, classes sorted by name (as torchvision's
  ImageFolder).
* ``csv``: a clinic's own CSV: an image path column, a label column (class names, or
  integer indices), optional mask column, other columns are metadata. With a schema
  (a JSON file, see ``edgederm.runtime.metadata``) only its fields are metadata and
  each must be a column.
* ``edgederm``: ``labels.csv`` + ``images/`` (+ ``masks/``) written by ``edgederm data``;
  read exactly as ``edgederm.train.read_image_folder`` reads it.

Decisions taken here:

* Metadata values stay raw (strings, numbers parsed only for numeric schema fields)
  and are validated against the schema while reading: an unknown category fails at
  read time with the file, line and image named, not in the middle of training.
* Identifiers (lesion, patient) are never metadata; they are ``Record.group`` so a
  split can keep one lesion's images together.
* Auto-detection looks two folder levels down for each layout's marker file and
  refuses to guess between two matching public layouts; the generic layouts (csv,
  folder) are only considered when no public layout matches.
"""
from __future__ import annotations

import csv
import logging
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence, Union

import numpy as np

from edgederm.data.csvvalues import parse_csv_value
from edgederm.runtime.errors import InputError
from edgederm.runtime.metadata import MetadataSchema, load_schema

if TYPE_CHECKING:  # the trainer module is imported lazily (it is torch-free, but large)
    from edgederm.runtime.preprocess import PreprocessConfig
    from edgederm.train import LabelledImages

__all__ = [
    "LAYOUTS",
    "Record",
    "Dataset",
    "read_dataset",
    "detect_layout",
    "load_labelled_images",
    "HAM10000_CLASSES",
    "PAD_UFES_20_CLASSES",
    "DERM7PT_CLASSES",
    "DERM7PT_DIAGNOSES",
    "PH2_CLASSES",
]

log = logging.getLogger(__name__)

SchemaLike = Union[str, os.PathLike, Mapping[str, Any], MetadataSchema, None]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

LAYOUTS: dict[str, str] = {
    "edgederm": "labels.csv (id,label,class_name[,metadata...]) + images/<id>.jpg [+ masks/<id>.png], as written by `edgederm data`",
    "isic": "ISIC 2018/2019 classification: a ground-truth CSV with an 'image' column and one-hot class columns "
            "(MEL, NV, BCC, AKIEC or AK, BKL, DF, VASC[, SCC, UNK]) + <image>.jpg below the root "
            "[+ ISIC 2019 metadata CSV: image, age_approx, anatom_site_general, lesion_id, sex]",
    "ham10000": "HAM10000_metadata.csv (lesion_id, image_id, dx, dx_type, age, sex, localization) + <image_id>.jpg "
                "in HAM10000_images_part_1/2 or one folder",
    "pad_ufes_20": "metadata.csv (patient_id, lesion_id, smoke, ..., diagnostic, ..., img_id, biopsed) + images/ "
                   "(any sub-folders) holding <img_id>",
    "derm7pt": "meta/meta.csv (case_num, diagnosis, ..., elevation, location, sex, clinic, derm, ...) + images/<derm> "
               "[+ meta/train_indexes.csv, valid_indexes.csv, test_indexes.csv]",
    "isic_segmentation": "ISIC 2016-2018 segmentation: <id>.jpg + <id>_segmentation.png (2016: _Segmentation.png), e.g. "
                         "ISIC2018_Task1-2_Training_Input/ + ISIC2018_Task1_Training_GroundTruth/",
    "ph2": "'PH2 Dataset images'/IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp + IMDxxx_lesion/IMDxxx_lesion.bmp, "
           "labels in PH2_dataset.txt (or PH2_dataset.xlsx with openpyxl installed)",
    "folder": "one folder per class: <root>/<class name>/<images>",
    "csv": "a CSV file (or a folder holding one) with an image path column (image, image_path, path, file), "
           "a label column (label, diagnosis, dx, class), an optional mask column (mask, mask_path) and "
           "metadata columns (validated by schema=...); paths relative to the CSV",
}

_ALIASES = {
    "isic2018": "isic", "isic2019": "isic", "isic_2018": "isic", "isic_2019": "isic",
    "ham": "ham10000", "pad": "pad_ufes_20", "padufes20": "pad_ufes_20", "pad_ufes20": "pad_ufes_20",
    "derm7": "derm7pt", "segmentation": "isic_segmentation", "isic2016": "isic_segmentation",
    "isic2017": "isic_segmentation", "synthetic": "edgederm", "imagefolder": "folder", "image_folder": "folder",
}

ISIC_CLASS_COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
HAM10000_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
PAD_UFES_20_CLASSES = ("ACK", "BCC", "MEL", "NEV", "SCC", "SEK")
PH2_CLASSES = ("common_nevus", "atypical_nevus", "melanoma")
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

# Columns that are decided by (or with) the diagnosis: feeding them to a model leaks the label.
_HAM_LEAKS = {"dx_type": "how the diagnosis was confirmed (histopathology for most malignant lesions)"}
_PAD_LEAKS = {"biopsed": "whether the lesion was biopsied (every BCC, SCC and MEL in PAD-UFES-20 was)"}
_DERM7PT_LEAKS = {
    "level_of_diagnostic_difficulty": "the difficulty of the diagnosis, rated with the diagnosis known",
    "management": "the treatment decided from the diagnosis",
    "seven_point_score": "the 7-point checklist score, an expert's dermoscopic assessment",
    "notes": "free-text notes written with the diagnosis known",
    **{c: "one of the 7-point checklist criteria, an expert's dermoscopic assessment" for c in (
        "pigment_network", "streaks", "pigmentation", "regression_structures", "dots_and_globules",
        "blue_whitish_veil", "vascular_structures")},
}

_SKIP_DIRS = {"__MACOSX", ".git", ".ipynb_checkpoints"}
# How many folder levels below the given root a layout's marker file may sit: the
# archives extract into a folder or two of their own (release_v0/meta/meta.csv).
_MARKER_DEPTH = 3
_MASK_NAME = re.compile(r"^(?P<id>.+)_segmentation$", re.IGNORECASE)
_SUPERPIXELS_NAME = re.compile(r"_superpixels$", re.IGNORECASE)
_PH2_CASE = re.compile(r"^IMD\d+$", re.IGNORECASE)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Record:
    """One image of a dataset."""

    id: str
    image: Path
    label: int | None  # index into class_names; None when the layout has no diagnosis (segmentation)
    class_names: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict)  # raw values; None = missing
    mask: Path | None = None  # lesion mask (0/255), same size as the image
    clinical: Path | None = None  # clinical (close-up) photograph of the same lesion, when the dataset has one
    group: str | None = None  # lesion or patient id: keep one group in one split
    split: str | None = None  # the dataset's own split ("train" / "valid" / "test"), when it ships one

    @property
    def class_name(self) -> str | None:
        return None if self.label is None else self.class_names[self.label]


@dataclass
class Dataset(Sequence[Record]):
    """Records of one layout, with the class names and metadata schema they share."""

    layout: str
    root: Path
    records: list[Record]
    class_names: tuple[str, ...]
    schema: MetadataSchema | None = None
    notes: list[str] = field(default_factory=list)  # decisions taken while reading (dropped columns, ...)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: Any) -> Any:  # an int gives a Record, a slice a Dataset
        if isinstance(index, slice):
            return replace(self, records=self.records[index])
        return self.records[index]

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    @property
    def labels(self) -> np.ndarray:
        """Label indices (int64); -1 for records without a diagnosis."""
        return np.array([-1 if r.label is None else r.label for r in self.records], np.int64)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels[self.labels >= 0], minlength=len(self.class_names))
        return {name: int(n) for name, n in zip(self.class_names, counts)}

    def metadata_matrix(self, schema: SchemaLike = None) -> np.ndarray:
        """Metadata of every record encoded by ``schema`` (default: the dataset's)."""
        chosen = _resolve_schema(schema, None) if schema is not None else self.schema
        if chosen is None:
            raise InputError(f"dataset {self.root} ({self.layout}) was read without a metadata schema; "
                             "pass schema=<name or JSON file> to read_dataset or to metadata_matrix")
        return chosen.encode_many([chosen.select(r.metadata) for r in self.records])

    def summary(self) -> str:
        """One line for a person: layout, size, classes, masks, metadata."""
        counts = ", ".join(f"{name} {n}" for name, n in self.class_counts().items()) if self.class_names else "no labels"
        masks = sum(r.mask is not None for r in self.records)
        meta = f"metadata {self.schema.name} (dim {self.schema.dim})" if self.schema else "no metadata schema"
        return (f"{self.layout}: {len(self)} images; classes: {counts}; "
                f"{masks} masks; {meta}" + (f"; notes: {'; '.join(self.notes)}" if self.notes else ""))


# --------------------------------------------------------------------------- public entry points


def read_dataset(root: str | os.PathLike, layout: str = "auto", schema: SchemaLike = None,
                 classes: Sequence[str] | None = None) -> Dataset:
    """Read a dataset folder (or CSV file) in one of ``LAYOUTS``.

    ``layout="auto"`` detects it (see :func:`detect_layout`). ``schema``: the metadata
    schema (bundled name, JSON file, dict or MetadataSchema); None takes the layout's
    own (``ham10000``, ``pad_ufes_20``, ``derm7pt``, ``isic2019``) or, for layouts
    without one, keeps every metadata column raw and unvalidated. ``classes`` fixes the
    class order (say, to match a model trained before); a class of the data missing
    from it is an error.
    """
    path = Path(root)
    if not path.exists():
        raise InputError(f"dataset path {str(path)!r} does not exist; pass the folder you extracted the dataset into "
                         f"(working directory: {os.getcwd()!r})")
    name = _layout_name(layout)
    if name == "auto":
        name, evidence = detect_layout(path)
        log.info("dataset %s: layout %s (%s)", path, name, evidence)
    dataset = _READERS[name](path, schema)
    if classes is not None:
        dataset = _reorder_classes(dataset, classes)
    if not dataset.records:
        raise InputError(f"{path} ({name} layout) holds no images; expected {LAYOUTS[name]}")
    _check_unique_ids(dataset)
    return dataset


def detect_layout(root: str | os.PathLike) -> tuple[str, str]:
    """(layout name, what gave it away) for ``root``; InputError when none or several match."""
    root = Path(root)
    if root.is_file():
        return _detect_file(root)
    if not root.is_dir():
        raise InputError(f"dataset path {str(root)!r} does not exist")
    specific: list[tuple[str, str]] = []
    for name, detector in _SPECIFIC_DETECTORS:
        evidence = detector(root)
        if evidence:
            specific.append((name, evidence))
    if name_evidence := _single(specific, root):
        return name_evidence
    for name, detector in _GENERIC_DETECTORS:
        evidence = detector(root)
        if evidence:
            return name, evidence
    raise InputError(
        f"cannot tell the layout of {root}: it holds {_describe_folder(root)}. Expected one of:\n"
        + "\n".join(f"  {name}: {text}" for name, text in LAYOUTS.items())
        + "\nFix: point at the folder the dataset was extracted into, arrange your files as one of these, "
          "or pass layout=<name> (CLI: --layout) to get that layout's specific complaint."
    )


def load_labelled_images(records: Dataset | Sequence[Record], config: PreprocessConfig | Mapping[str, Any],
                         masks: bool = False,
                         progress: Callable[[int, int], None] | bool | None = None) -> LabelledImages:
    """Records -> :class:`edgederm.train.LabelledImages`, pixels through ``runtime.preprocess``.

    ``masks=True`` also reads each record's mask: binarised (any value above half its
    range is lesion; 0/1 masks are accepted) and brought to the input size by the same
    resize policy as the image (stretch, letterbox, centre crop), so pixels and mask
    stay aligned. Records without a label get -1 (segmentation data); a
    classification read (``masks=False``) refuses them. ``progress=True`` prints a
    counter to stderr.
    """
    import cv2

    from edgederm.runtime import preprocess as pp
    from edgederm.runtime.imageio import read_image
    from edgederm.train import LabelledImages

    config = pp.PreprocessConfig.from_dict(config) if isinstance(config, Mapping) else config
    items = list(records)
    if not items:
        raise InputError("load_labelled_images received no records; read a dataset with read_dataset first")
    class_names = list(records.class_names if isinstance(records, Dataset) else items[0].class_names)
    unlabelled = [r.id for r in items if r.label is None]
    if unlabelled and not masks:
        raise InputError(f"{len(unlabelled)} of {len(items)} records have no diagnosis label (e.g. {unlabelled[:3]}); "
                         "this layout only supports segmentation: load with masks=True and train a segmenter")
    if masks:
        no_mask = [r.id for r in items if r.mask is None]
        if no_mask:
            raise InputError(f"masks=True but {len(no_mask)} records have no mask (e.g. {no_mask[:3]}); "
                             "use a layout with masks (isic_segmentation, ph2, csv with a mask column, edgederm masks/)")
    report = _stderr_progress("reading images") if progress is True else (progress or None)
    height, width = config.input_size
    nbytes = len(items) * 3 * height * width * 4
    if nbytes > 2 << 30:
        log.warning("load_labelled_images: %d images at %dx%d take %.1f GiB of float32 in memory", len(items), height,
                    width, nbytes / 2**30)
    x = np.empty((len(items), 3, height, width), np.float32)
    mask_array = np.empty((len(items), height, width), np.int64) if masks else None
    for i, record in enumerate(items):
        image = read_image(record.image)
        x[i] = pp.preprocess(image, config)
        if mask_array is not None:
            assert record.mask is not None
            mask_array[i] = _read_mask(cv2, record, image.shape[:2], config, pp)
        if report:
            report(i + 1, len(items))
    y = np.array([-1 if r.label is None else r.label for r in items], np.int64)
    return LabelledImages(x, y, [r.id for r in items], class_names, [dict(r.metadata) for r in items], mask_array,
                          groups=[r.group for r in items])


def _read_mask(cv2: Any, record: Record, image_hw: tuple[int, int], config: Any, pp: Any) -> np.ndarray:
    mask = cv2.imread(str(record.mask), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise InputError(f"mask {str(record.mask)!r} of image {record.id!r} is missing or not an image")
    if mask.shape != tuple(image_hw):
        raise InputError(f"mask {str(record.mask)!r} is {mask.shape[0]}x{mask.shape[1]} but its image "
                         f"{str(record.image)!r} is {image_hw[0]}x{image_hw[1]}; a mask must have its image's size")
    # 0/1 masks (some clinic exports) and 0/255 masks (ISIC, PH2) alike.
    binary = np.where(mask > (0 if mask.max() <= 1 else 127), 255, 0).astype(np.uint8)
    # The image's own resize policy on a 3-channel copy keeps pixels and mask aligned;
    # area interpolation then a 127 threshold is a majority vote per output pixel.
    resized = pp.resize_image(np.repeat(binary[:, :, None], 3, axis=2), config.input_size, config.resize)
    return (resized[:, :, 0] > 127).astype(np.int64)


def _stderr_progress(what: str) -> Callable[[int, int], None]:
    tty = sys.stderr.isatty()

    def report(done: int, total: int) -> None:
        # A terminal gets a live counter; a log file gets a line every 10%.
        if tty:
            sys.stderr.write(f"\r{what} {done}/{total}" + ("\n" if done == total else ""))
            sys.stderr.flush()
        elif done == total or done % max(1, total // 10) == 0:
            print(f"{what} {done}/{total}", file=sys.stderr)

    return report


# --------------------------------------------------------------------------- helpers


def _layout_name(layout: str) -> str:
    key = str(layout).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key != "auto" and key not in LAYOUTS:
        raise InputError(f"layout {layout!r} is not known; allowed: auto, {', '.join(LAYOUTS)} "
                         f"(aliases: {', '.join(sorted(_ALIASES))})")
    return key


def _walk(root: Path, max_depth: int) -> Iterator[tuple[Path, list[str], list[str]]]:
    """os.walk, sorted, pruned below ``max_depth`` folder levels (-1: no limit)."""
    base = len(root.parts)
    seen: set[str] = set()
    # Symbolic links are followed (datasets are often linked in from a shared disk);
    # each real folder is visited once, so a link cycle cannot loop.
    for current, dirs, files in os.walk(root, followlinks=True):
        here = Path(current)
        real = os.path.realpath(current)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS)
        # The caller sees every sub-folder of the deepest level; the walk stops there.
        yield here, list(dirs), sorted(f for f in files if not f.startswith("."))
        if 0 <= max_depth <= len(here.parts) - base:
            dirs[:] = []


def _find_files(root: Path, predicate: Callable[[str], bool], max_depth: int = _MARKER_DEPTH) -> list[Path]:
    return [here / f for here, _, files in _walk(root, max_depth) for f in files if predicate(f)]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


class _ImageIndex:
    """Image files below a folder by file stem (first in sorted path order wins)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.by_stem: dict[str, Path] = {}
        self.duplicates = 0
        for here, _, files in _walk(root, -1):
            for name in files:
                if not _is_image(name):
                    continue
                stem = Path(name).stem
                if stem in self.by_stem:
                    self.duplicates += 1
                else:
                    self.by_stem[stem] = here / name

    def find(self, image_id: str) -> Path | None:
        return self.by_stem.get(Path(image_id).stem if _is_image(image_id) else image_id)


def _sniff_delimiter(first_line: str) -> str:
    counts = {d: first_line.count(d) for d in (",", "\t", ";")}
    return max(counts, key=lambda d: counts[d]) if any(counts.values()) else ","


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            first = f.readline()
    except OSError:
        return []
    return [c.strip() for c in next(csv.reader([first], delimiter=_sniff_delimiter(first)), [])]


def _read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of a CSV/TSV file; BOM and cell whitespace stripped."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            first = f.readline()
            f.seek(0)
            reader = csv.DictReader(f, delimiter=_sniff_delimiter(first))
            header = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not a UTF-8 text table ({exc}); save it as UTF-8 CSV") from None
    if not header:
        raise InputError(f"{path} is empty; expected a header row and one row per image")
    return header, rows


def _require_columns(path: Path, header: Sequence[str], needed: Sequence[str], layout: str) -> None:
    missing = [c for c in needed if c not in header]
    if missing:
        raise InputError(f"{path} has no column(s) {missing} (columns: {list(header)}); the {layout} layout expects "
                         f"{LAYOUTS[layout]}")


def _resolve_schema(schema: SchemaLike, default: str | None) -> MetadataSchema | None:
    if schema is None:
        return load_schema(default) if default else None
    return load_schema(schema if not isinstance(schema, os.PathLike) else os.fspath(schema))


class _MetadataReader:
    """Picks and validates the metadata of each row of one table."""

    def __init__(self, source: Path, available: Sequence[str], schema: MetadataSchema | None,
                 leaks: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.schema = schema
        leaks = leaks or {}
        if schema is None:
            # No schema: every non-leaking column, raw strings, validated by nobody.
            self.fields = [c for c in available if c not in leaks]
            self.numeric: set[str] = set()
            return
        names = [f["name"] for f in schema.fields]
        leaking = [n for n in names if n in leaks]
        if leaking:
            raise InputError(f"metadata schema {schema.name!r} asks for {leaking[0]!r}, which is {leaks[leaking[0]]}: "
                             f"it leaks the diagnosis into the model's input; remove it from the schema")
        absent = [n for n in names if n not in available]
        if absent:
            raise InputError(f"metadata schema {schema.name!r} needs field(s) {absent} but {source} provides "
                             f"{list(available) or 'no metadata'}; use a schema with those fields only")
        self.fields = names
        self.numeric = {f["name"] for f in schema.fields if f["type"] == "numeric"}

    def __call__(self, row: Mapping[str, str | None], where: str) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in self.fields:
            text = row.get(name)
            text = None if text is None or str(text).strip() == "" else str(text).strip()
            if text is not None and name in self.numeric:
                try:
                    values[name] = float(text)
                except ValueError:
                    raise InputError(f"{self.source} {where}: metadata field {name!r} must be a number; "
                                     f"got {text!r}") from None
            else:
                values[name] = text
        if self.schema is not None:
            try:
                self.schema.encode(values)
            except InputError as exc:
                raise InputError(f"{self.source} {where}: {exc}") from None
        return values


def _missing_images_error(missing: list[str], source: Path, search_root: Path, layout: str) -> InputError:
    return InputError(f"{source} lists {len(missing)} image(s) that are not below {search_root} (e.g. {missing[:3]}); "
                      f"the {layout} layout expects {LAYOUTS[layout]}. Fix: extract the image archive(s) next to "
                      "the CSV, or point at the folder that holds both")


def _check_unique_ids(dataset: Dataset) -> None:
    seen: set[str] = set()
    for record in dataset.records:
        if record.id in seen:
            raise InputError(f"{dataset.root}: image id {record.id!r} occurs twice; every image needs its own row")
        seen.add(record.id)


def _reorder_classes(dataset: Dataset, classes: Sequence[str]) -> Dataset:
    wanted = [str(c) for c in classes]
    unknown = sorted({r.class_name for r in dataset.records if r.class_name is not None} - set(wanted))
    if unknown:
        raise InputError(f"classes={wanted} lacks {unknown}, which the {dataset.layout} data at {dataset.root} has; "
                         "add them to classes")
    names = tuple(wanted)
    records = [replace(r, label=None if r.label is None else names.index(r.class_names[r.label]), class_names=names)
               for r in dataset.records]
    return replace(dataset, records=records, class_names=names)


def _describe_folder(root: Path) -> str:
    try:
        entries = sorted(os.listdir(root))
    except OSError as exc:
        return f"nothing readable ({exc})"
    if not entries:
        return "nothing (it is empty)"
    shown = [e + ("/" if (root / e).is_dir() else "") for e in entries[:12]]
    more = f" and {len(entries) - 12} more" if len(entries) > 12 else ""
    return f"{len(entries)} entries: {', '.join(shown)}{more}"


def _single(found: list[tuple[str, str]], root: Path) -> tuple[str, str] | None:
    if len(found) > 1:
        raise InputError(
            f"{root} matches several dataset layouts: "
            + "; ".join(f"{name} ({evidence})" for name, evidence in found)
            + f". Fix: pass layout=<one of {[n for n, _ in found]}> (CLI: --layout), or point at a sub-folder "
              "holding one dataset"
        )
    return found[0] if found else None


# --------------------------------------------------------------------------- detection


def _isic_gt_header(header: Sequence[str]) -> bool:
    return "image" in header and sum(c in ISIC_CLASS_COLUMNS for c in header) >= 2


def _isic_gt_files(root: Path) -> list[Path]:
    return [p for p in _find_files(root, lambda n: n.lower().endswith(".csv"))
            if "metadata" not in p.name.lower() and _isic_gt_header(_csv_header(p))]


def _isic_metadata_files(root: Path) -> list[Path]:
    return [p for p in _find_files(root, lambda n: n.lower().endswith(".csv"))
            if {"image", "age_approx"} <= set(_csv_header(p)) or {"image", "anatom_site_general"} <= set(_csv_header(p))]


def _ham_files(root: Path) -> list[Path]:
    return _find_files(root, lambda n: re.fullmatch(r"ham10000_metadata(\.csv|\.tab|\.txt)?", n.lower()) is not None)


def _pad_files(root: Path) -> list[Path]:
    return [p for p in _find_files(root, lambda n: n.lower() == "metadata.csv")
            if {"img_id", "diagnostic"} <= set(_csv_header(p))]


def _derm7pt_files(root: Path) -> list[Path]:
    return [p for p in _find_files(root, lambda n: n.lower() == "meta.csv")
            if p.parent.name.lower() == "meta" and {"case_num", "diagnosis", "derm"} <= set(_csv_header(p))]


def _ph2_images_dirs(root: Path) -> list[Path]:
    found = [here / d for here, dirs, _ in _walk(root, _MARKER_DEPTH - 1) for d in dirs if d.lower() == "ph2 dataset images"]
    if not found and any(_PH2_CASE.match(d) for d in _subdirs(root)):
        found = [root]
    return found


def _subdirs(root: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".") and e.name not in _SKIP_DIRS)
    except OSError:
        return []


def _first_mask(root: Path) -> Path | None:
    for here, _, files in _walk(root, _MARKER_DEPTH):
        for name in files:
            if _is_image(name) and _MASK_NAME.match(Path(name).stem):
                return here / name
    return None


def _detect_edgederm(root: Path) -> str | None:
    table = root / "labels.csv"
    if table.is_file() and (root / "images").is_dir() and {"id", "label"} <= set(_csv_header(table)):
        return "labels.csv with id,label + images/"
    return None


def _detect_isic(root: Path) -> str | None:
    files = _isic_gt_files(root)
    return f"one-hot ground truth {files[0].relative_to(root)}" if files else None


def _detect_ham(root: Path) -> str | None:
    files = _ham_files(root)
    return f"{files[0].relative_to(root)}" if files else None


def _detect_pad(root: Path) -> str | None:
    files = _pad_files(root)
    return f"{files[0].relative_to(root)} with img_id,diagnostic" if files else None


def _detect_derm7pt(root: Path) -> str | None:
    files = _derm7pt_files(root)
    return f"{files[0].relative_to(root)} with case_num,diagnosis,derm" if files else None


def _detect_ph2(root: Path) -> str | None:
    dirs = _ph2_images_dirs(root)
    if dirs:
        return f"PH2 case folders in {dirs[0]}"
    return None


def _detect_segmentation(root: Path) -> str | None:
    mask = _first_mask(root)
    return f"masks named like {mask.relative_to(root)}" if mask else None


def _csv_layout_columns(header: Sequence[str]) -> tuple[str | None, str | None]:
    lowered = {c.lower(): c for c in header}
    image = next((lowered[c] for c in ("image", "image_path", "path", "file", "filename", "img") if c in lowered), None)
    label = next((lowered[c] for c in ("label", "diagnosis", "dx", "class") if c in lowered), None)
    return image, label


def _detect_csv(root: Path) -> str | None:
    tables = [p for p in sorted(root.glob("*.csv")) if all(_csv_layout_columns(_csv_header(p)))]
    return f"{tables[0].name} with image and label columns" if len(tables) == 1 else None


def _detect_folder(root: Path) -> str | None:
    # Images directly in the class folders: root/train/<class>/ must not pass for classes "train", "test".
    classes = [d for d in _subdirs(root) if _find_files(root / d, _is_image, max_depth=0)]
    return f"class folders {classes[:5]}" if classes else None


def _detect_file(path: Path) -> tuple[str, str]:
    if not path.name.lower().endswith((".csv", ".tab", ".tsv", ".txt")):
        raise InputError(f"{path} is a file but not a CSV; pass a dataset folder or a CSV file ({', '.join(LAYOUTS)})")
    header = _csv_header(path)
    if re.fullmatch(r"ham10000_metadata(\.csv|\.tab|\.txt)?", path.name.lower()):
        return "ham10000", path.name
    if _isic_gt_header(header):
        return "isic", f"one-hot ground truth {path.name}"
    if {"img_id", "diagnostic"} <= set(header):
        return "pad_ufes_20", f"{path.name} with img_id,diagnostic"
    if all(_csv_layout_columns(header)):
        return "csv", f"{path.name} with image and label columns"
    raise InputError(f"{path}: columns {header} fit no CSV layout; a clinic CSV needs an image path column "
                     "(image, image_path, path, file) and a label column (label, diagnosis, dx, class)")


_SPECIFIC_DETECTORS: list[tuple[str, Callable[[Path], str | None]]] = [
    ("edgederm", _detect_edgederm),
    ("isic", _detect_isic),
    ("ham10000", _detect_ham),
    ("pad_ufes_20", _detect_pad),
    ("derm7pt", _detect_derm7pt),
    ("ph2", _detect_ph2),
    ("isic_segmentation", _detect_segmentation),
]
_GENERIC_DETECTORS: list[tuple[str, Callable[[Path], str | None]]] = [
    ("csv", _detect_csv),
    ("folder", _detect_folder),
]


# --------------------------------------------------------------------------- readers


def _one_file(found: list[Path], root: Path, what: str, layout: str) -> Path:
    if not found:
        raise InputError(f"no {what} in {root} or {_MARKER_DEPTH} folder levels below (it holds {_describe_folder(root)}); "
                         f"the {layout} layout expects {LAYOUTS[layout]}")
    if len(found) > 1:
        raise InputError(f"{root} holds several {what}: {[str(p.relative_to(root)) for p in found]}; "
                         "pass the folder (or CSV file) of the one you mean")
    return found[0]


def _read_edgederm(root: Path, schema: SchemaLike) -> Dataset:
    table = root / "labels.csv"
    if not table.is_file():
        raise InputError(f"{root} has no labels.csv (it holds {_describe_folder(root)}); the edgederm layout expects "
                         f"{LAYOUTS['edgederm']}")
    header, rows = _read_table(table)
    _require_columns(table, header, ["id", "label"], "edgederm")
    chosen = _resolve_schema(schema, None)
    extra = [c for c in header if c not in ("id", "label", "class_name")]
    pick = _MetadataReader(table, extra, chosen) if chosen is not None else None
    names: dict[int, str] = {}
    labels: list[int] = []
    for line, row in enumerate(rows, start=2):
        try:
            label = int(row["label"])
        except ValueError:
            raise InputError(f"{table} line {line}: label {row['label']!r} is not an integer class index") from None
        if label < 0:
            raise InputError(f"{table} line {line}: label {label} is negative; expected a class index 0, 1, ...")
        labels.append(label)
        names[label] = row.get("class_name") or f"class_{label}"
    class_names = tuple(names.get(i, f"class_{i}") for i in range(max(names) + 1)) if names else ()
    records, missing = [], []
    for line, (row, label) in enumerate(zip(rows, labels), start=2):
        image = next((p for p in (root / "images" / f"{row['id']}{ext}" for ext in (".jpg", ".png", ".jpeg")) if p.exists()), None)
        if image is None:
            missing.append(row["id"])
            continue
        mask = root / "masks" / f"{row['id']}.png"
        # Without a schema, the same number parsing as edgederm.train.read_image_folder.
        metadata = pick(row, f"line {line}") if pick else {k: parse_csv_value(row[k]) for k in extra}
        records.append(Record(row["id"], image, label, class_names, metadata, mask if mask.is_file() else None))
    if missing:
        raise InputError(f"{table} lists {len(missing)} id(s) with no image in {root / 'images'} (e.g. {missing[:3]}); "
                         "expected images/<id>.jpg (or .png)")
    return Dataset("edgederm", root, records, class_names, chosen)


def _read_isic(root: Path, schema: SchemaLike) -> Dataset:
    if root.is_file():
        table, search = root, root.parent
    else:
        table, search = _one_file(_isic_gt_files(root), root, "ISIC one-hot ground-truth CSV", "isic"), root
    header, rows = _read_table(table)
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

    meta_tables = _isic_metadata_files(search)
    meta_rows: dict[str, dict[str, str]] = {}
    pick = None
    chosen = None
    if len(meta_tables) > 1:
        raise InputError(f"{search} holds several ISIC metadata CSVs: {[str(p) for p in meta_tables]}; "
                         "keep the one that belongs to the ground truth next to it")
    if meta_tables:
        meta_header, meta_list = _read_table(meta_tables[0])
        meta_rows = {r["image"]: r for r in meta_list}
        chosen = _resolve_schema(schema, "isic2019")
        available = [c for c in meta_header if c not in ("image", "lesion_id")]
        pick = _MetadataReader(meta_tables[0], available, chosen)
        notes.append(f"metadata from {meta_tables[0].name}")
    elif schema is not None:
        chosen = _resolve_schema(schema, None)
        pick = _MetadataReader(table, [], chosen)  # raises: no metadata to fill the schema
    index = _ImageIndex(search)
    records, missing = [], []
    for i, (row, label) in enumerate(zip(rows, labels)):
        image = index.find(row["image"])
        if image is None:
            missing.append(row["image"])
            continue
        meta_row = meta_rows.get(row["image"], {})
        metadata = pick(meta_row, f"image {row['image']!r}") if pick else {}
        records.append(Record(row["image"], image, int(label), class_names, metadata,
                              group=meta_row.get("lesion_id") or None))
    if missing:
        raise _missing_images_error(missing, table, search, "isic")
    return Dataset("isic", root, records, class_names, chosen, notes)


def _read_ham10000(root: Path, schema: SchemaLike) -> Dataset:
    table = root if root.is_file() else _one_file(_ham_files(root), root, "HAM10000_metadata.csv", "ham10000")
    search = table.parent if root.is_file() else root
    header, rows = _read_table(table)
    _require_columns(table, header, ["image_id", "dx"], "ham10000")
    chosen = _resolve_schema(schema, "ham10000")
    available = [c for c in header if c not in ("lesion_id", "image_id", "dx")]
    pick = _MetadataReader(table, available, chosen, _HAM_LEAKS)
    index = _ImageIndex(search)
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
        raise _missing_images_error(missing, table, search, "ham10000")
    notes = [f"{index.duplicates} duplicate image files ignored (first in path order used)"] if index.duplicates else []
    return Dataset("ham10000", root, records, HAM10000_CLASSES, chosen, notes)


def _read_pad_ufes_20(root: Path, schema: SchemaLike) -> Dataset:
    table = root if root.is_file() else _one_file(_pad_files(root), root, "PAD-UFES-20 metadata.csv", "pad_ufes_20")
    search = table.parent
    header, rows = _read_table(table)
    _require_columns(table, header, ["img_id", "diagnostic"], "pad_ufes_20")
    chosen = _resolve_schema(schema, "pad_ufes_20")
    available = [c for c in header if c not in ("patient_id", "lesion_id", "img_id", "diagnostic")]
    pick = _MetadataReader(table, available, chosen, _PAD_LEAKS)
    index = _ImageIndex(search)
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
        raise _missing_images_error(missing, table, search, "pad_ufes_20")
    return Dataset("pad_ufes_20", root, records, PAD_UFES_20_CLASSES, chosen)


def _read_derm7pt(root: Path, schema: SchemaLike) -> Dataset:
    table = _one_file(_derm7pt_files(root), root, "Derm7pt meta/meta.csv", "derm7pt")
    base = table.parent.parent
    images_dir = base / "images"
    header, rows = _read_table(table)
    _require_columns(table, header, ["case_num", "diagnosis", "derm"], "derm7pt")
    chosen = _resolve_schema(schema, "derm7pt")
    available = [c for c in header if c not in ("case_num", "diagnosis", "derm", "clinic") and c not in _DERM7PT_LEAKS]
    pick = _MetadataReader(table, available, chosen, _DERM7PT_LEAKS)
    splits = _derm7pt_splits(table.parent, len(rows))
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
        raise _missing_images_error(missing, table, images_dir, "derm7pt")
    notes = ["splits from meta/*_indexes.csv"] if splits else []
    return Dataset("derm7pt", root, records, DERM7PT_CLASSES, chosen, notes)


def _derm7pt_splits(meta_dir: Path, n_rows: int) -> dict[int, str]:
    splits: dict[int, str] = {}
    for split in ("train", "valid", "test"):
        path = meta_dir / f"{split}_indexes.csv"
        if not path.is_file():
            continue
        header, rows = _read_table(path)
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


def _read_isic_segmentation(root: Path, schema: SchemaLike) -> Dataset:
    if not root.is_dir():
        raise InputError(f"the isic_segmentation layout needs a folder; got {root}")
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    for here, _, files in _walk(root, -1):
        for name in files:
            if not _is_image(name):
                continue
            stem = Path(name).stem
            if _SUPERPIXELS_NAME.search(stem):  # ISIC 2017 ships superpixel maps beside the images
                continue
            match = _MASK_NAME.match(stem)
            if match:
                masks.setdefault(match["id"], here / name)
            else:
                images.setdefault(stem, here / name)
    if not masks:
        raise InputError(f"no <id>_segmentation.png masks below {root} (it holds {_describe_folder(root)}); "
                         f"the isic_segmentation layout expects {LAYOUTS['isic_segmentation']}")
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise InputError(f"{len(orphans)} mask(s) below {root} have no image (e.g. {[str(masks[o]) for o in orphans[:3]]}); "
                         "extract the Training_Input archive next to the GroundTruth one")
    unmasked = sorted(set(images) - set(masks))
    if unmasked:
        raise InputError(f"{len(unmasked)} image(s) below {root} have no <id>_segmentation.png mask "
                         f"(e.g. {[str(images[u]) for u in unmasked[:3]]}); point at a folder holding only "
                         "image/mask pairs (a test input without ground truth cannot train a segmenter)")
    if schema is not None:
        _MetadataReader(root, [], _resolve_schema(schema, None))  # raises: this layout has no metadata
    records = [Record(i, images[i], None, (), {}, masks[i]) for i in sorted(masks)]
    return Dataset("isic_segmentation", root, records, ())


def _read_ph2(root: Path, schema: SchemaLike) -> Dataset:
    dirs = _ph2_images_dirs(root)
    images_dir = _one_file(dirs, root, "'PH2 Dataset images' folder", "ph2")
    if schema is not None:
        _MetadataReader(root, [], _resolve_schema(schema, None))  # raises: PH2 has no patient metadata
    labels, source, notes = _ph2_labels(root)
    records, missing = [], []
    for case in _subdirs(images_dir):
        if not _PH2_CASE.match(case):
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


def _ph2_labels(root: Path) -> tuple[dict[str, int] | None, Path, list[str]]:
    txt = _find_files(root, lambda n: n.lower() == "ph2_dataset.txt")
    if txt:
        return _ph2_labels_txt(txt[0]), txt[0], [f"labels from {txt[0].name}"]
    xlsx = _find_files(root, lambda n: n.lower() == "ph2_dataset.xlsx")
    if xlsx:
        return _ph2_labels_xlsx(xlsx[0]), xlsx[0], [f"labels from {xlsx[0].name}"]
    log.warning("PH2 at %s: no PH2_dataset.txt or .xlsx; records carry masks and no diagnosis", root)
    return None, root, ["no PH2_dataset.txt/.xlsx: masks only, no labels"]


def _ph2_labels_txt(path: Path) -> dict[str, int]:
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
            if not _PH2_CASE.match(cells[1]):
                continue
            value = cells[column] if column < len(cells) else ""
            if value not in ("0", "1", "2"):
                raise InputError(f"{path} line {number} ({cells[1]}): clinical diagnosis {value!r}; expected 0 "
                                 "(common nevus), 1 (atypical nevus) or 2 (melanoma)")
            labels[cells[1]] = int(value)
    if not labels:
        raise InputError(f"{path} lists no cases; expected rows like '|| IMD003 || ... || 0 || ...'")
    return labels


def _ph2_labels_xlsx(path: Path) -> dict[str, int]:
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
            if all(k in lowered for k in ("common nevus", "atypical nevus", "melanoma")):
                columns = {k: lowered.index(k) for k in ("common nevus", "atypical nevus", "melanoma")}
                name_column = next((i for i, c in enumerate(lowered) if "name" in c), 0)
            continue
        name = cells[name_column] if name_column < len(cells) else ""
        if not _PH2_CASE.match(name):
            continue
        marked = [k for k, j in columns.items() if j < len(cells) and cells[j].upper() == "X"]
        if len(marked) != 1:
            raise InputError(f"{path}: {name} has {len(marked)} diagnoses marked; expected one X")
        labels[name] = ("common nevus", "atypical nevus", "melanoma").index(marked[0])
    if columns is None or not labels:
        raise InputError(f"{path}: no header with Common Nevus, Atypical Nevus, Melanoma, or no IMD rows under it")
    return labels


def _read_folder(root: Path, schema: SchemaLike) -> Dataset:
    if not root.is_dir():
        raise InputError(f"the folder layout needs a folder; got {root}")
    if schema is not None:
        _MetadataReader(root, [], _resolve_schema(schema, None))  # raises: folders carry no metadata
    classes, empty = [], []
    files_of: dict[str, list[Path]] = {}
    for name in _subdirs(root):
        files = _find_files(root / name, _is_image, max_depth=-1)
        if files:
            classes.append(name)
            files_of[name] = files
        else:
            empty.append(name)
    nested = [set(_subdirs(root / name)) for name in classes if not _find_files(root / name, _is_image, max_depth=0)]
    if len(nested) == len(classes) >= 2 and set.intersection(*nested):
        shared = sorted(set.intersection(*nested))
        raise InputError(f"{root}'s folders {classes} each hold the same sub-folders {shared[:5]} and no images of "
                         f"their own: they look like splits, not classes; point at one of them, e.g. {root / classes[0]}")
    if not classes:
        raise InputError(f"{root} has no class folders with images (it holds {_describe_folder(root)}); the folder "
                         f"layout expects {LAYOUTS['folder']}")
    class_names = tuple(classes)
    records = [Record(path.relative_to(root).with_suffix("").as_posix(), path, label, class_names)
               for label, name in enumerate(classes) for path in files_of[name]]
    notes = [f"folders without images ignored: {empty}"] if empty else []
    if empty:
        log.warning("%s: folders without images ignored: %s", root, empty)
    return Dataset("folder", root, records, class_names, None, notes)


def _read_csv_layout(root: Path, schema: SchemaLike) -> Dataset:
    if root.is_file():
        table = root
    else:
        tables = sorted(root.glob("*.csv"))
        if len(tables) != 1:
            raise InputError(f"{root} holds {len(tables)} CSV files {[t.name for t in tables]}; the csv layout needs "
                             "exactly one, or pass the CSV file itself")
        table = tables[0]
    header, rows = _read_table(table)
    image_column, label_column = _csv_layout_columns(header)
    if image_column is None or label_column is None:
        raise InputError(f"{table} has columns {header}; the csv layout expects {LAYOUTS['csv']}")
    lowered = {c.lower(): c for c in header}
    mask_column = next((lowered[c] for c in ("mask", "mask_path", "segmentation") if c in lowered), None)
    id_column = next((lowered[c] for c in ("id", "image_id") if c in lowered), None)
    group_column = next((lowered[c] for c in ("lesion_id", "patient_id", "group") if c in lowered), None)
    name_column = lowered.get("class_name")
    identifiers = {image_column, label_column, mask_column, id_column, name_column,
                   *(lowered[c] for c in ("lesion_id", "patient_id", "group") if c in lowered)}
    chosen = _resolve_schema(schema, None)
    pick = _MetadataReader(table, [c for c in header if c not in identifiers], chosen)
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


_READERS: dict[str, Callable[[Path, SchemaLike], Dataset]] = {
    "edgederm": _read_edgederm,
    "isic": _read_isic,
    "ham10000": _read_ham10000,
    "pad_ufes_20": _read_pad_ufes_20,
    "derm7pt": _read_derm7pt,
    "isic_segmentation": _read_isic_segmentation,
    "ph2": _read_ph2,
    "folder": _read_folder,
    "csv": _read_csv_layout,
}

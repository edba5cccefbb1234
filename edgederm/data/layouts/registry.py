"""Layout readers registered by name; ``read_dataset`` and ``detect_layout``.

A layout module registers its reader with :func:`register_layout`: the name, the
one-line description error messages quote, the detector that recognises a folder in
that layout, and the aliases users type. Detection refuses to guess between two
matching public layouts; the generic layouts (csv, folder) are only considered when
no public layout matches, in registration order.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from edgederm.data.files import describe_folder
from edgederm.data.tables import csv_header
from edgederm.data.records import Dataset, SchemaLike, check_unique_ids, reorder_classes
from edgederm.runtime.errors import InputError

log = logging.getLogger(__name__)

Reader = Callable[[Path, SchemaLike], Dataset]
Detector = Callable[[Path], "str | None"]


@dataclass(frozen=True)
class LayoutEntry:
    name: str
    description: str
    reader: Reader
    detect: Detector  # what gave the layout away in a folder, or None
    generic: bool  # matches many folders: only tried when no specific layout matches
    detect_file: Detector | None  # the same for a single table file, for layouts that can be one


_REGISTRY: dict[str, LayoutEntry] = {}
_ALIASES: dict[str, str] = {}
# name -> description, in registration order (what error messages list).
LAYOUTS: dict[str, str] = {}


def register_layout(name: str, description: str, detect: Detector, generic: bool = False,
                    detect_file: Detector | None = None, aliases: Sequence[str] = ()) -> Callable[[Reader], Reader]:
    """Decorator: register ``reader(root, schema) -> Dataset`` as layout ``name``."""

    def wrap(reader: Reader) -> Reader:
        if name in _REGISTRY:
            raise ValueError(f"layout {name!r} is registered twice")
        _REGISTRY[name] = LayoutEntry(name, description, reader, detect, generic, detect_file)
        LAYOUTS[name] = description
        _ALIASES.update({alias: name for alias in aliases})
        return reader

    return wrap


def layout_name(layout: str) -> str:
    """The registered name of ``layout`` (or an alias), or ``"auto"``."""
    key = str(layout).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key != "auto" and key not in _REGISTRY:
        raise InputError(f"layout {layout!r} is not known; allowed: auto, {', '.join(LAYOUTS)} "
                         f"(aliases: {', '.join(sorted(_ALIASES))})")
    return key


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
    name = layout_name(layout)
    if name == "auto":
        name, evidence = detect_layout(path)
        log.info("dataset %s: layout %s (%s)", path, name, evidence)
    dataset = _REGISTRY[name].reader(path, schema)
    if classes is not None:
        dataset = reorder_classes(dataset, classes)
    if not dataset.records:
        raise InputError(f"{path} ({name} layout) holds no images; expected {LAYOUTS[name]}")
    check_unique_ids(dataset)
    return dataset


def detect_layout(root: str | os.PathLike) -> tuple[str, str]:
    """(layout name, what gave it away) for ``root``; InputError when none or several match."""
    root = Path(root)
    if root.is_file():
        return _detect_file(root)
    if not root.is_dir():
        raise InputError(f"dataset path {str(root)!r} does not exist")
    specific = [(e.name, evidence) for e in _REGISTRY.values() if not e.generic and (evidence := e.detect(root))]
    if len(specific) > 1:
        raise InputError(
            f"{root} matches several dataset layouts: "
            + "; ".join(f"{name} ({evidence})" for name, evidence in specific)
            + f". Fix: pass layout=<one of {[n for n, _ in specific]}> (CLI: --layout), or point at a sub-folder "
              "holding one dataset"
        )
    if specific:
        return specific[0]
    for entry in _REGISTRY.values():
        if entry.generic and (evidence := entry.detect(root)):
            return entry.name, evidence
    raise InputError(
        f"cannot tell the layout of {root}: it holds {describe_folder(root)}. Expected one of:\n"
        + "\n".join(f"  {name}: {text}" for name, text in LAYOUTS.items())
        + "\nFix: point at the folder the dataset was extracted into, arrange your files as one of these, "
          "or pass layout=<name> (CLI: --layout) to get that layout's specific complaint."
    )


def _detect_file(path: Path) -> tuple[str, str]:
    if not path.name.lower().endswith((".csv", ".tab", ".tsv", ".txt")):
        raise InputError(f"{path} is a file but not a CSV; pass a dataset folder or a CSV file ({', '.join(LAYOUTS)})")
    for entry in _REGISTRY.values():
        if entry.detect_file is not None and (evidence := entry.detect_file(path)):
            return entry.name, evidence
    raise InputError(f"{path}: columns {csv_header(path)} fit no CSV layout; a clinic CSV needs an image path column "
                     "(image, image_path, path, file) and a label column (label, diagnosis, dx, class)")

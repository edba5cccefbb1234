"""``folder``: one folder per class, ``root/<class>/<images>``, classes sorted by name
(as torchvision's ImageFolder)."""
from __future__ import annotations

import logging
from pathlib import Path

from edgederm.data.files import describe_folder, find_files, is_image, subdirs
from edgederm.data.layouts.common import refuse_schema
from edgederm.data.layouts.registry import LAYOUTS, register_layout
from edgederm.data.records import Dataset, Record, SchemaLike, resolve_schema
from edgederm.runtime.errors import InputError

log = logging.getLogger(__name__)


def _detect(root: Path) -> str | None:
    # Images directly in the class folders: root/train/<class>/ must not pass for classes "train", "test".
    classes = [d for d in subdirs(root) if find_files(root / d, is_image, max_depth=0)]
    return f"class folders {classes[:5]}" if classes else None


@register_layout("folder", "one folder per class: <root>/<class name>/<images>", _detect, generic=True,
                 aliases=("imagefolder", "image_folder"))
def read_folder(root: Path, schema: SchemaLike) -> Dataset:
    if not root.is_dir():
        raise InputError(f"the folder layout needs a folder; got {root}")
    refuse_schema(root, resolve_schema(schema, None))  # folders carry no metadata
    classes, empty = [], []
    files_of: dict[str, list[Path]] = {}
    for name in subdirs(root):
        found = find_files(root / name, is_image, max_depth=-1)
        if found:
            classes.append(name)
            files_of[name] = found
        else:
            empty.append(name)
    nested = [set(subdirs(root / name)) for name in classes if not find_files(root / name, is_image, max_depth=0)]
    if len(nested) == len(classes) >= 2 and set.intersection(*nested):
        shared = sorted(set.intersection(*nested))
        raise InputError(f"{root}'s folders {classes} each hold the same sub-folders {shared[:5]} and no images of "
                         f"their own: they look like splits, not classes; point at one of them, e.g. {root / classes[0]}")
    if not classes:
        raise InputError(f"{root} has no class folders with images (it holds {describe_folder(root)}); the folder "
                         f"layout expects {LAYOUTS['folder']}")
    class_names = tuple(classes)
    records = [Record(path.relative_to(root).with_suffix("").as_posix(), path, label, class_names)
               for label, name in enumerate(classes) for path in files_of[name]]
    notes = [f"folders without images ignored: {empty}"] if empty else []
    if empty:
        log.warning("%s: folders without images ignored: %s", root, empty)
    return Dataset("folder", root, records, class_names, None, notes)

"""``isic_segmentation``: ISIC 2016-2018 lesion segmentation.

``<id>.jpg`` + mask ``<id>_segmentation.png`` (2016: ``_Segmentation.png``) anywhere
below the root; 2017's ``_superpixels.png`` files are skipped. No diagnosis: labels
are None. An image without its mask, or a mask without its image, is an error, not a
skip.
"""
from __future__ import annotations

import re
from pathlib import Path

from edgederm.data.files import describe_folder, is_image, walk
from edgederm.data.layouts.common import MARKER_DEPTH, refuse_schema
from edgederm.data.layouts.registry import LAYOUTS, register_layout
from edgederm.data.records import Dataset, Record, SchemaLike, resolve_schema
from edgederm.runtime.errors import InputError

_MASK_NAME = re.compile(r"^(?P<id>.+)_segmentation$", re.IGNORECASE)
_SUPERPIXELS_NAME = re.compile(r"_superpixels$", re.IGNORECASE)

DESCRIPTION = (
    "ISIC 2016-2018 segmentation: <id>.jpg + <id>_segmentation.png (2016: _Segmentation.png), e.g. "
    "ISIC2018_Task1-2_Training_Input/ + ISIC2018_Task1_Training_GroundTruth/"
)


def _detect(root: Path) -> str | None:
    for here, _, files in walk(root, MARKER_DEPTH):
        for name in files:
            if is_image(name) and _MASK_NAME.match(Path(name).stem):
                return f"masks named like {(here / name).relative_to(root)}"
    return None


@register_layout("isic_segmentation", DESCRIPTION, _detect, aliases=("segmentation", "isic2016", "isic2017"))
def read_isic_segmentation(root: Path, schema: SchemaLike) -> Dataset:
    if not root.is_dir():
        raise InputError(f"the isic_segmentation layout needs a folder; got {root}")
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    for here, _, files in walk(root, -1):
        for name in files:
            if not is_image(name):
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
        raise InputError(f"no <id>_segmentation.png masks below {root} (it holds {describe_folder(root)}); "
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
    refuse_schema(root, resolve_schema(schema, None))  # this layout has no metadata
    records = [Record(i, images[i], None, (), {}, masks[i]) for i in sorted(masks)]
    return Dataset("isic_segmentation", root, records, ())

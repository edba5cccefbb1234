"""Records -> :class:`LabelledImages`, the preprocessed tensors a trainer consumes.

Pixels go through ``edgederm.runtime.preprocess``, the code the device runs, so a
model is trained on the pixels it will see deployed.
"""
from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from edgederm.data.records import Dataset, Record
from edgederm.runtime.errors import InputError

if TYPE_CHECKING:
    from edgederm.runtime.preprocess import PreprocessConfig

log = logging.getLogger(__name__)


@dataclass
class LabelledImages:
    """Preprocessed images (N x 3 x H x W float32), labels, and what else the folder has."""

    x: np.ndarray
    y: np.ndarray
    ids: list[str]
    class_names: list[str]
    records: list[dict[str, Any]] = field(default_factory=list)  # raw metadata per image
    masks: np.ndarray | None = None  # N x H x W int64 lesion masks (0/1) at the input size
    # edgederm.runtime.safety.image_statistics of each original image (the not-skin check's reference)
    image_stats: list[dict[str, float]] | None = None
    # Lesion or patient id per image (Record.group): images of one group stay in one
    # split, so validation never sees a lesion training saw.
    groups: list[str | None] | None = None

    def metadata(self, schema: Any) -> np.ndarray:
        """Metadata encoded with ``schema`` (edgederm.runtime.metadata)."""
        from edgederm.runtime.metadata import load_schema

        schema = load_schema(schema)
        return schema.encode_many([schema.select(r) for r in self.records])

    def fingerprint(self) -> str:
        """Hash of ids, labels and tensor shape: a resume must see the same dataset."""
        h = hashlib.sha256()
        h.update("\n".join(self.ids).encode())
        h.update(np.ascontiguousarray(self.y, np.int64).tobytes())
        h.update(repr(tuple(self.x.shape)).encode())
        return h.hexdigest()


def read_image_folder(root: str | Path, config: PreprocessConfig, progress: Callable[[int, int], None] | None = None,
                      masks: bool = False) -> LabelledImages:
    """The edgederm layout (``root/labels.csv`` + ``images/``) as :class:`LabelledImages`.

    The labels.csv columns other than id, label and class_name are metadata records
    (numbers parsed). ``masks=True`` also reads ``root/masks/<id>.png``.
    """
    from edgederm.data.layouts import read_dataset

    return load_labelled_images(read_dataset(root, layout="edgederm"), config, masks=masks, progress=progress)


def load_labelled_images(records: Dataset | Sequence[Record], config: PreprocessConfig | Mapping[str, Any],
                         masks: bool = False,
                         progress: Callable[[int, int], None] | bool | None = None) -> LabelledImages:
    """Records -> :class:`LabelledImages`, pixels through ``runtime.preprocess``.

    ``masks=True`` also reads each record's mask: binarised (any value above half its
    range is lesion; 0/1 masks are accepted) and brought to the input size by the same
    resize policy as the image (stretch, letterbox, centre crop), so pixels and mask
    stay aligned. Records without a label get -1 (segmentation data); a
    classification read (``masks=False``) refuses them. Each original image's colour
    statistics are kept for the not-skin check. ``progress=True`` prints a counter to
    stderr.
    """
    from edgederm.runtime import preprocess as pp
    from edgederm.runtime.imageio import read_image
    from edgederm.runtime.safety import image_statistics

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
    report = stderr_progress("reading images") if progress is True else (progress or None)
    height, width = config.input_size
    nbytes = len(items) * 3 * height * width * 4
    if nbytes > 2 << 30:
        log.warning("load_labelled_images: %d images at %dx%d take %.1f GiB of float32 in memory", len(items), height,
                    width, nbytes / 2**30)
    x = np.empty((len(items), 3, height, width), np.float32)
    mask_array = np.empty((len(items), height, width), np.int64) if masks else None
    stats = []
    for i, record in enumerate(items):
        image = read_image(record.image)
        x[i] = pp.preprocess(image, config)
        stats.append(image_statistics(image))
        if mask_array is not None:
            assert record.mask is not None
            mask_array[i] = _read_mask(record, image.shape[:2], config)
        if report:
            report(i + 1, len(items))
    y = np.array([-1 if r.label is None else r.label for r in items], np.int64)
    return LabelledImages(x, y, [r.id for r in items], class_names, [dict(r.metadata) for r in items], mask_array,
                          stats, [r.group for r in items])


def _read_mask(record: Record, image_hw: tuple[int, int], config: PreprocessConfig) -> np.ndarray:
    import cv2

    from edgederm.runtime import preprocess as pp

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
    resized = pp.resize_image(np.repeat(binary[:, :, None], 3, axis=2), config.input_size, config.resize,
                               config.crop_fraction)
    return (resized[:, :, 0] > 127).astype(np.int64)


def stderr_progress(what: str) -> Callable[[int, int], None]:
    tty = sys.stderr.isatty()

    def report(done: int, total: int) -> None:
        # A terminal gets a live counter; a log file gets a line every 10%.
        if tty:
            sys.stderr.write(f"\r{what} {done}/{total}" + ("\n" if done == total else ""))
            sys.stderr.flush()
        elif done == total or done % max(1, total // 10) == 0:
            print(f"{what} {done}/{total}", file=sys.stderr)

    return report

"""One labelled case through the runtime, as one row of the results file.

Shared by the local runner (edgederm/evaluate/runner.py: in process or in worker
processes) and the Ray runner (edgederm/evaluate/distributed.py), so a case is
scored by the same code wherever it runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgederm.data import Record
from edgederm.metrics import segmentation_metrics
from edgederm.runtime.errors import EdgeDermError, InputError

SKIN_TONE = "skin_tone"


def read_mask(path: Path) -> np.ndarray:
    """A lesion mask file as bool (0/1 and 0/255 masks alike)."""
    import cv2

    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise InputError(f"mask {str(path)!r} is missing or not an image; expected a 0/255 (or 0/1) PNG")
    return mask > (0 if mask.max() <= 1 else 127)


def evaluate_case(model: Any, record: Record, skin: bool = False) -> dict[str, Any]:
    """One record through the runtime -> its JSON row (module docstring)."""
    row: dict[str, Any] = {"id": record.id, "label": record.class_name,
                           "metadata": {k: v for k, v in record.metadata.items() if v is not None}}
    try:
        metadata = row["metadata"] if "metadata" in model.modalities else None
        result = model.predict_file(record.image, metadata=metadata, clinical=record.clinical)
        row.update(predicted=result.label, probabilities=result.probabilities, needs_review=result.needs_review,
                   review_reasons=list(result.review_reasons))
        truth = read_mask(record.mask) if record.mask is not None and (skin or result.mask is not None) else None
        if result.mask is not None and truth is not None:
            if truth.shape != result.mask.shape:
                raise InputError(f"mask {str(record.mask)!r} is {truth.shape[0]}x{truth.shape[1]} but its image "
                                 f"is {result.mask.shape[0]}x{result.mask.shape[1]}; a mask must have its image's size")
            figures = segmentation_metrics(result.mask[None] > 0, truth[None])
            row["segmentation"] = {"dice": figures["dice"], "iou": figures["iou"], "hd95": figures["hd95"]}
        if skin:
            from edgederm.evaluate.skin import fitzpatrick, skin_tone
            from edgederm.runtime.imageio import read_image

            if fitzpatrick(record.metadata) is not None:
                row[SKIN_TONE] = {"skin_tone": fitzpatrick(record.metadata), "skin_tone_source": "metadata"}
            else:
                row[SKIN_TONE] = skin_tone({}, read_image(record.image), truth)
    except EdgeDermError as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row

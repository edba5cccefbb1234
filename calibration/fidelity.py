"""How far a reduced-precision graph drifts from fp32: the figures a bundle stores.

Classification (per image): decision agreement, max and mean absolute probability
difference, and, when labels are known, accuracy, per-class recall change and
expected-calibration-error change (quantized minus fp32; negative recall change =
the quantized graph misses more of that class).

Segmentation (per image, masks at the input resolution): pixel agreement of the two
masks, Dice and HD95 between them, and, when reference masks exist, the change of
Dice and HD95 against the reference (quantized minus fp32).

Decisions:
- HD95 is the larger of the two directed 95th percentiles of boundary-to-boundary
  distances (the convention of MONAI's ``compute_hausdorff_distance(percentile=95)``),
  in pixels, computed with OpenCV distance transforms (exact Euclidean, ``DIST_MASK_PRECISE``).
  Boundary = mask pixels with a 4-neighbour outside the mask (the image border counts
  as outside). Two empty masks: 0; one empty mask: undefined (``None``, counted in
  ``hd95_undefined``) rather than an arbitrary large number.
- ECE uses the trainer's definition (15 equal-width confidence bins) so the figure
  in the bundle matches the one training reported.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from edgederm.metrics import hd95  # one HD95 definition for training and fidelity


def classification_fidelity(fp32_probs: np.ndarray, quant_probs: np.ndarray, labels: np.ndarray | None,
                            class_names: Sequence[str]) -> dict[str, Any]:
    """Agreement and probability drift of a reduced-precision graph against fp32."""
    from edgederm.metrics import expected_calibration_error

    ref, got = fp32_probs.argmax(1), quant_probs.argmax(1)
    diff = np.abs(fp32_probs.astype(np.float64) - quant_probs.astype(np.float64))
    report: dict[str, Any] = {
        "images": int(len(ref)),
        "decision_agreement": float((ref == got).mean()) if len(ref) else 1.0,
        "max_probability_diff": float(diff.max()) if diff.size else 0.0,
        "mean_probability_diff": float(diff.mean()) if diff.size else 0.0,
    }
    if labels is not None and len(labels):
        labels = np.asarray(labels)
        report["accuracy_fp32"] = float((ref == labels).mean())
        report["accuracy_quantized"] = float((got == labels).mean())
        recall_change = {}
        for k, name in enumerate(class_names):
            sel = labels == k
            if sel.any():
                recall_change[name] = float((got[sel] == k).mean() - (ref[sel] == k).mean())
        report["recall_change"] = recall_change
        ece_fp32 = expected_calibration_error(fp32_probs, labels)
        ece_quant = expected_calibration_error(quant_probs, labels)
        report["ece_fp32"] = ece_fp32
        report["ece_change"] = ece_quant - ece_fp32
    return report


# -- segmentation ---------------------------------------------------------------------
def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty."""
    a, b = a.astype(bool), b.astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def segmentation_fidelity(fp32_masks: Sequence[np.ndarray], quant_masks: Sequence[np.ndarray],
                          reference: Sequence[np.ndarray | None] | None = None) -> dict[str, Any]:
    """Mask drift of a reduced-precision segmenter against fp32 (and the reference masks)."""
    agree, dices, hds = [], [], []
    for f, q in zip(fp32_masks, quant_masks):
        agree.append(float((f == q).mean()))
        dices.append(dice(f > 0, q > 0))
        hds.append(hd95(f > 0, q > 0))
    report: dict[str, Any] = {
        "images": len(agree),
        "pixel_agreement": float(np.mean(agree)) if agree else 1.0,
        "min_pixel_agreement": float(np.min(agree)) if agree else 1.0,
        "dice_vs_fp32": _mean(dices),
        "min_dice_vs_fp32": float(np.min(dices)) if dices else 1.0,
        "hd95_vs_fp32": _mean(hds),
        "hd95_undefined": sum(h is None for h in hds),
    }
    if reference is not None and any(r is not None for r in reference):
        d32, dq, h32, hq = [], [], [], []
        for f, q, r in zip(fp32_masks, quant_masks, reference):
            if r is None:
                continue
            d32.append(dice(f > 0, r > 0))
            dq.append(dice(q > 0, r > 0))
            h32.append(hd95(f > 0, r > 0))
            hq.append(hd95(q > 0, r > 0))
        report["dice_fp32"] = _mean(d32)
        report["dice_quantized"] = _mean(dq)
        report["dice_change"] = None if not d32 else float(np.mean(dq) - np.mean(d32))
        pairs = [(a, b) for a, b in zip(h32, hq) if a is not None and b is not None]
        report["hd95_fp32"] = _mean([a for a, _ in pairs])
        report["hd95_quantized"] = _mean([b for _, b in pairs])
        report["hd95_change"] = float(np.mean([b - a for a, b in pairs])) if pairs else None
    return report


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """||candidate - reference|| / ||reference|| over the whole array (float64)."""
    r = reference.astype(np.float64)
    return float(np.linalg.norm(candidate.astype(np.float64) - r) / (np.linalg.norm(r) + 1e-12))

"""Evaluation metrics in numpy: classification (accuracy, balanced accuracy, macro F1,
per-class recall, one-vs-rest AUC), segmentation (Dice, IoU, HD95) and probability
calibration (ECE, temperature fit: used by training and by the quantization report).

Decisions:

* AUC is the Mann-Whitney statistic computed from ranks, ties given their average rank
  (equal to the trapezoidal area under the ROC curve). One-vs-rest per class; the
  macro AUC averages the classes that have both positives and negatives in the split
  (a class absent from a small validation split has no AUC, reported as ``None``).
* Macro F1 and balanced accuracy average over the classes present in the labels, as
  scikit-learn does for recall; F1 of a class never predicted and never present is
  left out rather than counted as 0 or 1.
* Segmentation metrics are per image, then averaged (the ISIC challenge convention),
  on the lesion (foreground) class of binary masks. Dice and IoU of two empty masks
  are 1. HD95 follows MedPy's ``hd95``: the 95th percentile of the pooled symmetric
  surface distances in pixels, surfaces being the mask minus its 3x3 erosion, exact
  Euclidean distances from OpenCV's distance transform. It is undefined when exactly
  one mask is empty; such images are counted and left out of the mean.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """``C[i, j]`` = images of true class i predicted as j."""
    out = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(out, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
    return out


def binary_auc(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """Area under the ROC curve from ranks (ties averaged); None without both classes."""
    scores = np.asarray(scores, np.float64)
    positives = np.asarray(positives, bool)
    n_pos = int(positives.sum())
    n_neg = len(positives) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), np.float64)
    # average rank (1-based) within each run of equal scores
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    u = ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def class_rates(cm: np.ndarray) -> dict[str, np.ndarray]:
    """One-vs-rest rates per class from a confusion matrix (rows true, columns predicted).

    ``sensitivity`` (recall), ``specificity``, ``ppv`` (precision), ``npv`` and ``f1``,
    each NaN where its denominator is 0 (no positive, no negative, never predicted, ...).
    F1 is 2 TP / (2 TP + FP + FN), equal to the harmonic mean of PPV and sensitivity
    where both exist and 0 when a present class is never predicted correctly.
    """
    cm = np.asarray(cm, np.float64)
    total = cm.sum()
    tp = np.diag(cm)
    fn = cm.sum(1) - tp
    fp = cm.sum(0) - tp
    tn = total - tp - fn - fp

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.divide(num, den, out=np.full(len(tp), np.nan), where=den > 0)

    return {"sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp), "ppv": ratio(tp, tp + fp),
            "npv": ratio(tn, tn + fn), "f1": ratio(2 * tp, 2 * tp + fp + fn)}


def classification_metrics(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1, per-class recall and one-vs-rest AUC."""
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels, np.int64)
    k = len(class_names)
    pred = probs.argmax(1)
    cm = confusion_matrix(labels, pred, k)
    present = cm.sum(1) > 0
    rates = class_rates(cm)
    recall = rates["sensitivity"]
    f1 = np.nan_to_num(rates["f1"])
    aucs = [binary_auc(probs[:, c], labels == c) for c in range(k)]
    defined = [a for a in aucs if a is not None]
    return {
        "accuracy": float((pred == labels).mean()) if len(labels) else float("nan"),
        "balanced_accuracy": float(np.nanmean(recall)) if present.any() else float("nan"),
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
        "macro_auc": float(np.mean(defined)) if defined else None,
        "recall": {n: (None if np.isnan(r) else float(r)) for n, r in zip(class_names, recall)},
        "auc": dict(zip(class_names, aucs)),
        "confusion_matrix": cm.tolist(),
    }


def _surface(mask: np.ndarray) -> np.ndarray:
    import cv2

    m = mask.astype(np.uint8)
    return (m - cv2.erode(m, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)) > 0


def _distance_to(surface: np.ndarray) -> np.ndarray:
    import cv2

    # distanceTransform measures the distance to the nearest zero pixel
    return cv2.distanceTransform((~surface).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def hd95(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """95th percentile symmetric surface distance in pixels (MedPy convention)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if not pred.any() and not truth.any():
        return 0.0
    if not pred.any() or not truth.any():
        return None
    sp, st = _surface(pred), _surface(truth)
    d_pt = _distance_to(st)[sp]
    d_tp = _distance_to(sp)[st]
    return float(np.percentile(np.concatenate([d_pt, d_tp]), 95))


def dice_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks (nonzero = lesion); 1.0 when both are empty."""
    p, t = np.asarray(pred) > 0, np.asarray(truth) > 0
    total = float(p.sum() + t.sum())
    return 1.0 if total == 0 else 2 * float((p & t).sum()) / total


def segmentation_metrics(pred_masks: np.ndarray, true_masks: np.ndarray) -> dict[str, Any]:
    """Mean per-image Dice, IoU and HD95 of binary (lesion = nonzero) masks, N x H x W."""
    pred_masks = np.asarray(pred_masks) > 0
    true_masks = np.asarray(true_masks) > 0
    dice, iou, hd = [], [], []
    undefined = 0
    for p, t in zip(pred_masks, true_masks):
        inter = float((p & t).sum())
        union = float(p.sum() + t.sum()) - inter
        dice.append(dice_score(p, t))
        iou.append(1.0 if union == 0 else inter / union)
        h = hd95(p, t)
        if h is None:
            undefined += 1
        else:
            hd.append(h)
    return {
        "dice": float(np.mean(dice)) if dice else float("nan"),
        "iou": float(np.mean(iou)) if iou else float("nan"),
        "hd95": float(np.mean(hd)) if hd else None,
        "hd95_undefined_images": undefined,
    }


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al., 2017): sum_b |B|/N |acc_b - conf_b|."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (confidence > lo) & (confidence <= hi)
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(ece)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature minimising validation NLL (golden-section search over log T).

    T is kept in [0.25, 20]: when the validation split is perfectly separated the
    NLL keeps falling as T -> 0, and a device should not be taught certainty from a
    few hundred images; at the other end, T = 20 already flattens any trained
    classifier to near-uniform, so a larger optimum means the model did not learn.
    """
    logits = np.asarray(logits, np.float64)

    def nll(log_t: float) -> float:
        z = logits / math.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(labels)), labels].mean())

    lo, hi = math.log(0.25), math.log(20.0)
    golden = (math.sqrt(5) - 1) / 2
    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    for _ in range(60):
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
        a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    return math.exp((lo + hi) / 2)

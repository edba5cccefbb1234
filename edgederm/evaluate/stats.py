"""Clinical metrics of evaluated cases, with seeded bootstrap confidence intervals.

Every scalar metric has a flat name (``sensitivity[melanoma]``, ``auroc[nevus]``,
``auroc`` for the macro mean, ``ece``, ``malignant_sensitivity``, ...): the report,
the JSON, the subgroup tables and ``quantize --gate`` all speak these names.

Decisions:

* Intervals are percentile bootstrap intervals (Efron & Tibshirani 1993): cases are
  resampled with replacement ``n_boot`` times from a generator seeded by ``seed``, the
  metric recomputed on each replicate, and the 2.5% and 97.5% quantiles taken. A
  replicate where a metric is undefined (no positive of a class drawn) is left out of
  that metric's quantiles.
* The malignant operating point is the device's: a case counts as flagged malignant
  when its top class is malignant or the runtime referred it with
  ``possible_malignancy`` (the bundle's P(malignant) threshold), so the sensitivity
  reported is what a clinician using the device gets.
* The building blocks are edgederm.metrics (confusion matrix, one-vs-rest rates,
  rank AUC, ECE, Dice/IoU/HD95); this module adds intervals, referral and subgroups.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from edgederm.metrics import binary_auc, class_rates, confusion_matrix, expected_calibration_error

ECE_BINS = 15


@dataclass
class Cases:
    """The classification outcome of evaluated cases, as arrays (one row per case)."""

    class_names: list[str]
    labels: np.ndarray  # int64, true class index
    probabilities: np.ndarray  # N x K, calibrated, as the runtime returned them
    predicted: np.ndarray  # int64, the runtime's label
    needs_review: np.ndarray  # bool
    reasons: list[list[str]]  # reason codes (the part before ':')
    malignant: list[str]  # the malignant class names
    flagged_malignant: np.ndarray  # bool: the device's malignant call (module docstring)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def malignant_truth(self) -> np.ndarray:
        idx = [self.class_names.index(c) for c in self.malignant]
        return np.isin(self.labels, idx)

    def take(self, idx: np.ndarray) -> Cases:
        return Cases(self.class_names, self.labels[idx], self.probabilities[idx], self.predicted[idx],
                     self.needs_review[idx], [self.reasons[i] for i in idx], self.malignant,
                     self.flagged_malignant[idx])

    @classmethod
    def from_records(cls, rows: Sequence[Mapping[str, Any]], class_names: Sequence[str],
                     malignant: Sequence[str]) -> Cases:
        names = list(class_names)
        mal = set(malignant)
        reasons = [[r.split(":", 1)[0] for r in row["review_reasons"]] for row in rows]
        predicted = np.array([names.index(row["predicted"]) for row in rows], np.int64)
        flagged = np.array([names[p] in mal or "possible_malignancy" in rs for p, rs in zip(predicted, reasons)], bool)
        probs = np.array([[row["probabilities"][c] for c in names] for row in rows], np.float64).reshape(-1, len(names))
        return cls(names, np.array([names.index(row["label"]) for row in rows], np.int64), probs, predicted,
                   np.array([bool(row["needs_review"]) for row in rows], bool), reasons, list(malignant), flagged)


def _nan_none(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: mean over cases of sum_k (p_k - [y = k])^2 (Brier 1950)."""
    onehot = np.eye(probs.shape[1])[labels]
    return float(((probs - onehot) ** 2).sum(1).mean()) if len(labels) else float("nan")


def point_metrics(cases: Cases) -> dict[str, float]:
    """Every scalar classification, calibration and referral metric of ``cases`` (NaN: undefined)."""
    k = len(cases.class_names)
    out: dict[str, float] = {}
    n = len(cases)
    cm = confusion_matrix(cases.labels, cases.predicted, k)
    rates = class_rates(cm)
    for name, values in rates.items():
        for c, v in zip(cases.class_names, values):
            out[f"{name}[{c}]"] = float(v)
    present = cm.sum(1) > 0
    out["accuracy"] = float(np.trace(cm) / n) if n else float("nan")
    out["balanced_accuracy"] = float(np.nanmean(rates["sensitivity"])) if present.any() else float("nan")
    out["macro_f1"] = float(np.nanmean(rates["f1"][present])) if present.any() else float("nan")
    aucs = [_nan_none(binary_auc(cases.probabilities[:, c], cases.labels == c)) for c in range(k)]
    for c, a in zip(cases.class_names, aucs):
        out[f"auroc[{c}]"] = a
    defined = [a for a in aucs if not math.isnan(a)]
    out["auroc"] = float(np.mean(defined)) if defined else float("nan")
    out["ece"] = expected_calibration_error(cases.probabilities, cases.labels, ECE_BINS) if n else float("nan")
    out["brier"] = brier_score(cases.probabilities, cases.labels)
    truth = cases.malignant_truth
    if cases.malignant:
        out["malignant_sensitivity"] = float(cases.flagged_malignant[truth].mean()) if truth.any() else float("nan")
        out["malignant_specificity"] = float((~cases.flagged_malignant[~truth]).mean()) if (~truth).any() else float("nan")
    out["review_rate"] = float(cases.needs_review.mean()) if n else float("nan")
    return out


def bootstrap(statistic: Callable[[np.ndarray], Mapping[str, float]], n: int, n_boot: int, seed: int,
              level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of every metric ``statistic(indices)`` returns."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        for name, value in statistic(rng.integers(0, n, n)).items():
            draws.setdefault(name, []).append(value)
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out = {}
    for name, values in draws.items():
        arr = np.asarray(values, np.float64)
        arr = arr[~np.isnan(arr)]
        out[name] = (float(np.percentile(arr, lo_q)), float(np.percentile(arr, hi_q))) if len(arr) else (math.nan, math.nan)
    return out


def metrics_with_ci(cases: Cases, n_boot: int, seed: int) -> dict[str, dict[str, Any]]:
    """``{metric: {"value", "ci": [lo, hi]}}`` for :func:`point_metrics`."""
    values = point_metrics(cases)
    intervals = bootstrap(lambda idx: point_metrics(cases.take(idx)), len(cases), n_boot, seed) if n_boot and len(cases) else {}
    return {name: {"value": _json_float(v), "ci": [_json_float(x) for x in intervals.get(name, (math.nan, math.nan))]}
            for name, v in values.items()}


def _json_float(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def reliability(cases: Cases, bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """Per equal-width confidence bin: cases, mean confidence, accuracy (the ECE's bins)."""
    confidence = cases.probabilities.max(1)
    correct = cases.probabilities.argmax(1) == cases.labels
    edges = np.linspace(0, 1, bins + 1)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (confidence > lo) & (confidence <= hi)
        rows.append({"lo": float(lo), "hi": float(hi), "n": int(sel.sum()),
                     "confidence": float(confidence[sel].mean()) if sel.any() else None,
                     "accuracy": float(correct[sel].mean()) if sel.any() else None})
    return rows


def roc_curves(cases: Cases) -> dict[str, dict[str, list[float]]]:
    """One-vs-rest ROC points per class (thresholds at every distinct score)."""
    out = {}
    for c, name in enumerate(cases.class_names):
        pos = cases.labels == c
        if not pos.any() or pos.all():
            continue
        scores = cases.probabilities[:, c]
        order = np.argsort(-scores, kind="mergesort")
        s, p = scores[order], pos[order]
        last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # end of each run of equal scores
        tps, fps = np.cumsum(p)[last], np.cumsum(~p)[last]
        out[name] = {"fpr": [0.0] + (fps / (~pos).sum()).tolist(), "tpr": [0.0] + (tps / pos.sum()).tolist()}
    return out


def referral(cases: Cases) -> dict[str, Any]:
    """Referral rate per reason; accuracy and malignant sensitivity on accepted vs referred; coverage-risk."""
    n = len(cases)
    counts: dict[str, int] = {}
    for rs in cases.reasons:
        for r in set(rs):
            counts[r] = counts.get(r, 0) + 1
    correct = cases.predicted == cases.labels
    truth = cases.malignant_truth

    def part(sel: np.ndarray) -> dict[str, Any]:
        mal = sel & truth
        return {"n": int(sel.sum()), "accuracy": _json_float(correct[sel].mean()) if sel.any() else None,
                "malignant_sensitivity": _json_float(cases.flagged_malignant[mal].mean()) if mal.any() else None}

    confidence = cases.probabilities.max(1)
    order = np.argsort(-confidence, kind="mergesort")
    kept = np.arange(1, n + 1)
    risk = np.cumsum(~correct[order]) / kept
    step = max(1, n // 200)  # at most ~200 points in the JSON and the plot
    idx = np.r_[np.arange(step - 1, n, step), n - 1] if n else np.array([], int)
    idx = np.unique(idx)
    return {
        "rate": {r: c / n for r, c in sorted(counts.items())} if n else {},
        "any": float(cases.needs_review.mean()) if n else None,
        "accepted": part(~cases.needs_review), "referred": part(cases.needs_review),
        "coverage_risk": {"coverage": (kept[idx] / n).tolist(), "risk": risk[idx].tolist(),
                          "confidence": confidence[order][idx].tolist()},
    }


def segmentation_summary(per_image: Sequence[Mapping[str, Any]], n_boot: int, seed: int) -> dict[str, Any]:
    """Mean Dice, IoU and HD95 with bootstrap intervals, from per-image figures."""
    out: dict[str, Any] = {"images": len(per_image)}
    for name in ("dice", "iou", "hd95"):
        values = np.array([row[name] for row in per_image if row.get(name) is not None], np.float64)
        if not len(values):
            out[name] = {"value": None, "ci": [None, None], "median": None}
            continue
        ci = bootstrap(lambda idx: {name: float(values[idx].mean())}, len(values), n_boot, seed)[name] if n_boot else (math.nan, math.nan)
        out[name] = {"value": float(values.mean()), "ci": [_json_float(x) for x in ci],
                     "median": float(np.median(values))}
    out["hd95_undefined_images"] = sum(row.get("hd95") is None for row in per_image)
    return out

"""Temperature and review thresholds refitted for a reduced-precision graph.

An INT8 or fp16 graph's logits are not the fp32 graph's: its probabilities can be
over- or under-confident at the fp32 temperature, and the P(malignant) threshold that
kept 95% sensitivity in fp32 may keep less. ``quantize`` therefore refits, on the
labelled evaluation split and with the same procedure training uses on its validation
split (``edgederm.training.clinical.fit_operating_point``):

* the temperature (NLL minimised, Guo et al. 2017);
* the malignant threshold: the highest P(malignant) threshold that still flags
  ``target_sensitivity`` of the malignant images;
* the low-confidence threshold: chosen so the graph refers the same share of the
  split for low confidence as fp32 does with its threshold (the fp32 threshold is a
  policy, not a fit; matching its referral rate keeps the policy's workload).

They are stored per precision (``clinical.precisions.<precision>`` in manifest.json)
and the runtime uses the chosen precision's own values. Fitted and measured on the
same split, the ECE after refitting is an in-sample figure, as training's is.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from edgederm.metrics import expected_calibration_error
from edgederm.runtime.bundle import Clinical
from edgederm.runtime.probabilities import softmax
from edgederm.training.clinical import fit_operating_point


def refit_clinical(fp32_logits: np.ndarray, logits: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                   clinical: Clinical) -> tuple[dict[str, float], dict[str, Any]]:
    """(the precision's own settings, a report with ECE before and after) from eval-split logits."""
    labels = np.asarray(labels, np.int64)
    settings = clinical.settings
    malignant = [c for c in settings.get("malignant_classes") or [] if c in class_names]
    target = float(settings.get("target_sensitivity", 0.95))
    temperature, probs, operating = fit_operating_point(logits, labels, class_names, malignant, target)
    fp32_probs = softmax(fp32_logits, clinical.temperature)
    before = softmax(logits, clinical.temperature)
    referred = float(np.mean(fp32_probs.max(1) < clinical.review_threshold))
    review_threshold = (float(np.quantile(probs.max(1), referred)) if 0.0 < referred < 1.0
                        else clinical.review_threshold)
    own: dict[str, float] = {"temperature": float(temperature), "review_threshold": review_threshold}
    if operating and operating["threshold"] is not None and settings.get("malignant_threshold") is not None:
        own["malignant_threshold"] = float(operating["threshold"])
    report = {
        "images": int(len(labels)),
        "temperature_fp32": clinical.temperature, "temperature": float(temperature),
        "ece_fp32": expected_calibration_error(fp32_probs, labels),
        "ece_before": expected_calibration_error(before, labels),
        "ece_after": expected_calibration_error(probs, labels),
        "review_threshold_fp32": clinical.review_threshold, "review_threshold": review_threshold,
        "low_confidence_rate_fp32": referred,
        "malignant_threshold_fp32": settings.get("malignant_threshold"),
        "malignant_threshold": own.get("malignant_threshold"),
        "note": "fitted and measured on the labelled evaluation split (in-sample)",
    }
    return own, report


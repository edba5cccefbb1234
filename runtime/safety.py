"""When the device should not trust itself: ``needs_review`` reason codes (numpy only).

``review(probs, class_names, clinical, image_stats)`` returns the reasons a result
needs a clinician's review; the runtime sets ``needs_review = bool(reasons)``. The
``clinical`` section of the bundle (written at training, see ``edgederm.train``)
holds every threshold, so the rules are data, not code:

``low_confidence:<p>< <t>``
    top calibrated probability below ``review_threshold``.
``possible_malignancy:<p>>=<t>``
    the top class is benign but P(malignant) - the summed calibrated probability of
    ``malignant_classes`` - is at least ``malignant_threshold``. Training picks that
    threshold on the validation split as the highest one that still flags at least
    ``target_sensitivity`` (default 0.95) of the malignant validation images, i.e. a
    screening operating point: a missed melanoma costs more than a second look.
``review_class:<name>:rank<k>:<p>``
    a rare or safety-listed class (``review_classes``; e.g. vascular lesions, which a
    published model scored 0% on) is first, or second with probability at least
    ``review_class_min_probability`` (default 0.1).
``not_skin:<feature>=<v><op><bound>[,...]``
    the input's colour statistics lie outside the range seen in training
    (``clinical.image_reference``), or outside fixed generic ranges when the bundle
    has none. A cheap out-of-distribution check on image statistics, not on an
    embedding: it runs before nothing else is known and costs < 1 ms. It catches the
    gross failures a device meets (lens cap, a blue drape, a page of text, sensor
    noise, a photo of something else), not subtle shift.

Image statistics (computed on the whole image area-resized to 64 x 64, so they do
not depend on resolution):

* ``skin_fraction``: pixels inside the YCrCb skin box Cr in [133, 173], Cb in
  [77, 127] (Chai & Ngan, 1999); the box holds light to dark skin tones.
* ``colorfulness``: Hasler & Suesstrunk (2003), ``sigma_rgyb + 0.3 mu_rgyb``.
* ``saturation`` and ``brightness``: mean HSV S and V on the 0..1 scale.
* ``roughness``: mean absolute Laplacian of the grey image over its standard
  deviation: how much of the contrast is pixel-to-pixel. Skin and lesions vary
  smoothly (synthetic dermoscopy <= 0.95), sensor noise does not (>= 3).
* ``channel_correlation``: mean Pearson correlation of the R, G and B values over the
  pixels (1 for a constant image). Skin varies mostly in brightness (>= 0.5); noise
  has independent channels (~0).

The fitted reference is the [0.5%, 99.5%] quantile range of the training images,
widened by 25% of its width on each side and clipped to the feature's natural range;
with fewer than 20 training images no reference is fitted and the generic ranges are
used (they were set wide around synthetic and public dermoscopy: see FIXED_RANGES).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import cv2
import numpy as np

__all__ = [
    "FIXED_RANGES", "KNOWN_MALIGNANT", "default_malignant_classes", "fit_image_reference", "image_statistics",
    "malignant_probability", "malignant_threshold", "not_skin_reasons", "review",
]

# Class names (lower case) treated as malignant when training does not say otherwise:
# melanoma, basal and squamous cell carcinoma, and actinic keratosis / intraepithelial
# carcinoma (HAM10000's akiec, PAD-UFES-20's ACK), which are precancerous or in situ
# and referred the same way. Abbreviations as ISIC 2019, HAM10000 and PAD-UFES-20 spell them.
KNOWN_MALIGNANT = frozenset({
    "melanoma", "mel", "basal_cell_carcinoma", "basal cell carcinoma", "bcc", "squamous_cell_carcinoma",
    "squamous cell carcinoma", "scc", "akiec", "ak", "ack", "actinic_keratosis", "actinic keratosis",
    "malignant",
})

# Generic ranges for when a bundle has no fitted reference: wide enough for dermoscopy
# of all skin tones with a dark vignette, narrow enough for plain colours, text and noise.
FIXED_RANGES: dict[str, tuple[float, float]] = {
    "skin_fraction": (0.15, 1.0),
    "colorfulness": (5.0, 110.0),
    "saturation": (0.05, 0.85),
    "brightness": (0.08, 0.98),
    "roughness": (0.0, 2.0),
    "channel_correlation": (0.2, 1.0),
}
_NATURAL = {"skin_fraction": (0.0, 1.0), "colorfulness": (0.0, math.inf), "saturation": (0.0, 1.0),
            "brightness": (0.0, 1.0), "roughness": (0.0, math.inf), "channel_correlation": (-1.0, 1.0)}
_STATS_SIDE = 64


def image_statistics(image: np.ndarray) -> dict[str, float]:
    """Colour and texture statistics of an H x W x 3 uint8 RGB image (see module docstring)."""
    small = cv2.resize(np.ascontiguousarray(image[..., :3]), (_STATS_SIDE, _STATS_SIDE), interpolation=cv2.INTER_AREA)
    ycrcb = cv2.cvtColor(small, cv2.COLOR_RGB2YCrCb)
    cr, cb = ycrcb[..., 1], ycrcb[..., 2]
    skin = (cr >= 133) & (cr <= 173) & (cb >= 77) & (cb <= 127)
    rgb = small.astype(np.float64)
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    colorfulness = math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean())
    hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
    grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    roughness = float(np.abs(cv2.Laplacian(grey, cv2.CV_32F, ksize=1)).mean() / (grey.std() + 1e-3))
    pixels = rgb.reshape(-1, 3)
    stds = pixels.std(axis=0)
    if (stds < 1e-6).any():
        correlation = 1.0  # a flat channel carries no structure to disagree with
    else:
        c = np.corrcoef(pixels.T)
        correlation = float((c[0, 1] + c[1, 2] + c[0, 2]) / 3)
    return {
        "skin_fraction": float(skin.mean()),
        "colorfulness": float(colorfulness),
        "saturation": float(hsv[..., 1].mean() / 255.0),
        "brightness": float(hsv[..., 2].mean() / 255.0),
        "roughness": roughness,
        "channel_correlation": correlation,
    }


def fit_image_reference(stats: Iterable[Mapping[str, float]], quantiles: tuple[float, float] = (0.005, 0.995),
                        margin: float = 0.25, min_images: int = 20) -> dict[str, Any] | None:
    """Per-feature accepted range from training images' statistics; None if too few images."""
    rows = list(stats)
    if len(rows) < min_images:
        return None
    ranges = {}
    for name, (lo_nat, hi_nat) in _NATURAL.items():
        values = np.array([r[name] for r in rows], np.float64)
        lo, hi = np.quantile(values, quantiles)
        width = hi - lo
        ranges[name] = [float(max(lo_nat, lo - margin * width)), float(min(hi_nat, hi + margin * width))]
    return {"method": "quantile_range", "quantiles": list(quantiles), "margin": margin, "images": len(rows),
            "ranges": ranges}


def not_skin_reasons(image_stats: Mapping[str, float], reference: Mapping[str, Any] | None = None) -> list[str]:
    """``["not_skin:..."]`` when a statistic is outside its range, else ``[]``."""
    ranges = (reference or {}).get("ranges") or FIXED_RANGES
    failed = []
    for name, (lo, hi) in ranges.items():
        if name not in image_stats:
            continue
        value = float(image_stats[name])
        if value < lo:
            failed.append(f"{name}={value:.3g}<{lo:.3g}")
        elif value > hi:
            failed.append(f"{name}={value:.3g}>{hi:.3g}")
    return ["not_skin:" + ",".join(failed)] if failed else []


def default_malignant_classes(class_names: Sequence[str]) -> list[str]:
    """The classes whose name is a known malignant diagnosis (KNOWN_MALIGNANT)."""
    return [c for c in class_names if c.lower() in KNOWN_MALIGNANT]


def malignant_probability(probs: np.ndarray, class_names: Sequence[str], malignant_classes: Sequence[str]) -> np.ndarray:
    """Summed probability of the malignant classes, per row (or a scalar for one vector)."""
    idx = [list(class_names).index(c) for c in malignant_classes if c in class_names]
    return np.asarray(probs)[..., idx].sum(axis=-1)


def malignant_threshold(p_malignant: np.ndarray, is_malignant: np.ndarray, target_sensitivity: float = 0.95) -> dict[str, Any]:
    """Highest threshold on P(malignant) that flags >= ``target_sensitivity`` of the malignant images.

    Returns the threshold with the sensitivity and specificity it reaches on the data
    given (the validation split), or ``threshold=None`` when there is no malignant
    image to choose it on.
    """
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1]; got {target_sensitivity}")
    p = np.asarray(p_malignant, np.float64)
    pos = np.asarray(is_malignant, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0:
        return {"threshold": None, "target_sensitivity": target_sensitivity, "positives": 0, "negatives": n_neg}
    scores = np.sort(p[pos])[::-1]
    k = max(1, math.ceil(target_sensitivity * n_pos - 1e-9))  # positives that must be at or above the threshold
    threshold = float(scores[k - 1])
    flagged = p >= threshold
    return {
        "threshold": threshold, "target_sensitivity": target_sensitivity,
        "sensitivity": float(flagged[pos].mean()),
        "specificity": float((~flagged[~pos]).mean()) if n_neg else None,
        "positives": n_pos, "negatives": n_neg,
    }


def review(probs: np.ndarray, class_names: Sequence[str], clinical: Mapping[str, Any],
           image_stats: Mapping[str, float] | None = None) -> list[str]:
    """Reason codes for one calibrated probability vector (see module docstring)."""
    probs = np.asarray(probs, np.float64)
    order = np.argsort(-probs, kind="stable")
    top = int(order[0])
    reasons = []
    threshold = float(clinical.get("review_threshold", 0.0) or 0.0)
    if probs[top] < threshold:
        reasons.append(f"low_confidence:{probs[top]:.2f}<{threshold:.2f}")
    malignant = list(clinical.get("malignant_classes") or [])
    m_threshold = clinical.get("malignant_threshold")
    if malignant and m_threshold is not None and class_names[top] not in malignant:
        p_mal = float(malignant_probability(probs, class_names, malignant))
        if p_mal >= float(m_threshold):
            reasons.append(f"possible_malignancy:{p_mal:.2f}>={float(m_threshold):.2f}")
    # A safety-listed class (rare, or one models are known to miss, e.g. vascular
    # lesions) triggers review when it is the top class, or second with a
    # probability that is not negligible.
    floor = float(clinical.get("review_class_min_probability", 0.1))
    listed = set(clinical.get("review_classes") or [])
    for rank, idx in enumerate(order[:2]):
        name = class_names[int(idx)]
        if name in listed and (rank == 0 or probs[idx] >= floor):
            reasons.append(f"review_class:{name}:rank{rank + 1}:{probs[idx]:.2f}")
    if image_stats is not None and clinical.get("ood_check", True):
        reasons += not_skin_reasons(image_stats, clinical.get("image_reference"))
    return reasons

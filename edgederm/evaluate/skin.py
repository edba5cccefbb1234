"""Skin tone of a case: Fitzpatrick type from the metadata, else the individual typology angle.

Fitzpatrick phototype (I-VI) is what dermatology datasets record when they record a
skin tone at all (PAD-UFES-20's ``fitspatrick``, the synthetic set's ``skin_tone``).
When it is missing the tone is measured on the image: the individual typology angle
(ITA, Chardon et al. 1991) of the healthy skin around the lesion,

    ITA = atan((L* - 50) / b*) * 180 / pi        (CIE L*a*b*, D65)

with the categories of Del Bino & Bernerd (2013): very light > 55 deg, light 41-55,
intermediate 28-41, tan 10-28, brown -30-10, dark < -30.

Decisions taken where the method is silent:

* Healthy skin is a ring around the lesion: the lesion mask dilated by 15% of the
  image's short side, minus the mask dilated by 3% (the blurred lesion edge). Without
  a mask, the ring between the central half of the image (where dermoscopy centres the
  lesion) and the inscribed circle at 95% of its radius (outside it, a dermoscope's
  dark vignette).
* Hair, shadows and lesion pixels that leak into the ring are darker than skin, so
  the darkest 30% of the ring (by L*) is dropped; the median L* and b* of the rest
  give the angle (medians: specular highlights do not move them).
* ``atan2(L* - 50, b*)`` equals the formula for b* > 0 (every skin colour) and stays
  defined at b* = 0.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import cv2
import numpy as np

#: (lower bound in degrees, category), from the lightest; the last one takes everything below.
ITA_CATEGORIES: tuple[tuple[float, str], ...] = (
    (55.0, "very light"), (41.0, "light"), (28.0, "intermediate"), (10.0, "tan"), (-30.0, "brown"),
    (-math.inf, "dark"),
)
#: Metadata fields that hold a Fitzpatrick type, tried in this order.
FITZPATRICK_FIELDS = ("fitzpatrick", "fitspatrick", "fitzpatrick_skin_type", "skin_tone", "skin_type")
_ROMAN = ("I", "II", "III", "IV", "V", "VI")
METHOD = ("Skin tone: the Fitzpatrick type from the metadata when present; otherwise the individual typology "
          "angle ITA = atan((L*-50)/b*)*180/pi of the healthy skin around the lesion (a ring 3%-15% of the short "
          "side outside the lesion mask, or between the central half and 95% of the inscribed circle without a "
          "mask; darkest 30% of the ring dropped as hair and shadow; medians of L* and b*), in the categories of "
          "Del Bino & Bernerd (2013): very light > 55, light 41-55, intermediate 28-41, tan 10-28, brown -30-10, "
          "dark < -30 degrees.")


def ita_category(angle: float) -> str:
    return next(name for bound, name in ITA_CATEGORIES if angle > bound)


def fitzpatrick(metadata: Mapping[str, Any]) -> str | None:
    """``"Fitzpatrick III"`` from a metadata value 1-6 or I-VI, or None."""
    for name in FITZPATRICK_FIELDS:
        value = metadata.get(name)
        if value is None or isinstance(value, bool):
            continue
        text = str(value).strip().upper()
        if text.endswith(".0"):
            text = text[:-2]
        if text.isdigit() and 1 <= int(text) <= 6:
            return f"Fitzpatrick {_ROMAN[int(text) - 1]}"
        if text in _ROMAN:
            return f"Fitzpatrick {text}"
    return None


def healthy_skin(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Boolean H x W selection of the ring of healthy skin around the lesion."""
    height, width = image.shape[:2]
    side = min(height, width)
    if mask is not None and mask.any():
        lesion = (mask > 0).astype(np.uint8)

        def grow(fraction: float) -> np.ndarray:
            r = max(1, int(round(fraction * side)))
            return cv2.dilate(lesion, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))) > 0

        ring = grow(0.15) & ~grow(0.03)
        if ring.sum() >= 16:
            return ring
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx = (height - 1) / 2, (width - 1) / 2
    inside_circle = (yy - cy) ** 2 + (xx - cx) ** 2 <= (0.95 * side / 2) ** 2
    centre = (np.abs(yy - cy) <= height / 4) & (np.abs(xx - cx) <= width / 4)
    return inside_circle & ~centre


def individual_typology_angle(image: np.ndarray, mask: np.ndarray | None = None) -> float:
    """ITA in degrees of the healthy skin of an RGB uint8 image (module docstring)."""
    lab = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)  # L* 0..100, a*, b* unscaled
    pixels = lab[healthy_skin(image, mask)]
    if len(pixels) == 0:
        pixels = lab.reshape(-1, 3)
    lightness = pixels[:, 0]
    kept = pixels[lightness >= np.percentile(lightness, 30)]
    l_star, b_star = float(np.median(kept[:, 0])), float(np.median(kept[:, 2]))
    return math.degrees(math.atan2(l_star - 50.0, b_star))


def skin_tone(metadata: Mapping[str, Any], image: np.ndarray, mask: np.ndarray | None = None) -> dict[str, Any]:
    """``{"skin_tone": group, "skin_tone_source": "metadata" | "ita", "ita": degrees}``."""
    angle = individual_typology_angle(image, mask)
    recorded = fitzpatrick(metadata)
    if recorded is not None:
        return {"skin_tone": recorded, "skin_tone_source": "metadata", "ita": angle}
    return {"skin_tone": f"ITA {ita_category(angle)}", "skin_tone_source": "ita", "ita": angle}

"""Pictures of a result: the mask outline and the heatmap drawn over the image.

``edgederm predict --overlay out.png`` writes one; device apps can call
:func:`draw_overlay` for a preview. numpy + OpenCV only, like the rest of the runtime.

Decisions:

* The heatmap is blended with a weight proportional to the probability
  (``alpha x heat``), so skin the model is sure about stays as photographed and
  only what it looked at is tinted (colour map JET: blue low, red high).
* The outline is the mask's external and hole contours (``cv2.findContours``,
  ``RETR_LIST``), in one bright colour, with a thickness that grows with the image
  (1 px per 512 px of the shorter side, at least 1) so it stays visible on a
  downscaled view of an 8192 px image.
* Blending runs in bands of rows: a float copy of an 8192x8192 RGB image would be
  768 MB, a band of 512 rows is 48 MB at most.
* The PNG is written atomically (temp file + rename), like every writer here.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from .bundle import write_bytes_atomic
from .errors import InputError
from .imageio import as_rgb_uint8

__all__ = ["draw_overlay", "write_overlay"]

OUTLINE_RGB = (255, 255, 0)  # yellow: visible on skin, on the JET tint and on dark lesions
_BAND_ROWS = 512


def _check_plane(plane: np.ndarray | None, shape: tuple[int, int], name: str) -> np.ndarray | None:
    if plane is None:
        return None
    if not isinstance(plane, np.ndarray) or plane.shape != shape:
        raise InputError(f"{name}: received shape {getattr(plane, 'shape', type(plane).__name__)}; "
                         f"expected {shape} (the image's height x width)")
    return plane


def draw_overlay(image: np.ndarray, mask: np.ndarray | None = None, heatmap: np.ndarray | None = None,
                 alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 copy of ``image`` with ``heatmap`` (H x W in [0, 1]) tinted and ``mask`` outlined."""
    rgb = as_rgb_uint8(image, "image")
    shape = rgb.shape[:2]
    mask = _check_plane(mask, shape, "mask")
    heatmap = _check_plane(heatmap, shape, "heatmap")
    if not 0.0 <= float(alpha) <= 1.0:
        raise InputError(f"alpha={alpha!r}; expected a number in [0, 1]")
    out = rgb.copy()
    if heatmap is not None:
        for top in range(0, shape[0], _BAND_ROWS):
            rows = slice(top, min(top + _BAND_ROWS, shape[0]))
            heat = np.clip(np.nan_to_num(heatmap[rows].astype(np.float32, copy=False)), 0.0, 1.0)
            colour = cv2.cvtColor(cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET),
                                  cv2.COLOR_BGR2RGB)
            weight = (heat * float(alpha))[..., None]
            band = out[rows].astype(np.float32)
            band += (colour.astype(np.float32) - band) * weight
            out[rows] = np.clip(band + 0.5, 0, 255).astype(np.uint8)
    if mask is not None:
        binary = (mask > 0).astype(np.uint8)
        contours, _ = cv2.findContours(binary, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        thickness = max(1, min(shape) // 512)
        cv2.drawContours(out, contours, -1, OUTLINE_RGB, thickness, lineType=cv2.LINE_8)
    return out


def write_overlay(path: str | os.PathLike[str], image: np.ndarray, mask: np.ndarray | None = None,
                  heatmap: np.ndarray | None = None, alpha: float = 0.45) -> Path:
    """Draw the overlay and write it as PNG to ``path`` (atomically)."""
    path = Path(path)
    picture = draw_overlay(image, mask, heatmap, alpha)
    ok, data = cv2.imencode(".png", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    if not ok:
        raise InputError(f"OpenCV could not encode a {picture.shape} overlay as PNG")
    return write_bytes_atomic(path, data.tobytes())

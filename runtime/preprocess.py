"""Preprocessing: the pixels a model sees, identical in training and on the device.

This module lives in the on-device runtime (numpy + OpenCV only) and training imports
it from here, so the images a model was trained on and the images it meets on the
dermoscope are produced by the same code: the same colour constancy, the same
interpolation, the same rounding. A bundle records a :class:`PreprocessConfig`
(``to_dict``) and the runtime rebuilds it (``from_dict``); nothing else decides
how an image is prepared.

Order of the steps (:func:`preprocess`), and why:

1. Colour constancy, from whole-image statistics (:func:`color_stats`). The
   statistics describe the lighting of the whole photo, so they are computed once per
   image, on a copy downsampled with ``cv2.INTER_AREA`` to at most 512 px a side,
   which costs little even at 8192x8192; tiles cut from the image are corrected
   with the statistics of the whole image, never their own. Both methods are
   per-channel affine maps of uint8 values, applied as a 256-entry lookup table:
   one pass, no float copy of a large image.
2. Hair removal (optional), at the input resolution, before any downsampling would
   blur thin hairs into the skin: black-hat morphology on the gray image finds
   thin dark structures, a threshold turns them into a mask, and Telea inpainting
   fills the mask from the surrounding skin (the DullRazor idea, Lee et al. 1997,
   in its common OpenCV form).
3. Resize to the model's input (stretch, letterbox, center crop or none).
4. Normalise to float32 CHW: ``(x / 255 - mean) / std``, one multiply-add per value.

Colour constancy methods:

- ``gray_world``: each channel is scaled so that its mean equals the mean of the
  three channel means (Buchsbaum 1980).
- ``gwsd`` (gray world with standard deviation): each channel is standardised and
  mapped to a common target, ``(x - mean_c) * target_std / std_c + target_mean``,
  clipped to 0..255. This is the colour normalisation described for TransXV2S-Net
  (skin lesion classification). The default targets, mu_G = 163.7 and
  sigma_G = 47.5, were taken from that article's code and have NOT been verified
  against the published article; a bundle stores the targets its model was trained
  with, and those are what the device uses.

Decisions where the sources are silent:

- Statistics are the population mean and standard deviation (ddof=0) of the
  downsampled copy. Downsampling averages away pixel-scale noise, so the standard
  deviation of a noisy image comes out slightly lower than at full resolution; the
  lighting, which is what colour constancy corrects, is low-frequency and unaffected.
- A channel whose standard deviation is below one grey level is not stretched (its
  std is taken as 1.0): there is no contrast to normalise, only quantisation noise
  that a 47x gain would amplify. A channel with a mean below 1e-6 (black) keeps gain
  1 in gray world.
- Values are rounded to nearest and clipped to 0..255 (uint8 in, uint8 out), so a
  corrected image can be stored, viewed and tiled like any other.
- ``center_crop`` crops the largest central region with the aspect ratio of the
  model input (a square for square inputs) and resizes it, so nothing is distorted.
- ``crop_fraction`` (timm's ``crop_pct``, torchvision's crop size / resize size)
  keeps only the central fraction of that region (``stretch``: of the whole image)
  before the resize. "Resize the shorter side to 256, crop the central 224" is
  ``center_crop`` with ``crop_fraction = 224 / 256``: the same pixels of the photo,
  resized once (one interpolation, at the model's size, instead of two).
- Shrinking uses ``cv2.INTER_AREA`` (no aliasing), enlarging ``cv2.INTER_LINEAR``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence, cast

import cv2
import numpy as np

from .errors import InputError
from .imageio import as_rgb_uint8
from .timings import Timings, timed

__all__ = [
    "RESIZE_POLICIES",
    "COLOR_CONSTANCY_METHODS",
    "PreprocessConfig",
    "ColorStats",
    "color_stats",
    "gray_world",
    "gwsd",
    "apply_color_constancy",
    "remove_hair",
    "resize_image",
    "normalize",
    "preprocess",
    "preprocess_batch",
]

RESIZE_POLICIES = ("stretch", "letterbox", "center_crop", "none")
COLOR_CONSTANCY_METHODS = ("none", "gray_world", "gwsd")

GWSD_TARGET_MEAN = 163.7
GWSD_TARGET_STD = 47.5

_MIN_CHANNEL_STD = 1.0  # grey levels; see "Decisions" above
_MIN_CHANNEL_MEAN = 1e-6


# --------------------------------------------------------------------------- config


@dataclass
class PreprocessConfig:
    """How an image becomes a model input; stored in the bundle's ``preprocess``."""

    input_size: tuple[int, int] = (224, 224)  # (H, W) the model takes
    resize: str = "stretch"  # one of RESIZE_POLICIES
    color_constancy: str = "none"  # one of COLOR_CONSTANCY_METHODS
    gwsd_target_mean: float = GWSD_TARGET_MEAN  # mu_G
    gwsd_target_std: float = GWSD_TARGET_STD  # sigma_G
    hair_removal: bool = False
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # on the 0..1 scale, RGB
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    crop_fraction: float = 1.0  # central share kept before resizing (stretch, center_crop)

    def __post_init__(self) -> None:
        # Validate on construction too, so a typo fails where it is written.
        self.input_size = _check_size("input_size", self.input_size)
        self.resize = _check_choice("resize", self.resize, RESIZE_POLICIES)
        self.color_constancy = _check_choice("color_constancy", self.color_constancy, COLOR_CONSTANCY_METHODS)
        self.gwsd_target_mean = _check_number("gwsd_target_mean", self.gwsd_target_mean, 0.0, 255.0,
                                              "a number in [0, 255]")
        self.gwsd_target_std = _check_number("gwsd_target_std", self.gwsd_target_std, 0.0, 255.0,
                                             "a number in (0, 255]", exclusive_low=True)
        if not isinstance(self.hair_removal, (bool, np.bool_)):
            raise InputError(
                f"preprocess config: hair_removal={self.hair_removal!r} ({type(self.hair_removal).__name__}); "
                "allowed: true or false"
            )
        self.hair_removal = bool(self.hair_removal)
        self.mean = _check_triple("mean", self.mean, positive=False)
        self.std = _check_triple("std", self.std, positive=True)
        self.crop_fraction = _check_number("crop_fraction", self.crop_fraction, 0.0, 1.0, "a number in (0, 1]",
                                           exclusive_low=True)
        if self.crop_fraction != 1.0 and self.resize not in ("stretch", "center_crop"):
            raise InputError(f"preprocess config: crop_fraction={self.crop_fraction} with resize={self.resize!r}; "
                             "a crop fraction applies to resize 'stretch' or 'center_crop'; use one of them or "
                             "crop_fraction=1.0")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists); ``from_dict`` reads it back."""
        return {
            "input_size": list(self.input_size),
            "resize": self.resize,
            "color_constancy": self.color_constancy,
            "gwsd_target_mean": self.gwsd_target_mean,
            "gwsd_target_std": self.gwsd_target_std,
            "hair_removal": self.hair_removal,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_fraction": self.crop_fraction,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessConfig:
        """Build and validate a config; missing keys take their defaults.

        An unknown key or a bad value raises :class:`InputError` naming the key,
        the value and what is allowed.
        """
        if not isinstance(data, Mapping):
            raise InputError(f"preprocess config: received {type(data).__name__}; expected a dict")
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise InputError(
                f"preprocess config: unknown key(s) {', '.join(repr(k) for k in unknown)}; "
                f"allowed keys: {', '.join(known)}"
            )
        return cls(**dict(data))


def _check_choice(key: str, value: Any, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise InputError(f"preprocess config: {key}={value!r}; allowed: {', '.join(repr(a) for a in allowed)}")
    return value


def _check_size(key: str, value: Any) -> tuple[int, int]:
    ok = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in value)
    )
    if not ok:
        raise InputError(f"preprocess config: {key}={value!r}; allowed: [height, width], two positive integers")
    return (int(value[0]), int(value[1]))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _check_number(key: str, value: Any, low: float, high: float, allowed: str,
                  exclusive_low: bool = False, where: str = "preprocess config") -> float:
    if not _is_number(value) or not math.isfinite(float(value)):
        raise InputError(f"{where}: {key}={value!r}; allowed: {allowed}")
    number = float(value)
    if number < low or number > high or (exclusive_low and number == low):
        raise InputError(f"{where}: {key}={value!r}; allowed: {allowed}")
    return number


def _check_triple(key: str, value: Any, positive: bool) -> tuple[float, float, float]:
    allowed = ("three positive numbers (R, G, B) on the 0..1 scale" if positive
               else "three numbers (R, G, B) on the 0..1 scale")
    if not isinstance(value, (tuple, list, np.ndarray)) or len(value) != 3:
        raise InputError(f"preprocess config: {key}={value!r}; allowed: {allowed}")
    numbers = []
    for v in value:
        if not _is_number(v) or not math.isfinite(float(v)) or (positive and float(v) <= 0):
            raise InputError(f"preprocess config: {key}={value!r}; allowed: {allowed}")
        numbers.append(float(v))
    return (numbers[0], numbers[1], numbers[2])


# --------------------------------------------------------------------------- colour


@dataclass(frozen=True, eq=False)
class ColorStats:
    """Per-channel (R, G, B) mean and standard deviation of a whole image, 0..255 scale."""

    mean: np.ndarray = field()
    std: np.ndarray = field()

    def __post_init__(self) -> None:
        for key in ("mean", "std"):
            value = np.array(getattr(self, key), dtype=np.float64).reshape(-1)
            if value.shape != (3,) or not np.all(np.isfinite(value)) or np.any(value < 0):
                raise InputError(f"ColorStats.{key}: received {getattr(self, key)!r}; "
                                 "expected three finite non-negative numbers (R, G, B)")
            value.setflags(write=False)
            object.__setattr__(self, key, value)

    def __repr__(self) -> str:
        return f"ColorStats(mean={np.round(self.mean, 2).tolist()}, std={np.round(self.std, 2).tolist()})"


def color_stats(image_uint8: np.ndarray, max_side: int = 512) -> ColorStats:
    """Channel means and standard deviations on a copy downsampled to ``max_side``.

    ``cv2.INTER_AREA`` averages the pixels it merges, so the mean is that of the full
    image (up to rounding) and the cost stays small at any resolution.
    """
    image = as_rgb_uint8(image_uint8)
    if not isinstance(max_side, (int, np.integer)) or isinstance(max_side, bool) or max_side < 1:
        raise InputError(f"color_stats: max_side={max_side!r}; expected a positive integer (default 512)")
    height, width = image.shape[:2]
    longest = max(height, width)
    if longest > max_side:
        scale = max_side / longest
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    mean, std = cv2.meanStdDev(image)
    return ColorStats(mean=mean.reshape(3), std=std.reshape(3))


def image_color_stats(image_uint8: np.ndarray, config: PreprocessConfig) -> ColorStats | None:
    """The whole-image statistics every tile or window of ``image`` is corrected with
    (tiles alone would each get their own colour cast); None without colour constancy."""
    return color_stats(image_uint8) if config.color_constancy != "none" else None


def _apply_channel_lut(image: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Apply per-channel maps given as float values for 0..255 (shape 256x3)."""
    lut = np.clip(np.rint(table), 0, 255).astype(np.uint8).reshape(1, 256, 3)
    return cv2.LUT(image, lut)


def gray_world(image_uint8: np.ndarray, stats: ColorStats | None = None) -> np.ndarray:
    """Scale each channel so its mean equals the mean of the three channel means."""
    image = as_rgb_uint8(image_uint8)
    stats = stats if stats is not None else color_stats(image)
    _check_stats(stats)
    channel_means = stats.mean
    gray = float(channel_means.mean())
    gains = np.where(channel_means > _MIN_CHANNEL_MEAN, gray / np.maximum(channel_means, _MIN_CHANNEL_MEAN), 1.0)
    levels = np.arange(256, dtype=np.float64)[:, None]
    return _apply_channel_lut(image, levels * gains[None, :])


def gwsd(
    image_uint8: np.ndarray,
    stats: ColorStats | None = None,
    target_mean: float = GWSD_TARGET_MEAN,
    target_std: float = GWSD_TARGET_STD,
) -> np.ndarray:
    """Per channel ``(x - mean_c) * target_std / std_c + target_mean``, clipped to 0..255."""
    image = as_rgb_uint8(image_uint8)
    target_mean = _check_number("target_mean", target_mean, 0.0, 255.0, "a number in [0, 255]", where="gwsd")
    target_std = _check_number("target_std", target_std, 0.0, 255.0, "a number in (0, 255]",
                               exclusive_low=True, where="gwsd")
    stats = stats if stats is not None else color_stats(image)
    _check_stats(stats)
    gains = target_std / np.maximum(stats.std, _MIN_CHANNEL_STD)
    levels = np.arange(256, dtype=np.float64)[:, None]
    return _apply_channel_lut(image, (levels - stats.mean[None, :]) * gains[None, :] + target_mean)


def apply_color_constancy(
    image_uint8: np.ndarray,
    method: str,
    stats: ColorStats | None = None,
    target_mean: float = GWSD_TARGET_MEAN,
    target_std: float = GWSD_TARGET_STD,
) -> np.ndarray:
    """Dispatch on ``method`` ("none" returns the validated input itself)."""
    if method == "none":
        return as_rgb_uint8(image_uint8)
    if method == "gray_world":
        return gray_world(image_uint8, stats)
    if method == "gwsd":
        return gwsd(image_uint8, stats, target_mean, target_std)
    raise InputError(f"color constancy method {method!r}; allowed: "
                     f"{', '.join(repr(m) for m in COLOR_CONSTANCY_METHODS)}")


def _check_stats(stats: object) -> None:
    if not isinstance(stats, ColorStats):
        raise InputError(f"stats: received {type(stats).__name__}; expected ColorStats from color_stats(image)")


# --------------------------------------------------------------------------- hair


def remove_hair(image_uint8: np.ndarray, kernel_size: int = 17, threshold: int = 10) -> np.ndarray:
    """Remove thin dark hairs: black-hat on gray, threshold, Telea inpainting.

    ``kernel_size`` (odd, pixels) must exceed the hair width at this image's
    resolution: the black-hat (closing minus image) responds to dark structures
    narrower than the kernel's arms. A cross kernel closes lines of every direction
    and costs far less than a filled square or ellipse of the same size.
    ``threshold`` is the black-hat response (grey levels) above which a pixel is
    taken as hair. Returns a new array; a copy of the input when no hair is found.

    The result is bit for bit that of ``cv2.morphologyEx(MORPH_BLACKHAT)`` with the
    cross and ``cv2.inpaint(..., HAIR_INPAINT_RADIUS, INPAINT_TELEA)`` on the whole
    image, computed faster (:func:`_inpaint_apart`).
    """
    image = as_rgb_uint8(image_uint8)
    if (not isinstance(kernel_size, (int, np.integer)) or isinstance(kernel_size, bool)
            or kernel_size < 3 or kernel_size % 2 == 0):
        raise InputError(f"remove_hair: kernel_size={kernel_size!r}; expected an odd integer >= 3 (default 17)")
    if not isinstance(threshold, (int, np.integer)) or isinstance(threshold, bool) or not 0 <= threshold < 255:
        raise InputError(f"remove_hair: threshold={threshold!r}; expected an integer in [0, 254] (default 10)")
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    kernel = cv2.getStructuringElement(cv2.MORPH_CROSS, (int(kernel_size), int(kernel_size)))
    blackhat = cv2.morphologyEx(gray, cv2.MORPH_BLACKHAT, kernel)
    _, mask = cv2.threshold(blackhat, int(threshold), 255, cv2.THRESH_BINARY)
    if not cv2.countNonZero(mask):
        return image.copy()
    return _inpaint_apart(image, mask, HAIR_INPAINT_RADIUS)


#: Telea inpainting radius of :func:`remove_hair` (pixels).
HAIR_INPAINT_RADIUS = 3
# Below this many pixels a whole-image inpaint is already cheap: split no further.
_SPLIT_MIN_PIXELS = 1024 * 1024
# Hair is grouped on a grid of cells this many pixels wide; see _inpaint_apart.
_SPLIT_CELL = 16
# Hair groups whose box fits a block of this many cells a side share one inpainting call.
_SPLIT_BLOCK = 16


def _inpaint_apart(image: np.ndarray, mask: np.ndarray, radius: int) -> np.ndarray:
    """``cv2.inpaint(image, mask, radius, INPAINT_TELEA)``, group by group, on OpenCV's threads.

    Telea's method fills a pixel from the pixels, flags and distances within
    ``radius + 1`` of it, and the distance field outside the hair reaches ``radius``
    beyond it; its queue orders pixels by distance, then by when they were queued,
    and neither order mixes groups that never see each other. So hair groups more
    than ``2 * radius + 1`` pixels apart are inpainted independently, each in a crop
    with a margin past everything it reads, and the result is the whole-image one
    bit for bit (tests compare them). Groups are the connected cells of a grid of
    ``_SPLIT_CELL`` px cells holding hair: cells of two groups are never neighbours,
    so their hair is at least ``_SPLIT_CELL + 1`` px apart. It pays because OpenCV
    sets up its work arrays for the whole image whatever the mask and runs on one
    thread; here the crops run on ``cv2.getNumThreads()`` threads (``cv2.inpaint``
    releases the GIL), the count a device app sets for OpenCV's own parallel loops.
    """
    height, width = mask.shape
    if height * width < _SPLIT_MIN_PIXELS:
        return cv2.inpaint(image, mask, radius, cv2.INPAINT_TELEA)
    cell = _SPLIT_CELL
    assert cell > 2 * radius + 1
    rows, cols = -(-height // cell), -(-width // cell)
    padded = np.zeros((rows * cell, cols * cell), np.uint8)
    padded[:height, :width] = mask
    cells = padded.reshape(rows * cell, cols, cell).max(axis=2).reshape(rows, cell, cols).max(axis=1)
    count, labels, boxes, _ = cv2.connectedComponentsWithStats(cells, connectivity=8, ltype=cv2.CV_32S)
    jobs: dict[tuple[int, ...], list[int]] = {}
    for group in range(1, count):
        x, y, w, h = (int(v) for v in boxes[group, :4])
        key = (y // _SPLIT_BLOCK, x // _SPLIT_BLOCK) if max(w, h) <= _SPLIT_BLOCK else (-1, group)
        jobs.setdefault(key, []).append(group)
    margin = 2 * radius + 4  # the ring outside the hair (radius), what its pixels read (radius + 1), spare
    out = image.copy()

    def inpaint(groups: list[int]) -> None:
        box = boxes[groups]
        cy0, cx0 = int(box[:, 1].min()), int(box[:, 0].min())
        cy1, cx1 = int((box[:, 1] + box[:, 3]).max()), int((box[:, 0] + box[:, 2]).max())
        wanted = np.zeros(count, bool)
        wanted[groups] = True
        group_cells = wanted[labels[cy0:cy1, cx0:cx1]]
        y0, x0 = max(0, cy0 * cell - margin), max(0, cx0 * cell - margin)
        y1, x1 = min(height, cy1 * cell + margin), min(width, cx1 * cell + margin)
        own = np.zeros((y1 - y0, x1 - x0), bool)  # these groups' hair in the crop
        top, left = cy0 * cell - y0, cx0 * cell - x0
        inner = own[top:top + (cy1 - cy0) * cell, left:left + (cx1 - cx0) * cell]
        inner[...] = np.repeat(np.repeat(group_cells, cell, axis=0), cell, axis=1)[:inner.shape[0], :inner.shape[1]]
        own &= mask[y0:y1, x0:x1] > 0
        filled = cv2.inpaint(image[y0:y1, x0:x1], own.view(np.uint8), radius, cv2.INPAINT_TELEA)
        out[y0:y1, x0:x1][own] = filled[own]  # groups are disjoint: no two crops write a pixel

    work = sorted(jobs.values(), key=lambda g: -int(boxes[g, 4].sum()))  # largest first: balanced threads
    threads = min(max(1, cv2.getNumThreads()), len(work))
    if threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(inpaint, work))
    else:
        for groups in work:
            inpaint(groups)
    return out


# --------------------------------------------------------------------------- resize


def _interpolation(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> int:
    shrinking = dst_hw[0] < src_hw[0] or dst_hw[1] < src_hw[1]
    return cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR


def _resize_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    interpolation = _interpolation(image.shape[:2], (height, width))
    return cv2.resize(image, (width, height), interpolation=interpolation)


def _central(image: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    top = (image.shape[0] - crop_h) // 2
    left = (image.shape[1] - crop_w) // 2
    return np.ascontiguousarray(image[top:top + crop_h, left:left + crop_w])


def resize_image(image_uint8: np.ndarray, size: tuple[int, int], policy: str,
                 crop_fraction: float = 1.0) -> np.ndarray:
    """Resize to ``size`` = (H, W) by ``policy``.

    - ``stretch``: to exactly (H, W), aspect ratio not kept.
    - ``letterbox``: keep the aspect ratio, fit inside (H, W), pad with zeros
      (black) on both sides, centred.
    - ``center_crop``: crop the largest central region with the aspect ratio of
      (H, W) (the central square for a square input), then resize.
    - ``none``: the image must already be (H, W); otherwise :class:`InputError`.

    ``crop_fraction`` < 1 (stretch and center_crop) keeps the central fraction of each
    side of the region before resizing it.

    The input is returned unchanged (not copied) when it already has the size.
    """
    image = as_rgb_uint8(image_uint8)
    height, width = _check_size_arg(size)
    if policy not in RESIZE_POLICIES:
        raise InputError(f"resize policy {policy!r}; allowed: {', '.join(repr(p) for p in RESIZE_POLICIES)}")
    src_h, src_w = image.shape[:2]
    if crop_fraction != 1.0 and policy not in ("stretch", "center_crop"):
        raise InputError(f"crop_fraction={crop_fraction} with resize policy {policy!r}; "
                         "it applies to 'stretch' and 'center_crop' only")

    if policy == "none":
        if (src_h, src_w) != (height, width):
            raise InputError(
                f"image is {src_h}x{src_w} (HxW) but resize='none' requires exactly {height}x{width}; "
                "use resize='stretch', 'letterbox' or 'center_crop', or resize the image beforehand"
            )
        return image
    if policy == "stretch":
        if crop_fraction != 1.0:
            image = _central(image, max(1, round(src_h * crop_fraction)), max(1, round(src_w * crop_fraction)))
        return _resize_to(image, height, width)
    if policy == "letterbox":
        scale = min(height / src_h, width / src_w)
        new_h = min(height, max(1, round(src_h * scale)))
        new_w = min(width, max(1, round(src_w * scale)))
        resized = _resize_to(image, new_h, new_w)
        if (new_h, new_w) == (height, width):
            return resized
        canvas = np.zeros((height, width, 3), dtype=np.uint8)
        top = (height - new_h) // 2
        left = (width - new_w) // 2
        canvas[top:top + new_h, left:left + new_w] = resized
        return canvas
    # center_crop
    target_aspect = width / height
    if src_w / src_h > target_aspect:
        crop_h, crop_w = src_h, min(src_w, max(1, round(src_h * target_aspect)))
    else:
        crop_h, crop_w = min(src_h, max(1, round(src_w / target_aspect))), src_w
    if crop_fraction != 1.0:
        crop_h, crop_w = max(1, round(crop_h * crop_fraction)), max(1, round(crop_w * crop_fraction))
    return _resize_to(_central(image, crop_h, crop_w), height, width)


def _check_size_arg(size: Any) -> tuple[int, int]:
    try:
        return _check_size("size", size)
    except InputError:
        raise InputError(f"size={size!r}; expected (height, width), two positive integers") from None


# --------------------------------------------------------------------------- normalise


def normalize(
    batch_uint8: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    out: np.ndarray | None = None,
) -> np.ndarray:
    """HxWx3 or NxHxWx3 uint8 RGB -> float32 3xHxW or Nx3xHxW, ``(x/255 - mean)/std``.

    Folded into one multiply-add per value, ``x * (1/(255 std)) - mean/std``, in
    float32, written straight into the channel-first output (``out`` when given,
    e.g. one slot of a preallocated batch).
    """
    batch = batch_uint8
    if not isinstance(batch, np.ndarray) or batch.dtype != np.uint8 or batch.ndim not in (3, 4) \
            or batch.shape[-1] != 3:
        shape = getattr(batch, "shape", None)
        dtype = getattr(batch, "dtype", type(batch).__name__)
        raise InputError(
            f"normalize: received shape {shape}, dtype {dtype}; expected uint8 HxWx3 or NxHxWx3 RGB "
            "(use as_rgb_uint8 to convert an image)"
        )
    mean_t = _check_triple("mean", mean, positive=False)
    std_t = _check_triple("std", std, positive=True)
    single = batch.ndim == 3
    images = batch[None] if single else batch
    n, height, width, _ = images.shape
    if out is None:
        out = np.empty((n, 3, height, width), dtype=np.float32)
        result = out[0] if single else out
    else:
        expected = (3, height, width) if single else (n, 3, height, width)
        if not isinstance(out, np.ndarray) or out.shape != expected or out.dtype != np.float32:
            raise InputError(f"normalize: out has shape {getattr(out, 'shape', None)}, dtype "
                             f"{getattr(out, 'dtype', None)}; expected {expected}, float32")
        result = out
        out = out[None] if single else out
    scales = [np.float32(1.0 / (255.0 * s)) for s in std_t]
    offsets = [np.float32(-m / s) for m, s in zip(mean_t, std_t)]
    # Plane by plane, so each output plane stays in cache between multiply and add.
    for i in range(n):
        for c in range(3):
            plane = out[i, c]
            np.multiply(images[i, :, :, c], scales[c], out=plane)
            plane += offsets[c]
    return result


# --------------------------------------------------------------------------- pipeline


def _prepare_uint8(image: np.ndarray, config: PreprocessConfig, stats: ColorStats | None,
                   name: str, timings: Timings | None = None) -> np.ndarray:
    """Steps 1-3 of the pipeline: uint8 HxWx3 at the model's input size."""
    image = as_rgb_uint8(image, name)
    if config.color_constancy != "none":
        if stats is None:
            with timed(timings, "color_stats"):
                stats = color_stats(image)
        with timed(timings, "color_constancy"):
            image = apply_color_constancy(image, config.color_constancy, stats,
                                          config.gwsd_target_mean, config.gwsd_target_std)
    if config.hair_removal:
        with timed(timings, "hair_removal"):
            image = remove_hair(image)
    with timed(timings, "resize"):
        return resize_image(image, config.input_size, config.resize, config.crop_fraction)


def _check_config(config: object) -> PreprocessConfig:
    if isinstance(config, PreprocessConfig):
        return config
    if isinstance(config, Mapping):
        return PreprocessConfig.from_dict(config)
    raise InputError(f"config: received {type(config).__name__}; expected PreprocessConfig or its dict")


def preprocess(image_uint8: np.ndarray, config: PreprocessConfig,
               stats: ColorStats | None = None, timings: Timings | None = None) -> np.ndarray:
    """One image -> float32 3xHxW model input.

    Colour constancy (whole-image ``stats``; computed from ``image_uint8`` when
    None; pass the statistics of the whole image when ``image_uint8`` is a tile),
    hair removal, resize, normalise. ``timings`` (optional) gains each step's
    milliseconds under the names of runtime/timings.py.
    """
    config = _check_config(config)
    prepared = _prepare_uint8(image_uint8, config, stats, "image", timings)
    with timed(timings, "normalize"):
        return normalize(prepared, config.mean, config.std)


def preprocess_batch(
    images: Sequence[np.ndarray] | np.ndarray,
    config: PreprocessConfig,
    stats: ColorStats | Sequence[ColorStats] | None = None,
    timings: Timings | None = None,
) -> np.ndarray:
    """Several images -> float32 Nx3xHxW.

    ``images`` is a list of HxWx3 images (sizes may differ) or an NxHxWx3 array.
    ``stats``: None computes each image's own statistics; one ColorStats is used for
    every image (tiles of one photo); a sequence gives one per image. ``timings``:
    as for :func:`preprocess`.
    """
    config = _check_config(config)
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise InputError(f"images: received an array of shape {images.shape}; expected NxHxWx3 "
                             "(or a list of HxWx3 images); for one image use preprocess()")
        items: Sequence[np.ndarray] = cast(Sequence[np.ndarray], images)  # N images along axis 0
    elif isinstance(images, (list, tuple)):
        items = images
    else:
        raise InputError(f"images: received {type(images).__name__}; expected a list of HxWx3 uint8 "
                         "images or an NxHxWx3 uint8 array")
    n = len(items)
    if stats is None or isinstance(stats, ColorStats):
        per_image: list[ColorStats | None] = [stats] * n
    else:
        per_image = list(stats)
        if len(per_image) != n:
            raise InputError(f"stats: received {len(per_image)} ColorStats for {n} images; "
                             "expected one per image, one for all, or None")
    height, width = config.input_size
    out = np.empty((n, 3, height, width), dtype=np.float32)
    for i, image in enumerate(items):
        prepared = _prepare_uint8(image, config, per_image[i], f"images[{i}]", timings)
        with timed(timings, "normalize"):
            normalize(prepared, config.mean, config.std, out=out[i])
    return out

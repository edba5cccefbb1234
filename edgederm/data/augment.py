"""Training augmentation in numpy/OpenCV on the preprocessed tensors.

Dihedral flips and transposes (lesions have no canonical orientation), a small
scale-rotation (reflected border; masks alike with nearest neighbour) and a small
colour jitter (per-channel gain and offset in the normalised space, where a
pixel-space gain/offset stays affine). Every random parameter of a global batch is
drawn at once from one seeded generator (:func:`draw_augment`) and applied per shard
(:func:`augment`), so the augmentation is the same whether one process or N train,
and after a resume.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class AugmentSettings(Protocol):
    """The strengths :func:`draw_augment` reads (a training config has them)."""

    color_jitter: float  # max per-channel gain deviation and offset (normalised units)
    rotate_degrees: float
    scale_range: float


@dataclass
class AugmentParams:
    """Per-image random augmentation of one global batch (drawn once, applied per shard)."""

    flip_h: np.ndarray
    flip_v: np.ndarray
    transpose: np.ndarray
    affine: np.ndarray  # which images get a scale-rotation
    angle: np.ndarray
    scale: np.ndarray
    gain: np.ndarray  # n x 3
    offset: np.ndarray  # n x 3


def draw_augment(rng: np.random.Generator, n: int, settings: AugmentSettings) -> AugmentParams:
    """All random numbers of a global batch of ``n`` images, in a fixed order."""
    j = settings.color_jitter
    return AugmentParams(
        flip_h=rng.random(n) < 0.5, flip_v=rng.random(n) < 0.5, transpose=rng.random(n) < 0.5,
        affine=rng.random(n) < 0.5,
        angle=rng.uniform(-settings.rotate_degrees, settings.rotate_degrees, n),
        scale=rng.uniform(1 - settings.scale_range, 1 + settings.scale_range, n),
        gain=rng.uniform(1 - j, 1 + j, (n, 3)), offset=rng.uniform(-j, j, (n, 3)),
    )


def augment(batch: np.ndarray, params: AugmentParams, rows: np.ndarray,
            masks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply ``params[rows]`` to ``batch`` (n x 3 x H x W float32) and masks (n x H x W) alike."""
    import cv2

    out = batch.copy()
    out_masks = masks.copy() if masks is not None else None
    h, w = out.shape[2:]
    for i, r in enumerate(rows):
        image = out[i].transpose(1, 2, 0)  # H x W x 3 view for OpenCV
        mask = out_masks[i] if out_masks is not None else None
        if params.flip_h[r]:
            image, mask = image[:, ::-1], (mask[:, ::-1] if mask is not None else None)
        if params.flip_v[r]:
            image, mask = image[::-1], (mask[::-1] if mask is not None else None)
        if params.transpose[r] and h == w:
            image, mask = image.transpose(1, 0, 2), (mask.T if mask is not None else None)
        if params.affine[r]:
            matrix = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), float(params.angle[r]), float(params.scale[r]))
            image = cv2.warpAffine(np.ascontiguousarray(image), matrix, (w, h), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REFLECT_101)
            if mask is not None:
                mask = cv2.warpAffine(np.ascontiguousarray(mask.astype(np.uint8)), matrix, (w, h),
                                      flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101).astype(np.int64)
        image = image * params.gain[r].astype(np.float32) + params.offset[r].astype(np.float32)
        out[i] = image.transpose(2, 0, 1)
        if out_masks is not None:
            out_masks[i] = mask
    return np.ascontiguousarray(out), out_masks

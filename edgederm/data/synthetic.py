"""Synthetic dermoscopy images: a stand-in for ISIC-like data in quickstarts and tests.

Real dermoscopy archives (ISIC and friends) are large, licence-bound and cannot ship
with an SDK or run in CI, yet every stage of EdgeDerm (training, export, INT8
calibration, tiled high-resolution inference) needs images whose classes a model can
actually learn. This module draws such images procedurally, from a seed, with numpy
and OpenCV only (no torch), at any size from 32x32 to 4096x4096.

Visual grammar (what a model has to learn; loosely after the dermoscopic criteria of
the ABCD rule and the 7-point checklist):

* ``nevus`` (benign melanocytic): a regular, round-to-elliptical, symmetric lesion,
  uniformly brown, with a smooth border and a *regular* pigment network (a fine
  honeycomb of darker lines) that fades towards the periphery.
* ``melanoma``: an *irregular*, asymmetric border (radius perturbed by several
  harmonics plus jagged high-frequency ones), several colours (light brown, dark
  brown, black, grey) placed asymmetrically, a blue-white veil, irregular streaks
  (pseudopods) in one or two sectors of the periphery, irregular black dots, and an
  *atypical* network (distorted cells, thick lines, present only in patches).
* ``vascular`` (angioma-like): a red to red-purple lesion with a well demarcated
  border containing red lacunae (round red-to-dark-red blobs) separated by paler
  septa, and no pigment network.

Around the lesion: skin of Fitzpatrick I-VI-like tones with low-frequency shading and
mottled texture; artefacts that real images carry and a deployed model must ignore:
hair (sometimes none), the dermoscope's dark circular vignette, slight sensor noise
and a JPEG round trip at quality 70-95. Metadata (age, sex, anatomic site) is
correlated with the class as in registries (melanoma: older, more often male, back
and trunk; vascular: more often face and lower extremity), and the skin tone is
recorded so fairness checks can stratify by it.

Decisions taken here:

* Geometry is resolution independent. Every random quantity is drawn from
  ``np.random.default_rng(seed)`` in an order that does not depend on the image size;
  positions and lengths are fractions of ``s = min(height, width)``, and random
  fields are drawn as small fixed-size grids that are resized to the image. The same
  seed rendered at 128 and at 2048 is the same lesion; only the per-pixel sensor
  noise (a second generator keyed by seed and size) differs.
* Speed comes from rendering the smooth part of the picture (skin, lesion colours,
  lesion edge, veil, streaks, vignette) at most 512 pixels on the long side and
  resizing it up once; what must stay crisp at full resolution (pigment network,
  lacunae, dots, hair, noise, the mask itself) is drawn at full resolution, the
  network only inside the lesion's bounding box.
* Clarity over realism: the classes are meant to be separable by a small CNN in a
  minute of training at 128x128, yet their mean colours overlap through skin tone,
  lesion darkness and vignetting, so colour alone is not the whole story.
"""
from __future__ import annotations

import csv
import io
import math
import operator
import os
import pathlib
import sys
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from edgederm.runtime.bundle import write_bytes_atomic
from edgederm.runtime.errors import InputError

__all__ = [
    "CLASS_NAMES",
    "SITES",
    "SEXES",
    "CSV_FIELDS",
    "MIN_SIZE",
    "MAX_SIZE",
    "SyntheticCase",
    "generate_case",
    "generate_dataset",
    "read_labels_csv",
]

CLASS_NAMES: tuple[str, ...] = ("nevus", "melanoma", "vascular")
SITES: tuple[str, ...] = ("back", "face", "upper_extremity", "lower_extremity", "trunk", "scalp")
SEXES: tuple[str, ...] = ("female", "male")
CSV_FIELDS: tuple[str, ...] = ("id", "label", "class_name", "age", "sex", "site", "skin_tone")
MIN_SIZE = 32
MAX_SIZE = 4096

NEVUS, MELANOMA, VASCULAR = 0, 1, 2

# Long side, in pixels, at which the smooth fields are rendered before resizing up.
_SMOOTH_MAX_SIDE = 512
_SMOOTH_MIN_SHORT_SIDE = 128
# Number of vertices of the lesion outline (enough for the jagged melanoma harmonics).
_OUTLINE_VERTICES = 360
_N_HARMONICS = 24

# Skin as seen through a polarised dermoscope, Fitzpatrick I..VI (RGB).
_SKIN_RGB = np.array(
    [
        (238, 206, 190),
        (226, 184, 158),
        (205, 158, 122),
        (176, 126, 90),
        (128, 86, 60),
        (84, 57, 43),
    ],
    dtype=np.float32,
)
# Pigment looks darker on darker skin; vessels and the veil darken less.
_PIGMENT_GAIN = np.array([1.0, 0.95, 0.85, 0.72, 0.52, 0.38], dtype=np.float32)
_VESSEL_GAIN = np.array([1.0, 1.0, 0.95, 0.88, 0.76, 0.64], dtype=np.float32)
_VEIL_GAIN = np.array([1.0, 0.97, 0.9, 0.8, 0.66, 0.55], dtype=np.float32)

# Lesion colours (RGB).
_NEVUS_LIGHT = np.array((172, 122, 86), np.float32)
_NEVUS_DARK = np.array((108, 66, 42), np.float32)
_MEL_LIGHT_BROWN = np.array((178, 128, 92), np.float32)
_MEL_DARK_BROWN = np.array((96, 56, 36), np.float32)
_MEL_BLACK = np.array((44, 32, 30), np.float32)
_MEL_GREY = np.array((124, 120, 132), np.float32)
_MEL_BLUE_WHITE = np.array((126, 150, 182), np.float32)
_VASC_PINK = np.array((206, 104, 102), np.float32)
_VASC_PURPLE = np.array((172, 68, 86), np.float32)
_LACUNA_RED = np.array((192, 36, 50), np.float32)
_LACUNA_DARK = np.array((112, 16, 38), np.float32)
_LACUNA_PURPLE = np.array((104, 22, 56), np.float32)

# Metadata distributions per class: (mean age, sd age, P(male), P(site) over SITES).
_META = {
    NEVUS: (35.0, 12.0, 0.45, (0.28, 0.06, 0.20, 0.20, 0.24, 0.02)),
    MELANOMA: (61.0, 13.0, 0.62, (0.38, 0.09, 0.10, 0.10, 0.28, 0.05)),
    VASCULAR: (45.0, 17.0, 0.42, (0.12, 0.30, 0.10, 0.30, 0.15, 0.03)),
}


@dataclass(frozen=True, eq=False)
class SyntheticCase:
    """One synthetic dermoscopy case.

    ``eq=False``: the fields are numpy arrays, so compare ``image``/``mask`` with
    ``np.array_equal`` rather than ``==`` on the cases.
    """

    image: np.ndarray  # H x W x 3 uint8 RGB
    mask: np.ndarray  # H x W uint8 in {0, 1}; 1 = lesion (streaks included, hair not)
    label: int
    class_name: str
    metadata: dict  # {"age": int, "sex": str, "site": str, "skin_tone": int}


# --------------------------------------------------------------------------- checks


def _check_size(size: Any, where: str = "generate_case") -> tuple[int, int]:
    """``size`` (int or (height, width)) -> (height, width), or a clear InputError."""
    fix = (
        f"pass size=128 (square) or size=(height, width) with both sides in "
        f"{MIN_SIZE}..{MAX_SIZE}"
    )
    try:
        if isinstance(size, (tuple, list)):
            if len(size) != 2:
                raise TypeError
            height, width = (_strict_int(v) for v in size)
        else:
            height = width = _strict_int(size)
    except TypeError:
        raise InputError(
            f"{where}: size {size!r} is not an image size; expected an int or a "
            f"(height, width) pair of ints; fix: {fix}"
        ) from None
    if not (MIN_SIZE <= height <= MAX_SIZE and MIN_SIZE <= width <= MAX_SIZE):
        raise InputError(
            f"{where}: size {size!r} is out of range (received height={height}, "
            f"width={width}); expected each side between {MIN_SIZE} and {MAX_SIZE} "
            f"pixels; fix: {fix}"
        )
    return height, width


def _strict_int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError
    return operator.index(value)  # accepts numpy integers, rejects floats and strings


def _check_label(label: Any) -> int | None:
    if label is None:
        return None
    names = ", ".join(f"{i}={name!r}" for i, name in enumerate(CLASS_NAMES))
    try:
        value = _strict_int(label)
    except TypeError:
        value = None
    if value is None or not 0 <= value < len(CLASS_NAMES):
        raise InputError(
            f"generate_case: label {label!r} is not a valid class; expected an int in "
            f"0..{len(CLASS_NAMES) - 1} ({names}) or None to draw one from the seed; "
            f"fix: pass e.g. label=CLASS_NAMES.index('melanoma')"
        )
    return value


def _check_seed(seed: Any) -> int:
    try:
        value = _strict_int(seed)
    except TypeError:
        value = -1
    if value < 0:
        raise InputError(
            f"generate_case: seed {seed!r} is not usable; expected a non-negative int; "
            f"fix: pass e.g. seed=0"
        )
    return value


# --------------------------------------------------------------------------- helpers

_THETA = np.linspace(0.0, 2 * math.pi, _OUTLINE_VERTICES, endpoint=False)
_HAIR_T = np.linspace(-0.5, 0.5, 25)
Box = tuple[int, int, int, int]  # y0, y1, x0, x1


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """Hermite step from 0 at ``edge0`` to 1 at ``edge1`` (either order); new array."""
    t = (x - np.float32(edge0)) * np.float32(1.0 / (edge1 - edge0))
    np.clip(t, 0.0, 1.0, out=t)
    return t * t * (np.float32(3.0) - np.float32(2.0) * t)


def _grid(rng: np.random.Generator, n: int) -> np.ndarray:
    """An n x n grid of standard normal values: the seed of a smooth random field.

    Its shape never depends on the image size, so the stream stays aligned."""
    return rng.standard_normal((n, n), dtype=np.float32)


def _field(grid: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize a small random grid to a smooth width x height field (float32)."""
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def _lerp_planes(planes: np.ndarray, colour: np.ndarray, weight: np.ndarray) -> None:
    """In place on a 3 x H x W image: planes += weight * (colour - planes).

    Planar layout on purpose: broadcasting over a trailing axis of 3 is ~10x slower."""
    tmp = colour.astype(np.float32)[:, None, None] - planes
    tmp *= weight
    planes += tmp


def _outline_radius(outline: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Lesion radius (units of s) at the given angles, from the tabulated outline."""
    return np.interp(angles, _THETA, outline, period=2 * math.pi)


# --------------------------------------------------------------------------- the plan


@dataclass
class _Plan:
    """Every random decision for one case, in resolution-independent units.

    Positions are offsets from the lesion centre and lengths are fractions of
    s = min(height, width); the lesion centre is an offset from the image centre in
    the same unit. Nothing here depends on the image size.
    """

    label: int
    tone: int
    metadata: dict
    skin_rgb: np.ndarray
    centre: tuple[float, float]
    radius: float  # root-mean-square lesion radius
    outline: np.ndarray  # radius at the angles _THETA
    edge_width: np.ndarray  # width of the soft edge at the angles _THETA
    grids: dict  # name -> small random grid (a smooth field once resized)
    params: dict  # scalars per class
    streaks: list  # melanoma: polygons (k x 2), in lesion coordinates
    dots: np.ndarray  # melanoma: rows (u, v, radius, light)
    lacunae: list  # vascular: (u, v, radius, rgb)
    hairs: list  # (curve (25 x 2) around the lesion centre, thickness, light)


def _draw_plan(rng: np.random.Generator, label: int | None) -> _Plan:
    drawn_label = int(rng.integers(len(CLASS_NAMES)))  # always drawn: keeps the stream aligned
    label = drawn_label if label is None else label

    tone = int(rng.integers(1, 7))
    skin_rgb = _SKIN_RGB[tone - 1] * (1.0 + 0.035 * rng.standard_normal(3))
    skin_rgb *= 1.0 + 0.05 * rng.standard_normal()

    mean_age, sd_age, p_male, p_site = _META[label]
    metadata = {
        "age": int(np.clip(round(rng.normal(mean_age, sd_age)), 1, 95)),
        "sex": SEXES[int(rng.random() < p_male)],
        "site": SITES[int(rng.choice(len(SITES), p=np.asarray(p_site) / sum(p_site)))],
        "skin_tone": tone,
    }

    # Outline: an ellipse times a harmonic perturbation whose strength is a class cue.
    jitter = rng.uniform(-0.05, 0.05, 2)
    diameter = rng.uniform(0.27, 0.6)
    aspect = {NEVUS: (0.72, 1.0), MELANOMA: (0.62, 1.0), VASCULAR: (0.7, 1.0)}[label]
    q = rng.uniform(*aspect)
    tilt = rng.uniform(0, math.pi)
    amps = rng.random(_N_HARMONICS)
    phases = rng.uniform(0, 2 * math.pi, _N_HARMONICS)
    k = np.arange(1, _N_HARMONICS + 1)
    if label == NEVUS:
        envelope = np.where((k >= 2) & (k <= 4), 0.03, 0.0)
    elif label == MELANOMA:
        envelope = np.where((k >= 2) & (k <= 7), 0.16 / np.sqrt(np.maximum(k - 1, 1)), 0.0)
        envelope = envelope + np.where(k >= 8, 0.022, 0.0)
    else:
        envelope = np.where((k >= 2) & (k <= 5), 0.05, 0.0)
    ellipse = 1.0 / np.sqrt(
        (np.cos(_THETA - tilt) * math.sqrt(q)) ** 2 + (np.sin(_THETA - tilt) / math.sqrt(q)) ** 2
    )
    wobble = 1.0 + (envelope * amps) @ np.cos(np.outer(k, _THETA) + phases[:, None])
    shape = ellipse * wobble
    shape /= math.sqrt(np.mean(shape**2))  # unit mean-square radius: the area is set by diameter
    reach = 1.3 if label == MELANOMA else 1.0  # streak tips reach 1.3 x the local radius
    # Keep the whole lesion inside the frame.
    radius = min(diameter / 2, (0.47 - np.abs(jitter).max()) / (reach * shape.max()))
    outline = shape * radius

    params: dict = {}
    grids: dict = {"shade": _grid(rng, 4), "mottle": _grid(rng, 36), "tone": _grid(rng, 9)}
    streaks: list = []
    dots = np.zeros((0, 4))
    lacunae: list = []

    if label == NEVUS:
        params["colour"] = _NEVUS_LIGHT + rng.random() * (_NEVUS_DARK - _NEVUS_LIGHT)
        params["centre_dark"] = rng.uniform(-0.05, 0.2)
        params["net"] = dict(
            strength=rng.uniform(0.3, 0.45), cell=rng.uniform(0.024, 0.034),
            threshold=rng.uniform(-0.8, -0.5), warp=0.3, angle=rng.uniform(0, math.pi),
            offset=rng.uniform(0, 1, 2),
        )
        grids["warp_x"], grids["warp_y"] = _grid(rng, 12), _grid(rng, 12)
        edge_width = np.full(_OUTLINE_VERTICES, 0.02)
    elif label == MELANOMA:
        params["asym_angle"] = rng.uniform(0, 2 * math.pi)
        grids["dark"], grids["black"], grids["grey"] = _grid(rng, 9), _grid(rng, 9), _grid(rng, 9)
        v_dir, v_dist = rng.uniform(0, 2 * math.pi), rng.uniform(0.05, 0.45)
        params["veil"] = (  # an off-centre ellipse, in units of the lesion radius
            v_dist * math.cos(v_dir), v_dist * math.sin(v_dir), rng.uniform(0.38, 0.6),
            rng.uniform(0.28, 0.45), rng.uniform(0, math.pi), rng.uniform(0.6, 0.85),
        )
        grids["veil"] = _grid(rng, 12)  # a veil is cloudy, not a disc
        # Streaks in one or two sectors of the periphery: tapered, with a small bulb.
        sectors = rng.uniform(0, 2 * math.pi, int(rng.integers(1, 3)))
        for _ in range(int(rng.integers(5, 15))):
            angle = sectors[int(rng.integers(len(sectors)))] + rng.uniform(-0.6, 0.6)
            start, tip = rng.uniform(0.72, 0.85), rng.uniform(1.08, 1.3)
            half = rng.uniform(0.02, 0.04) * radius
            r_local = float(_outline_radius(outline, np.array([angle]))[0])
            along = np.array([start, start, 0.93 * tip, tip, 0.93 * tip]) * r_local
            across = np.array([-half, half, 0.55 * half, 0.0, -0.55 * half])
            ca, sa = math.cos(angle), math.sin(angle)
            streaks.append(np.stack([along * ca - across * sa, along * sa + across * ca], axis=1))
        # Irregular black dots, crowded in one sector.
        dot_sector = rng.uniform(0, 2 * math.pi)
        n_dots = int(rng.integers(4, 17))
        angle = dot_sector + rng.normal(0, 0.8, n_dots)
        dist = rng.uniform(0.45, 0.92, n_dots) * _outline_radius(outline, angle)
        dots = np.stack([dist * np.cos(angle), dist * np.sin(angle),
                         rng.uniform(0.006, 0.014, n_dots), rng.uniform(0.25, 0.45, n_dots)], axis=1)
        params["net"] = dict(
            strength=rng.uniform(0.45, 0.65), cell=rng.uniform(0.03, 0.05),
            threshold=rng.uniform(-0.5, 0.0), warp=0.8, angle=rng.uniform(0, math.pi),
            offset=rng.uniform(0, 1, 2),
        )
        grids["warp_x"], grids["warp_y"] = _grid(rng, 14), _grid(rng, 14)
        grids["net_patch"], grids["net_thick"] = _grid(rng, 8), _grid(rng, 10)
        # Abrupt in places, fuzzy in others.
        edge_phase = rng.uniform(0, 2 * math.pi)
        edge_width = 0.004 + 0.012 * (0.5 + 0.5 * np.cos(_THETA - edge_phase)) ** 2
    else:
        params["colour"] = _VASC_PINK + rng.random() * (_VASC_PURPLE - _VASC_PINK)
        gain = _VESSEL_GAIN[tone - 1]
        for _ in range(int(rng.integers(10, 28))):
            r_lac = rng.uniform(0.09, 0.24) * radius
            angle = rng.uniform(0, 2 * math.pi)
            r_local = float(_outline_radius(outline, np.array([angle]))[0])
            dist = math.sqrt(rng.random()) * max(0.0, 0.88 * r_local - r_lac)
            tint = rng.random()
            if rng.random() < 0.2:
                rgb = _LACUNA_PURPLE
            else:
                rgb = _LACUNA_RED + tint * (_LACUNA_DARK - _LACUNA_RED)
            lacunae.append((dist * math.cos(angle), dist * math.sin(angle), r_lac, rgb * gain))
        edge_width = np.full(_OUTLINE_VERTICES, 0.005)

    # Hair: often none, otherwise a few dark curves crossing the field.
    hairs = []
    for _ in range(0 if rng.random() < 0.35 else int(rng.integers(1, 13))):
        through = rng.uniform(-0.6, 0.6, 2)
        direction, length = rng.uniform(0, math.pi), rng.uniform(0.35, 1.3)
        bend = rng.uniform(-0.25, 0.25)
        thickness, light = rng.uniform(0.0018, 0.0045), rng.uniform(0.15, 0.45)
        d = np.array([math.cos(direction), math.sin(direction)])
        n = np.array([-d[1], d[0]])
        curve = (through[None, :] + (_HAIR_T * length)[:, None] * d
                 + ((0.25 - _HAIR_T**2) * 4 * bend * length)[:, None] * n)
        hairs.append((curve - jitter[None, :], thickness, light))  # lesion coordinates

    has_vignette = rng.random() > 0.25
    params["vignette"] = (
        rng.uniform(0.92, 1.35),  # radius, units of s/2 around the image centre
        rng.uniform(0.85, 1.0) if has_vignette else 0.0,  # depth of the dark border
        rng.uniform(0.04, 0.1),  # softness
    )
    params["noise_sigma"] = rng.uniform(1.0, 3.0)
    params["jpeg_quality"] = int(rng.integers(70, 96))

    return _Plan(
        label=label, tone=tone, metadata=metadata, skin_rgb=skin_rgb.astype(np.float32),
        centre=(float(jitter[0]), float(jitter[1])), radius=float(radius), outline=outline,
        edge_width=np.asarray(edge_width, dtype=np.float64), grids=grids, params=params,
        streaks=streaks, dots=dots, lacunae=lacunae, hairs=hairs,
    )


# --------------------------------------------------------------------------- rendering


class _Frame:
    """Maps lesion coordinates (units of s around the lesion centre) to pixels.

    Continuous pixel coordinates: pixel i covers [i, i + 1), its centre is i + 0.5.
    """

    def __init__(self, plan: _Plan, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.s = float(min(height, width))
        self.cx = width / 2 + plan.centre[0] * self.s
        self.cy = height / 2 + plan.centre[1] * self.s

    def fixed_point(self, uv: np.ndarray) -> np.ndarray:
        """Lesion coordinates (k x 2) -> OpenCV drawing coordinates with shift=4."""
        x = (self.cx - 0.5) + uv[..., 0] * self.s
        y = (self.cy - 0.5) + uv[..., 1] * self.s
        return np.round(np.stack([x, y], axis=-1) * 16).astype(np.int32)


def _render_smooth(plan: _Plan, frame: _Frame, gh: int, gw: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The low-frequency picture, 3 x gh x gw: skin, lesion colours and edge, veil,
    streaks, vignette. Also returns the pigment network's strength field (or None)."""
    p, g = plan.params, plan.grids
    H, W, s = frame.height, frame.width, frame.s
    # Lesion coordinates of the pixel centres of the gh x gw grid.
    xs = ((np.arange(gw, dtype=np.float32) + np.float32(0.5)) * np.float32(W / gw) - np.float32(frame.cx)) / np.float32(s)
    ys = ((np.arange(gh, dtype=np.float32) + np.float32(0.5)) * np.float32(H / gh) - np.float32(frame.cy)) / np.float32(s)
    dx, dy = xs[None, :], ys[:, None]
    r = np.hypot(dx, dy)
    angle = np.arctan2(dy, dx)
    r_edge = _outline_radius(plan.outline, angle).astype(np.float32)
    w_edge = np.interp(angle, _THETA, plan.edge_width, period=2 * math.pi).astype(np.float32)
    rho = r / r_edge  # 0 at the centre, 1 on the border
    alpha = r_edge - r
    alpha /= w_edge
    alpha += np.float32(0.5)
    np.clip(alpha, 0.0, 1.0, out=alpha)

    # Skin: colour, low-frequency shading, mottled texture.
    shade = _field(g["shade"], gw, gh)
    shade *= np.float32(0.06)
    shade += np.float32(0.025) * _field(g["mottle"], gw, gh)
    shade += np.float32(1.0)
    img = plan.skin_rgb[:, None, None] * shade

    tone_idx = plan.tone - 1
    variation = _field(g["tone"], gw, gh)
    net_strength = None
    if plan.label == NEVUS:
        gain = np.float32(1.0) + np.float32(0.05) * variation
        gain -= np.float32(p["centre_dark"]) * np.clip(np.float32(1.0) - rho * rho, 0.0, 1.0)
        lesion = (p["colour"] * _PIGMENT_GAIN[tone_idx]).astype(np.float32)[:, None, None] * gain
        net_strength = np.float32(p["net"]["strength"]) * alpha * _smoothstep(1.0, 0.65, rho)
    elif plan.label == MELANOMA:
        pg, vg = _PIGMENT_GAIN[tone_idx], _VEIL_GAIN[tone_idx]
        a = p["asym_angle"]
        toward = (dx * np.float32(math.cos(a)) + dy * np.float32(math.sin(a))) / np.float32(plan.radius)
        np.clip(toward, -1.2, 1.2, out=toward)
        lesion = (_MEL_LIGHT_BROWN * pg)[:, None, None] * (np.float32(1.0) + np.float32(0.06) * variation)
        f = _field(g["dark"], gw, gh)
        f += np.float32(0.9) * toward
        _lerp_planes(lesion, _MEL_DARK_BROWN * pg, _smoothstep(-0.35, 0.35, f))
        f = _field(g["black"], gw, gh)
        f += np.float32(0.9) * toward - np.float32(0.55)
        _lerp_planes(lesion, _MEL_BLACK * pg, np.float32(0.9) * _smoothstep(-0.25, 0.25, f))
        f = _field(g["grey"], gw, gh)
        f -= np.float32(0.5) * toward + np.float32(0.5)
        _lerp_planes(lesion, _MEL_GREY * vg, np.float32(0.75) * _smoothstep(-0.2, 0.3, f))
        vx, vy, va, vb, vrot, vop = p["veil"]
        ex = dx / np.float32(plan.radius) - np.float32(vx)
        ey = dy / np.float32(plan.radius) - np.float32(vy)
        c, sn = np.float32(math.cos(vrot)), np.float32(math.sin(vrot))
        e = ((ex * c + ey * sn) / np.float32(va)) ** 2 + ((ey * c - ex * sn) / np.float32(vb)) ** 2
        e += np.float32(0.35) * _field(g["veil"], gw, gh)
        veil = _smoothstep(1.5, 0.3, e)
        veil *= np.float32(vop) * alpha
        _lerp_planes(lesion, _MEL_BLUE_WHITE * vg, veil)
        # Streaks: dark-brown pseudopods from inside the lesion across the border.
        canvas = np.zeros((gh, gw), np.uint8)
        small = _Frame(plan, gh, gw)
        small.s = s * gw / W  # same lesion coordinates, smaller pixels
        small.cx, small.cy = frame.cx * gw / W, frame.cy * gh / H
        cv2.fillPoly(canvas, [small.fixed_point(poly) for poly in plan.streaks], 255, cv2.LINE_AA, shift=4)
        streak = canvas.astype(np.float32)
        streak *= np.float32(1 / 255)
        _lerp_planes(lesion, _MEL_DARK_BROWN * pg, np.float32(0.85) * streak)
        patch = _smoothstep(-0.2, 0.4, _field(g["net_patch"], gw, gh))
        net_strength = np.float32(p["net"]["strength"]) * alpha * patch * _smoothstep(1.05, 0.85, rho)
        np.maximum(alpha, streak, out=alpha)
    else:
        gain = np.float32(1.0) + np.float32(0.06) * variation
        lesion = (p["colour"] * _VESSEL_GAIN[tone_idx]).astype(np.float32)[:, None, None] * gain

    # Composite: img += alpha * (lesion - img).
    lesion -= img
    lesion *= alpha
    img += lesion

    v_radius, v_depth, v_soft = p["vignette"]
    vx0 = (np.arange(gw, dtype=np.float32) + np.float32(0.5) - np.float32(gw / 2)) * np.float32(W / gw)
    vy0 = (np.arange(gh, dtype=np.float32) + np.float32(0.5) - np.float32(gh / 2)) * np.float32(H / gh)
    rv = np.hypot(vx0[None, :], vy0[:, None])
    rv *= np.float32(2 / s)
    vig = rv * rv
    vig *= np.float32(-0.12 / v_radius**2)
    vig += np.float32(1.0)
    if v_depth > 0:
        vig -= np.float32(v_depth) * _smoothstep(v_radius, v_radius + v_soft, rv)
    np.clip(vig, 0.0, 1.0, out=vig)
    img *= vig
    return img, net_strength


def _network(plan: _Plan, frame: _Frame, box: Box) -> np.ndarray:
    """Pigment network lines (1 on a line, 0 in a hole) inside box.

    A honeycomb from three plane waves at 120 degrees: h = sum of three cosines has
    maxima 3 (the holes), saddles -1 and minima -1.5, so {h < t} for t a little above
    -1 is a thin connected web. Warping the coordinates with a smooth random
    displacement makes it slightly irregular (nevus) or distorted, with cells of
    varying size and lines of varying thickness (melanoma)."""
    net, g = plan.params["net"], plan.grids
    y0, y1, x0, x1 = box
    H, W, s = frame.height, frame.width, frame.s
    k = 2 * math.pi / net["cell"]
    warp = np.float32(net["warp"] * 2 * math.pi)  # displacement amplitude in radians of phase
    wx = _field(g["warp_x"], W, H)[y0:y1, x0:x1]
    wy = _field(g["warp_y"], W, H)[y0:y1, x0:x1]
    wx *= warp
    wy *= warp
    # A common translation (in cells) for the three waves: per-wave phases that do not
    # sum to zero would turn the web into isolated dots.
    xs = ((np.arange(x0, x1) + 0.5 - frame.cx) / s + net["offset"][0] * net["cell"]) * k
    ys = ((np.arange(y0, y1) + 0.5 - frame.cy) / s + net["offset"][1] * net["cell"]) * k
    h = np.zeros((y1 - y0, x1 - x0), np.float32)
    tmp = np.empty_like(h)
    for i in range(3):
        a = net["angle"] + i * 2 * math.pi / 3
        ca, sa = math.cos(a), math.sin(a)
        # Phases in float64 first: k * position can be large, float32 would band.
        phase = np.add.outer(
            np.mod(ys * sa, 2 * math.pi).astype(np.float32),
            np.mod(xs * ca, 2 * math.pi).astype(np.float32),
        )
        np.multiply(wx, np.float32(ca), out=tmp)
        phase += tmp
        np.multiply(wy, np.float32(sa), out=tmp)
        phase += tmp
        np.cos(phase, out=phase)
        h += phase
    h -= np.float32(net["threshold"])
    if "net_thick" in g:  # atypical network: line thickness varies over the lesion
        h -= np.float32(0.6) * _field(g["net_thick"], W, H)[y0:y1, x0:x1]
    return _smoothstep(0.3, -0.3, h)


def _render(plan: _Plan, height: int, width: int, noise_rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    frame = _Frame(plan, height, width)
    s, p = frame.s, plan.params
    # Smooth fields at <= 512 px on the long side, but never fewer than 128 px across
    # the short side (the lesion lives there): a 32 x 4096 strip stays at full size.
    f = max(min(1.0, _SMOOTH_MAX_SIDE / max(height, width)), min(1.0, _SMOOTH_MIN_SHORT_SIDE / min(height, width)))
    gh, gw = max(1, round(height * f)), max(1, round(width * f))
    same = (gh, gw) == (height, width)

    smooth, net_strength = _render_smooth(plan, frame, gh, gw)
    if same:
        planes = list(smooth)
    else:
        planes = [cv2.resize(c, (width, height), interpolation=cv2.INTER_LINEAR) for c in smooth]

    # The mask: outline polygon plus streaks, at full resolution.
    outline_uv = np.stack([plan.outline * np.cos(_THETA), plan.outline * np.sin(_THETA)], axis=1)
    polys = [frame.fixed_point(outline_uv)] + [frame.fixed_point(poly) for poly in plan.streaks]
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, polys, 1, cv2.LINE_8, shift=4)
    everything = np.concatenate(polys, axis=0) / 16.0
    x0 = max(0, int(everything[:, 0].min()) - 2)
    x1 = min(width, int(everything[:, 0].max()) + 3)
    y0 = max(0, int(everything[:, 1].min()) - 2)
    y1 = min(height, int(everything[:, 1].max()) + 3)
    box = (y0, y1, x0, x1)

    if plan.lacunae:
        _draw_lacunae(plan, frame, planes, box)

    # Multiplicative detail at full resolution: network, dots, hair.
    detail: np.ndarray | None = None
    if net_strength is not None:
        detail = np.ones((height, width), np.float32)
        if same:
            strength = net_strength[y0:y1, x0:x1]
        else:
            strength = cv2.resize(net_strength, (width, height), interpolation=cv2.INTER_LINEAR)[y0:y1, x0:x1]
        lines = _network(plan, frame, box)
        lines *= strength
        detail[y0:y1, x0:x1] -= lines
    if len(plan.dots) or plan.hairs:
        # Coverage times darkness, antialiased, in one 8-bit canvas.
        cover = np.zeros((height, width), np.uint8)
        if len(plan.dots):
            centres = frame.fixed_point(plan.dots[:, :2])
            for (cx, cy), (_, _, radius, light) in zip(centres, plan.dots):
                cv2.circle(cover, (int(cx), int(cy)), max(8, round(radius * s * 16)),
                           round(255 * (1 - light)), -1, cv2.LINE_AA, shift=4)
        for curve, thickness, light in plan.hairs:
            cv2.polylines(cover, [frame.fixed_point(curve)], False, round(255 * (1 - light)),
                          max(1, round(thickness * s)), cv2.LINE_AA, shift=4)
        if detail is None:
            detail = np.ones((height, width), np.float32)
        detail -= cover.astype(np.float32) * np.float32(1 / 255) * detail
    # Sensor noise, plus 0.5 so that the cast to uint8 rounds.
    noise = noise_rng.standard_normal((height, width), dtype=np.float32)
    noise *= np.float32(p["noise_sigma"])
    noise += np.float32(0.5)
    for plane in planes:
        if detail is not None:
            plane *= detail
        plane += noise
    bgr = cv2.merge([np.clip(plane, 0, 255).astype(np.uint8) for plane in reversed(planes)])

    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, p["jpeg_quality"]])
    if not ok:  # pragma: no cover - OpenCV always has a JPEG codec
        raise RuntimeError("OpenCV could not encode a JPEG")
    rgb = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return rgb, mask


def _draw_lacunae(plan: _Plan, frame: _Frame, planes: list[np.ndarray], box: Box) -> None:
    """Red lacunae: crisp discs blended into the planes through antialiased coverage."""
    y0, y1, x0, x1 = box
    colour = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
    cover = np.zeros((y1 - y0, x1 - x0), np.uint8)
    offset = np.array([x0 * 16, y0 * 16], np.int32)
    for u, v, radius, rgb in plan.lacunae:
        cx, cy = frame.fixed_point(np.array([u, v])) - offset
        r16 = max(8, round(radius * frame.s * 16))
        # Colour one pixel wider than the coverage, so the antialiased rim has it.
        cv2.circle(colour, (int(cx), int(cy)), r16 + 16, tuple(float(c) for c in rgb), -1, cv2.LINE_8, shift=4)
        cv2.circle(cover, (int(cx), int(cy)), r16, 255, -1, cv2.LINE_AA, shift=4)
    weight = cover.astype(np.float32)
    weight *= np.float32(1 / 255)
    for c, plane in enumerate(planes):
        region = plane[y0:y1, x0:x1]
        tmp = colour[:, :, c].astype(np.float32)
        tmp -= region
        tmp *= weight
        region += tmp


# --------------------------------------------------------------------------- public API


def generate_case(seed: int, size: int | tuple[int, int] = 256, label: int | None = None) -> SyntheticCase:
    """Render one synthetic dermoscopy case.

    Args:
        seed: non-negative int; the same seed, size and label give identical bytes.
        size: side of a square image, or (height, width); each side 32..4096.
        label: index into CLASS_NAMES, or None to draw the class from the seed (the
            case is then identical to passing the drawn label explicitly).

    Returns:
        SyntheticCase with an H x W x 3 uint8 RGB image, an H x W {0, 1} uint8 mask,
        the label, its class name and metadata {age, sex, site, skin_tone}.
    """
    height, width = _check_size(size)
    label = _check_label(label)
    seed = _check_seed(seed)
    plan = _draw_plan(np.random.default_rng(seed), label)
    # Per-pixel noise needs a stream of the image's size; key it by size, so that the
    # geometry stream above stays the same at every resolution.
    noise_rng = np.random.default_rng([seed, height, width, 0x5EED])
    image, mask = _render(plan, height, width, noise_rng)
    return SyntheticCase(
        image=image,
        mask=mask,
        label=plan.label,
        class_name=CLASS_NAMES[plan.label],
        metadata=dict(plan.metadata),
    )


def generate_dataset(
    out_dir: str | os.PathLike,
    n_per_class: int,
    size: int | tuple[int, int] = 128,
    seed: int = 0,
    progress: bool = False,
) -> pathlib.Path:
    """Write a balanced synthetic dataset and return its directory.

    Layout: ``images/<id>.jpg`` (RGB, JPEG quality 95), ``masks/<id>.png`` (0/255) and
    ``labels.csv`` with columns CSV_FIELDS. Case i (ids ``syn_000000``, ...) uses seed
    ``seed * 1_000_003 + i`` and label ``i % 3``. labels.csv is written last and
    atomically, so a directory with a labels.csv is complete.
    """
    height, width = _check_size(size, where="generate_dataset")
    try:
        n_per_class = _strict_int(n_per_class)
    except TypeError:
        n_per_class = -1
    if n_per_class < 1:
        raise InputError(
            f"generate_dataset: n_per_class must be a positive int (received {n_per_class!r}); "
            f"fix: pass e.g. n_per_class=100"
        )
    seed = _check_seed(seed)
    out = pathlib.Path(out_dir)
    images_dir, masks_dir = out / "images", out / "masks"
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)

    total = n_per_class * len(CLASS_NAMES)
    step = max(1, total // 10)
    rows = []
    for i in range(total):
        case = generate_case(seed * 1_000_003 + i, (height, width), label=i % len(CLASS_NAMES))
        case_id = f"syn_{i:06d}"
        image_path = images_dir / f"{case_id}.jpg"
        if not cv2.imwrite(str(image_path), cv2.cvtColor(case.image, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, 95]):
            raise OSError(f"generate_dataset: could not write {image_path}; check the directory is writable")
        mask_path = masks_dir / f"{case_id}.png"
        if not cv2.imwrite(str(mask_path), case.mask * np.uint8(255)):
            raise OSError(f"generate_dataset: could not write {mask_path}; check the directory is writable")
        rows.append({"id": case_id, "label": case.label, "class_name": case.class_name, **case.metadata})
        if progress and ((i + 1) % step == 0 or i + 1 == total):
            print(f"generate_dataset: {i + 1}/{total} cases ({100 * (i + 1) // total}%)",
                  file=sys.stderr, flush=True)

    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(out / "labels.csv", table.getvalue().encode("utf-8"))
    return out


def read_labels_csv(path: str | os.PathLike) -> list[dict]:
    """Read a labels.csv written by generate_dataset (or the dataset directory).

    Returns one dict per row with keys CSV_FIELDS; label, age and skin_tone are ints.
    The file is parsed by :func:`edgederm.data.labels.read_labels_table`, the one
    labels.csv parser; this adds the checks of the synthetic columns.
    """
    from edgederm.data.labels import read_labels_table
    from edgederm.data.tables import parse_csv_value

    table = read_labels_table(path)
    missing = [name for name in CSV_FIELDS if name not in table.header]
    if missing:
        raise InputError(
            f"read_labels_csv: {str(table.path)!r} lacks columns {missing} (found "
            f"{table.header}); expected header {','.join(CSV_FIELDS)}; fix: "
            f"regenerate it with generate_dataset"
        )
    rows = []
    for row in table.rows:
        values = {k: parse_csv_value(v) for k, v in row.values.items()}
        class_name = table.class_names[row.label] if row.label is not None else None
        record = {"id": row.id, "label": row.label, "class_name": class_name, **values}
        if not all(isinstance(record[k], int) for k in ("label", "age", "skin_tone")):
            raise InputError(
                f"read_labels_csv: {str(table.path)!r} line {row.line}: label, age and skin_tone "
                f"must be integers (received {record!r}); fix: regenerate the file"
            )
        rows.append(record)
    return rows

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
import math
import operator
import os
import pathlib
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

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
_MEL_GREY = np.array((138, 134, 146), np.float32)
_MEL_BLUE_WHITE = np.array((118, 146, 184), np.float32)
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


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """Hermite step from 0 at ``edge0`` to 1 at ``edge1`` (either order)."""
    t = (x - np.float32(edge0)) * np.float32(1.0 / (edge1 - edge0))
    np.clip(t, 0.0, 1.0, out=t)
    return t * t * (np.float32(3.0) - np.float32(2.0) * t)


def _grid(rng: np.random.Generator, n: int) -> np.ndarray:
    """An n x n grid of standard normal values: the seed of a smooth random field."""
    return rng.standard_normal((n, n), dtype=np.float32)


def _field(grid: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize a small random grid to a smooth width x height field (float32)."""
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def _lerp_rgb(base: np.ndarray, colour: np.ndarray, weight: np.ndarray) -> None:
    """In place: base += weight * (colour - base), colour an RGB triple."""
    base += weight[..., None] * (colour - base)


# --------------------------------------------------------------------------- the plan


@dataclass
class _Plan:
    """Every random decision for one case, in resolution-independent units.

    Lengths are fractions of s = min(height, width); the lesion centre is an offset
    from the image centre in the same unit.
    """

    label: int
    tone: int
    metadata: dict
    skin_rgb: np.ndarray
    centre: tuple[float, float]  # (x, y) offset from the image centre, units of s
    radius: float  # mean lesion radius, units of s
    outline: np.ndarray  # radius (units of s) at _OUTLINE_VERTICES angles
    edge_width: np.ndarray  # soft edge width per outline angle, units of s
    grids: dict
    params: dict


def _draw_plan(rng: np.random.Generator, label: int | None) -> _Plan:
    drawn_label = int(rng.integers(len(CLASS_NAMES)))  # drawn always: keeps the stream aligned
    label = drawn_label if label is None else label

    tone = int(rng.integers(1, 7))
    skin_rgb = _SKIN_RGB[tone - 1] * (1.0 + 0.035 * rng.standard_normal(3)).astype(np.float32)
    skin_rgb *= np.float32(1.0 + 0.05 * rng.standard_normal())

    mean_age, sd_age, p_male, p_site = _META[label]
    metadata = {
        "age": int(np.clip(round(rng.normal(mean_age, sd_age)), 1, 95)),
        "sex": SEXES[int(rng.random() < p_male)],
        "site": SITES[int(rng.choice(len(SITES), p=np.asarray(p_site) / sum(p_site)))],
        "skin_tone": tone,
    }

    # Outline: ellipse times a harmonic perturbation whose strength is the class cue.
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
        envelope = np.where(
            (k >= 2) & (k <= 7), 0.16 / np.sqrt(np.maximum(k - 1, 1)), 0.0
        ) + np.where(k >= 8, 0.022, 0.0)
    else:
        envelope = np.where((k >= 2) & (k <= 5), 0.05, 0.0)
    theta = np.linspace(0, 2 * math.pi, _OUTLINE_VERTICES, endpoint=False)
    ellipse = 1.0 / np.sqrt(
        (np.cos(theta - tilt) * math.sqrt(q)) ** 2 + (np.sin(theta - tilt) / math.sqrt(q)) ** 2
    )
    wobble = 1.0 + (envelope * amps)[None, :] @ np.cos(np.outer(k, theta) + phases[:, None])
    shape = ellipse * wobble[0]
    shape /= math.sqrt(np.mean(shape**2))  # unit mean-square radius: area set by diameter
    radius = diameter / 2

    params: dict = {}
    grids: dict = {
        "shade": _grid(rng, 4),
        "mottle": _grid(rng, 36),
        "tone": _grid(rng, 9),
    }
    edge_phase = rng.uniform(0, 2 * math.pi)

    if label == NEVUS:
        params["colour"] = _NEVUS_LIGHT + rng.random() * (_NEVUS_DARK - _NEVUS_LIGHT)
        params["centre_dark"] = rng.uniform(-0.05, 0.2)
        params["net_strength"] = rng.uniform(0.3, 0.45)
        params["net_cell"] = rng.uniform(0.028, 0.04)
        params["net_threshold"] = rng.uniform(0.1, 0.45)
        params["net_warp"] = 0.15
        params["net_angle"] = rng.uniform(0, math.pi)
        params["net_phase"] = rng.uniform(0, 2 * math.pi, 3)
        grids["warp_x"], grids["warp_y"] = _grid(rng, 10), _grid(rng, 10)
        edge_width = np.full(_OUTLINE_VERTICES, 0.02)
    elif label == MELANOMA:
        params["asym_angle"] = rng.uniform(0, 2 * math.pi)
        grids["dark"], grids["black"], grids["grey"] = _grid(rng, 9), _grid(rng, 9), _grid(rng, 9)
        # Blue-white veil: an ellipse off-centre inside the lesion.
        v_dir = rng.uniform(0, 2 * math.pi)
        v_dist = rng.uniform(0.05, 0.45)
        params["veil"] = (
            v_dist * math.cos(v_dir),
            v_dist * math.sin(v_dir),
            rng.uniform(0.3, 0.5),
            rng.uniform(0.22, 0.4),
            rng.uniform(0, math.pi),
            rng.uniform(0.7, 0.9),
        )
        # Streaks: 1-2 sectors of the periphery.
        n_sectors = int(rng.integers(1, 3))
        sector_angles = rng.uniform(0, 2 * math.pi, n_sectors)
        n_streaks = int(rng.integers(5, 15))
        params["streaks"] = [
            (
                sector_angles[int(rng.integers(n_sectors))] + rng.uniform(-0.6, 0.6),
                rng.uniform(0.72, 0.85),  # start, fraction of the local radius
                rng.uniform(1.08, 1.3),  # tip, fraction of the local radius
                rng.uniform(0.02, 0.04),  # base width, units of lesion radius * 2
            )
            for _ in range(n_streaks)
        ]
        # Irregular black dots, crowded in one sector.
        dot_sector = rng.uniform(0, 2 * math.pi)
        n_dots = int(rng.integers(4, 17))
        params["dots"] = [
            (
                dot_sector + rng.normal(0, 0.8),
                rng.uniform(0.45, 0.92),
                rng.uniform(0.006, 0.014),
                rng.uniform(0.25, 0.45),
            )
            for _ in range(n_dots)
        ]
        params["net_strength"] = rng.uniform(0.45, 0.65)
        params["net_cell"] = rng.uniform(0.03, 0.05)
        params["net_threshold"] = rng.uniform(0.3, 0.7)
        params["net_warp"] = 0.7
        params["net_angle"] = rng.uniform(0, math.pi)
        params["net_phase"] = rng.uniform(0, 2 * math.pi, 3)
        grids["warp_x"], grids["warp_y"] = _grid(rng, 14), _grid(rng, 14)
        grids["net_patch"], grids["net_thick"] = _grid(rng, 8), _grid(rng, 10)
        # Abrupt in places, fuzzy in others.
        edge_width = 0.004 + 0.012 * (0.5 + 0.5 * np.cos(theta - edge_phase)) ** 2
    else:
        params["colour"] = _VASC_PINK + rng.random() * (_VASC_PURPLE - _VASC_PINK)
        n_lacunae = int(rng.integers(8, 23))
        lacunae = []
        for _ in range(n_lacunae):
            r_frac = rng.uniform(0.12, 0.3)  # of the lesion radius
            angle = rng.uniform(0, 2 * math.pi)
            dist = math.sqrt(rng.random())
            tint = rng.random()
            purple = rng.random() < 0.2
            lacunae.append((angle, dist, r_frac, tint, purple))
        params["lacunae"] = lacunae
        edge_width = np.full(_OUTLINE_VERTICES, 0.005)

    # Hair: often none, otherwise a few dark curves crossing the field.
    n_hair = 0 if rng.random() < 0.35 else int(rng.integers(1, 13))
    params["hair"] = [
        (
            rng.uniform(-0.6, 0.6, 2),  # a point the hair passes through (units of s from centre)
            rng.uniform(0, math.pi),  # direction
            rng.uniform(0.35, 1.3),  # length
            rng.uniform(-0.25, 0.25),  # bend (control point offset / length)
            rng.uniform(0.0018, 0.0045),  # thickness
            rng.uniform(0.15, 0.45),  # how much light the hair lets through
        )
        for _ in range(n_hair)
    ]
    has_vignette = rng.random() > 0.25
    params["vignette"] = (
        rng.uniform(0.92, 1.35),  # radius, units of s/2
        rng.uniform(0.85, 1.0) if has_vignette else 0.0,  # depth of the dark border
        rng.uniform(0.04, 0.1),  # softness
    )
    params["noise_sigma"] = rng.uniform(1.0, 3.0)
    params["jpeg_quality"] = int(rng.integers(70, 96))

    # Keep the lesion (streaks included) inside the frame.
    reach = 1.3 if label == MELANOMA else 1.0
    limit = 0.47 - max(abs(jitter[0]), abs(jitter[1]))
    radius = min(radius, limit / (reach * float(shape.max())))

    return _Plan(
        label=label,
        tone=tone,
        metadata=metadata,
        skin_rgb=skin_rgb.astype(np.float32),
        centre=(float(jitter[0]), float(jitter[1])),
        radius=float(radius),
        outline=(shape * radius).astype(np.float64),
        edge_width=np.asarray(edge_width, dtype=np.float64),
        grids=grids,
        params=params,
    )


# --------------------------------------------------------------------------- rendering


class _Frame:
    """Maps resolution-independent units (fractions of s around the lesion) to pixels."""

    def __init__(self, plan: _Plan, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.s = float(min(height, width))
        # Continuous pixel coordinates: pixel i covers [i, i + 1).
        self.cx = width / 2 + plan.centre[0] * self.s
        self.cy = height / 2 + plan.centre[1] * self.s

    def to_px(self, u: np.ndarray | float, v: np.ndarray | float) -> tuple[Any, Any]:
        return self.cx + np.multiply(u, self.s), self.cy + np.multiply(v, self.s)


def _outline_radius(plan: _Plan, angles: np.ndarray) -> np.ndarray:
    table = np.linspace(0, 2 * math.pi, _OUTLINE_VERTICES, endpoint=False)
    return np.interp(angles, table, plan.outline, period=2 * math.pi)


def _render_smooth(plan: _Plan, frame: _Frame, gh: int, gw: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The low-frequency picture at gh x gw: skin, lesion colours, edge, veil, streaks,
    vignette. Returns (RGB float32 image, network strength field or None)."""
    p, g = plan.params, plan.grids
    H, W, s = frame.height, frame.width, frame.s
    # Normalised coordinates (units of s) of the smooth-grid pixel centres.
    xs = (((np.arange(gw, dtype=np.float32) + 0.5) * (W / gw)) - frame.cx) / s
    ys = (((np.arange(gh, dtype=np.float32) + 0.5) * (H / gh)) - frame.cy) / s
    dx = np.broadcast_to(xs[None, :], (gh, gw))
    dy = np.broadcast_to(ys[:, None], (gh, gw))
    r = np.hypot(dx, dy)
    angle = np.arctan2(dy, dx)
    r_edge = _outline_radius(plan, angle).astype(np.float32)
    w_edge = np.interp(
        angle, np.linspace(0, 2 * math.pi, _OUTLINE_VERTICES, endpoint=False), plan.edge_width,
        period=2 * math.pi,
    ).astype(np.float32)
    rho = r / r_edge  # 0 at the centre, 1 on the border
    alpha = np.clip((r_edge - r) / w_edge + np.float32(0.5), 0.0, 1.0)

    # Skin: colour, low-frequency shading and mottled texture.
    shade = _field(g["shade"], gw, gh)
    shade *= np.float32(0.06)
    mottle = _field(g["mottle"], gw, gh)
    shade += np.float32(0.025) * mottle
    shade += np.float32(1.0)
    img = shade[..., None] * plan.skin_rgb

    tone_idx = plan.tone - 1
    lesion_var = _field(g["tone"], gw, gh)
    net_strength = None
    if plan.label == NEVUS:
        colour = p["colour"] * _PIGMENT_GAIN[tone_idx]
        gain = np.float32(1.0) + np.float32(0.05) * lesion_var
        gain -= np.float32(p["centre_dark"]) * np.clip(1.0 - rho * rho, 0.0, 1.0)
        lesion = gain[..., None] * colour
        net_strength = np.float32(p["net_strength"]) * alpha * _smoothstep(1.0, 0.65, rho)
    elif plan.label == MELANOMA:
        pg, vg = _PIGMENT_GAIN[tone_idx], _VEIL_GAIN[tone_idx]
        a = p["asym_angle"]
        toward = (dx * np.float32(math.cos(a)) + dy * np.float32(math.sin(a))) / np.float32(plan.radius)
        np.clip(toward, -1.2, 1.2, out=toward)
        lesion = np.empty((gh, gw, 3), np.float32)
        lesion[:] = _MEL_LIGHT_BROWN * pg
        lesion *= (np.float32(1.0) + np.float32(0.06) * lesion_var)[..., None]
        f = _field(g["dark"], gw, gh)
        f += np.float32(0.9) * toward
        _lerp_rgb(lesion, _MEL_DARK_BROWN * pg, _smoothstep(-0.35, 0.35, f))
        f = _field(g["black"], gw, gh)
        f += np.float32(0.9) * toward - np.float32(0.55)
        _lerp_rgb(lesion, _MEL_BLACK * pg, np.float32(0.9) * _smoothstep(-0.25, 0.25, f))
        f = _field(g["grey"], gw, gh)
        f -= np.float32(0.5) * toward + np.float32(0.35)
        _lerp_rgb(lesion, _MEL_GREY * vg, np.float32(0.8) * _smoothstep(-0.2, 0.3, f))
        vx, vy, va, vb, vrot, vop = p["veil"]
        ex = dx / np.float32(plan.radius) - np.float32(vx)
        ey = dy / np.float32(plan.radius) - np.float32(vy)
        c, sn = np.float32(math.cos(vrot)), np.float32(math.sin(vrot))
        e = ((ex * c + ey * sn) / np.float32(va)) ** 2 + ((ey * c - ex * sn) / np.float32(vb)) ** 2
        veil = _smoothstep(1.3, 0.55, e)
        veil *= np.float32(vop) * alpha
        _lerp_rgb(lesion, _MEL_BLUE_WHITE * vg, veil)
        # Streaks: tapered dark-brown pseudopods from inside the lesion across the border.
        canvas = np.zeros((gh, gw), np.uint8)
        sx, sy = gw / W, gh / H
        for poly in _streak_polygons(plan, frame):
            pts = np.stack([(poly[:, 0] * sx - 0.5) * 16, (poly[:, 1] * sy - 0.5) * 16], axis=1)
            cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
        streak = canvas.astype(np.float32) * np.float32(1 / 255)
        _lerp_rgb(lesion, _MEL_DARK_BROWN * pg, np.float32(0.85) * streak)
        np.maximum(alpha, streak, out=alpha)
        patch = _smoothstep(-0.2, 0.4, _field(g["net_patch"], gw, gh))
        net_strength = np.float32(p["net_strength"]) * alpha * patch * _smoothstep(1.05, 0.85, rho)
    else:
        colour = p["colour"] * _VESSEL_GAIN[tone_idx]
        gain = np.float32(1.0) + np.float32(0.06) * lesion_var
        lesion = gain[..., None] * colour

    _lerp_rgb(img, lesion, alpha)

    v_radius, v_depth, v_soft = p["vignette"]
    cx0, cy0 = (frame.cx - plan.centre[0] * s), (frame.cy - plan.centre[1] * s)
    rv = np.hypot(
        (((np.arange(gw, dtype=np.float32) + 0.5) * (W / gw)) - cx0)[None, :],
        (((np.arange(gh, dtype=np.float32) + 0.5) * (H / gh)) - cy0)[:, None],
    ) / np.float32(s / 2)
    vig = np.float32(1.0) - np.float32(0.12) * (rv / np.float32(v_radius)) ** 2
    if v_depth > 0:
        vig -= np.float32(v_depth) * _smoothstep(v_radius, v_radius + v_soft, rv)
    np.clip(vig, 0.0, 1.0, out=vig)
    img *= vig[..., None]
    return img, net_strength


def _streak_polygons(plan: _Plan, frame: _Frame) -> list[np.ndarray]:
    """Melanoma streaks as polygons in continuous full-resolution pixel coordinates."""
    polys = []
    for angle, start, tip, width in plan.params.get("streaks", ()):
        r_local = float(_outline_radius(plan, np.array([angle]))[0])
        half = width * plan.radius
        ca, sa = math.cos(angle), math.sin(angle)
        r0, r1 = start * r_local, tip * r_local
        # Base (two points either side), a slight bulb near the tip, then the tip.
        u = np.array([r0 * ca - half * sa, r0 * ca + half * sa, r1 * 0.93 * ca + 0.55 * half * sa,
                      r1 * ca, r1 * 0.93 * ca - 0.55 * half * sa])
        v = np.array([r0 * sa + half * ca, r0 * sa - half * ca, r1 * 0.93 * sa - 0.55 * half * ca,
                      r1 * sa, r1 * 0.93 * sa + 0.55 * half * ca])
        x, y = frame.to_px(u, v)
        polys.append(np.stack([x, y], axis=1))
    return polys


def _fill_px(canvas: np.ndarray, polys: list[np.ndarray], value: int, aa: bool = False) -> None:
    """Fill polygons given in continuous pixel coordinates (sub-pixel accurate)."""
    pts = [np.round((poly - 0.5) * 16).astype(np.int32) for poly in polys]
    cv2.fillPoly(canvas, pts, value, cv2.LINE_AA if aa else cv2.LINE_8, shift=4)


def _network(plan: _Plan, frame: _Frame, box: tuple[int, int, int, int]) -> np.ndarray:
    """Pigment network lines (1 on a line, 0 in a hole) inside box = (y0, y1, x0, x1).

    A honeycomb from three plane waves at 120 degrees; its low level set is a connected
    web around round holes. Warping the coordinates with a smooth random displacement
    makes it slightly irregular (nevus) or distorted, with cells of varying size
    (melanoma)."""
    p, g = plan.params, plan.grids
    y0, y1, x0, x1 = box
    H, W, s = frame.height, frame.width, frame.s
    k = 2 * math.pi / p["net_cell"]
    warp = p["net_warp"] * p["net_cell"] * k  # displacement amplitude, in radians of phase
    wx = cv2.resize(g["warp_x"], (W, H), interpolation=cv2.INTER_CUBIC)[y0:y1, x0:x1]
    wy = cv2.resize(g["warp_y"], (W, H), interpolation=cv2.INTER_CUBIC)[y0:y1, x0:x1]
    wx *= np.float32(warp)
    wy *= np.float32(warp)
    xs = ((np.arange(x0, x1, dtype=np.float64) + 0.5 - frame.cx) / s) * k
    ys = ((np.arange(y0, y1, dtype=np.float64) + 0.5 - frame.cy) / s) * k
    h = np.zeros((y1 - y0, x1 - x0), np.float32)
    tmp = np.empty_like(h)
    for i in range(3):
        a = p["net_angle"] + i * 2 * math.pi / 3
        ca, sa = math.cos(a), math.sin(a)
        phase = np.add.outer((ys * sa + p["net_phase"][i]).astype(np.float32), (xs * ca).astype(np.float32))
        np.multiply(wx, np.float32(ca), out=tmp)
        phase += tmp
        np.multiply(wy, np.float32(sa), out=tmp)
        phase += tmp
        np.cos(phase, out=phase)
        h += phase
    threshold: Any = np.float32(p["net_threshold"])
    if "net_thick" in g:  # atypical network: line thickness varies over the lesion
        thick = cv2.resize(g["net_thick"], (W, H), interpolation=cv2.INTER_CUBIC)[y0:y1, x0:x1]
        threshold = threshold + np.float32(0.6) * thick
        h -= threshold
        return _smoothstep(0.45, -0.45, h)
    return _smoothstep(float(threshold) + 0.45, float(threshold) - 0.45, h)


def _render(plan: _Plan, height: int, width: int, noise_rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    frame = _Frame(plan, height, width)
    s, p = frame.s, plan.params
    f = min(1.0, _SMOOTH_MAX_SIDE / max(height, width))
    gh, gw = max(1, round(height * f)), max(1, round(width * f))

    smooth, net_strength = _render_smooth(plan, frame, gh, gw)
    if (gh, gw) == (height, width):
        img = smooth
    else:
        img = cv2.resize(smooth, (width, height), interpolation=cv2.INTER_LINEAR)

    # The mask: the outline polygon plus streaks, at full resolution.
    theta = np.linspace(0, 2 * math.pi, _OUTLINE_VERTICES, endpoint=False)
    ox, oy = frame.to_px(plan.outline * np.cos(theta), plan.outline * np.sin(theta))
    outline_px = np.stack([ox, oy], axis=1)
    streaks_px = _streak_polygons(plan, frame)
    mask = np.zeros((height, width), np.uint8)
    _fill_px(mask, [outline_px], 1)
    for poly in streaks_px:
        _fill_px(mask, [poly], 1)

    all_px = np.concatenate([outline_px] + streaks_px, axis=0)
    x0 = max(0, int(math.floor(all_px[:, 0].min())) - 2)
    x1 = min(width, int(math.ceil(all_px[:, 0].max())) + 2)
    y0 = max(0, int(math.floor(all_px[:, 1].min())) - 2)
    y1 = min(height, int(math.ceil(all_px[:, 1].max())) + 2)
    box = (y0, y1, x0, x1)

    # Vascular lacunae: crisp, antialiased discs drawn at full resolution.
    if plan.label == VASCULAR:
        _draw_lacunae(plan, frame, img, box)

    # Multiplicative detail at full resolution: network, dots, hair.
    detail: np.ndarray | None = None
    if net_strength is not None:
        detail = np.ones((height, width), np.float32)
        if (gh, gw) == (height, width):
            strength = net_strength[y0:y1, x0:x1]
        else:
            strength = cv2.resize(net_strength, (width, height), interpolation=cv2.INTER_LINEAR)[y0:y1, x0:x1]
        lines = _network(plan, frame, box)
        lines *= strength
        detail[y0:y1, x0:x1] -= lines
    if p.get("dots") or p["hair"]:
        cover = np.zeros((height, width), np.uint8)
        for angle, dist, radius, light in p.get("dots", ()):
            r_local = float(_outline_radius(plan, np.array([angle]))[0])
            x, y = frame.to_px(dist * r_local * math.cos(angle), dist * r_local * math.sin(angle))
            cv2.circle(cover, (round((x - 0.5) * 16), round((y - 0.5) * 16)),
                       max(8, round(radius * s * 16)), round(255 * (1 - light)), -1, cv2.LINE_AA, shift=4)
        for point, direction, length, bend, thick, light in p["hair"]:
            t = np.linspace(-0.5, 0.5, 25)
            d = np.array([math.cos(direction), math.sin(direction)])
            n = np.array([-d[1], d[0]])
            curve = point[None, :] + (t * length)[:, None] * d + ((0.25 - t * t) * 4 * bend * length)[:, None] * n
            x, y = frame.to_px(curve[:, 0], curve[:, 1])
            pts = np.round(np.stack([x - 0.5, y - 0.5], axis=1) * 16).astype(np.int32)
            cv2.polylines(cover, [pts], False, round(255 * (1 - light)),
                          max(1, round(thick * s)), cv2.LINE_AA, shift=4)
        if detail is None:
            detail = np.ones((height, width), np.float32)
        shade = cover.astype(np.float32)
        shade *= np.float32(-1 / 255)
        shade += np.float32(1.0)
        detail *= shade
    if detail is not None:
        img *= detail[..., None]

    # Sensor noise (+0.5 so that the cast below rounds), then 8 bits and a JPEG trip.
    noise = noise_rng.standard_normal((height, width), dtype=np.float32)
    noise *= np.float32(p["noise_sigma"])
    noise += np.float32(0.5)
    img += noise[..., None]
    np.clip(img, 0, 255, out=img)
    rgb = img.astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, p["jpeg_quality"]])
    if not ok:  # pragma: no cover - OpenCV always has a JPEG codec
        raise RuntimeError("OpenCV could not encode a JPEG")
    rgb = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return rgb, mask


def _draw_lacunae(plan: _Plan, frame: _Frame, img: np.ndarray, box: tuple[int, int, int, int]) -> None:
    """Red lacunae, blended into img (float RGB) through antialiased coverage."""
    y0, y1, x0, x1 = box
    s = frame.s
    colour = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
    cover = np.zeros((y1 - y0, x1 - x0), np.uint8)
    gain = _VESSEL_GAIN[plan.tone - 1]
    for angle, dist, r_frac, tint, purple in plan.params["lacunae"]:
        r_local = float(_outline_radius(plan, np.array([angle]))[0])
        radius = r_frac * plan.radius
        reach = max(0.0, 0.9 * r_local - radius) * dist
        x, y = frame.to_px(reach * math.cos(angle), reach * math.sin(angle))
        centre = (round((x - x0 - 0.5) * 16), round((y - y0 - 0.5) * 16))
        r_px = max(8, round(radius * s * 16))
        rgb = _LACUNA_PURPLE if purple else _LACUNA_RED + tint * (_LACUNA_DARK - _LACUNA_RED)
        rgb = np.clip(rgb * gain, 0, 255)
        # Colour one pixel wider than the coverage, so the antialiased rim has it.
        cv2.circle(colour, centre, r_px + 16, tuple(float(c) for c in rgb), -1, cv2.LINE_8, shift=4)
        cv2.circle(cover, centre, r_px, 255, -1, cv2.LINE_AA, shift=4)
    weight = cover.astype(np.float32)
    weight *= np.float32(1 / 255)
    region = img[y0:y1, x0:x1]
    region += weight[..., None] * (colour.astype(np.float32) - region)


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

    fd, tmp_name = tempfile.mkstemp(prefix=".labels.", suffix=".csv.tmp", dir=out)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, out / "labels.csv")
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return out


def read_labels_csv(path: str | os.PathLike) -> list[dict]:
    """Read a labels.csv written by generate_dataset (or the dataset directory).

    Returns one dict per row with keys CSV_FIELDS; label, age and skin_tone are ints.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / "labels.csv"
    if not path.is_file():
        raise InputError(
            f"read_labels_csv: {str(path)!r} does not exist; expected a labels.csv written by "
            f"generate_dataset (or its directory); fix: run generate_dataset first"
        )
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [name for name in CSV_FIELDS if name not in (reader.fieldnames or ())]
        if missing:
            raise InputError(
                f"read_labels_csv: {str(path)!r} lacks columns {missing} (found "
                f"{reader.fieldnames}); expected header {','.join(CSV_FIELDS)}; fix: "
                f"regenerate it with generate_dataset"
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                for key in ("label", "age", "skin_tone"):
                    row[key] = int(row[key])
            except (TypeError, ValueError):
                raise InputError(
                    f"read_labels_csv: {str(path)!r} line {line}: label, age and skin_tone "
                    f"must be integers (received {row!r}); fix: regenerate the file"
                ) from None
            rows.append(row)
    return rows

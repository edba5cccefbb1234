"""The random description of one synthetic case (class, skin, lesion geometry, artefacts).

Every quantity is drawn from the case's generator in an order that does not depend on
the image size, so the same seed is the same lesion at any resolution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

import edgederm.data.synthetic.palette as palette

CLASS_NAMES: tuple[str, ...] = ("nevus", "melanoma", "vascular")
SITES: tuple[str, ...] = ("back", "face", "upper_extremity", "lower_extremity", "trunk", "scalp")
SEXES: tuple[str, ...] = ("female", "male")
NEVUS, MELANOMA, VASCULAR = 0, 1, 2

# Number of vertices of the lesion outline (enough for the jagged melanoma harmonics).
_OUTLINE_VERTICES = 360
_N_HARMONICS = 24

# Metadata distributions per class: (mean age, sd age, P(male), P(site) over SITES).
_META = {
    NEVUS: (35.0, 12.0, 0.45, (0.28, 0.06, 0.20, 0.20, 0.24, 0.02)),
    MELANOMA: (61.0, 13.0, 0.62, (0.38, 0.09, 0.10, 0.10, 0.28, 0.05)),
    VASCULAR: (45.0, 17.0, 0.42, (0.12, 0.30, 0.10, 0.30, 0.15, 0.03)),
}

THETA = np.linspace(0.0, 2 * math.pi, _OUTLINE_VERTICES, endpoint=False)
_HAIR_T = np.linspace(-0.5, 0.5, 25)


def _grid(rng: np.random.Generator, n: int) -> np.ndarray:
    """An n x n grid of standard normal values: the seed of a smooth random field.

    Its shape never depends on the image size, so the stream stays aligned."""
    return rng.standard_normal((n, n), dtype=np.float32)


def outline_radius(outline: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Lesion radius (units of s) at the given angles, from the tabulated outline."""
    return np.interp(angles, THETA, outline, period=2 * math.pi)


@dataclass
class Plan:
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
    outline: np.ndarray  # radius at the angles THETA
    edge_width: np.ndarray  # width of the soft edge at the angles THETA
    grids: dict  # name -> small random grid (a smooth field once resized)
    params: dict  # scalars per class
    streaks: list  # melanoma: polygons (k x 2), in lesion coordinates
    dots: np.ndarray  # melanoma: rows (u, v, radius, light)
    lacunae: list  # vascular: (u, v, radius, rgb)
    hairs: list  # (curve (25 x 2) around the lesion centre, thickness, light)


def draw_plan(rng: np.random.Generator, label: int | None) -> Plan:
    drawn_label = int(rng.integers(len(CLASS_NAMES)))  # always drawn: keeps the stream aligned
    label = drawn_label if label is None else label

    tone = int(rng.integers(1, 7))
    skin_rgb = palette.SKIN_RGB[tone - 1] * (1.0 + 0.035 * rng.standard_normal(3))
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
        (np.cos(THETA - tilt) * math.sqrt(q)) ** 2 + (np.sin(THETA - tilt) / math.sqrt(q)) ** 2
    )
    wobble = 1.0 + (envelope * amps) @ np.cos(np.outer(k, THETA) + phases[:, None])
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
        params["colour"] = palette.NEVUS_LIGHT + rng.random() * (palette.NEVUS_DARK - palette.NEVUS_LIGHT)
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
            r_local = float(outline_radius(outline, np.array([angle]))[0])
            along = np.array([start, start, 0.93 * tip, tip, 0.93 * tip]) * r_local
            across = np.array([-half, half, 0.55 * half, 0.0, -0.55 * half])
            ca, sa = math.cos(angle), math.sin(angle)
            streaks.append(np.stack([along * ca - across * sa, along * sa + across * ca], axis=1))
        # Irregular black dots, crowded in one sector.
        dot_sector = rng.uniform(0, 2 * math.pi)
        n_dots = int(rng.integers(4, 17))
        angle = dot_sector + rng.normal(0, 0.8, n_dots)
        dist = rng.uniform(0.45, 0.92, n_dots) * outline_radius(outline, angle)
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
        edge_width = 0.004 + 0.012 * (0.5 + 0.5 * np.cos(THETA - edge_phase)) ** 2
    else:
        params["colour"] = palette.VASC_PINK + rng.random() * (palette.VASC_PURPLE - palette.VASC_PINK)
        gain = palette.VESSEL_GAIN[tone - 1]
        for _ in range(int(rng.integers(10, 28))):
            r_lac = rng.uniform(0.09, 0.24) * radius
            angle = rng.uniform(0, 2 * math.pi)
            r_local = float(outline_radius(outline, np.array([angle]))[0])
            dist = math.sqrt(rng.random()) * max(0.0, 0.88 * r_local - r_lac)
            tint = rng.random()
            if rng.random() < 0.2:
                rgb = palette.LACUNA_PURPLE
            else:
                rgb = palette.LACUNA_RED + tint * (palette.LACUNA_DARK - palette.LACUNA_RED)
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

    return Plan(
        label=label, tone=tone, metadata=metadata, skin_rgb=skin_rgb.astype(np.float32),
        centre=(float(jitter[0]), float(jitter[1])), radius=float(radius), outline=outline,
        edge_width=np.asarray(edge_width, dtype=np.float64), grids=grids, params=params,
        streaks=streaks, dots=dots, lacunae=lacunae, hairs=hairs,
    )

"""Rendering a :class:`~edgederm.data.synthetic.plan.Plan` to an RGB image and its lesion mask."""
from __future__ import annotations

import math
from typing import Tuple

import cv2
import numpy as np

import edgederm.data.synthetic.palette as palette
from edgederm.data.synthetic.plan import MELANOMA, NEVUS, THETA, Plan, outline_radius

# Long side, in pixels, at which the smooth fields are rendered before resizing up.
_SMOOTH_MAX_SIDE = 512
_SMOOTH_MIN_SHORT_SIDE = 128
Box = Tuple[int, int, int, int]  # y0, y1, x0, x1


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """Hermite step from 0 at ``edge0`` to 1 at ``edge1`` (either order); new array."""
    t = (x - np.float32(edge0)) * np.float32(1.0 / (edge1 - edge0))
    np.clip(t, 0.0, 1.0, out=t)
    return t * t * (np.float32(3.0) - np.float32(2.0) * t)


def _field(grid: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize a small random grid to a smooth width x height field (float32)."""
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def _lerp_planes(planes: np.ndarray, colour: np.ndarray, weight: np.ndarray) -> None:
    """In place on a 3 x H x W image: planes += weight * (colour - planes).

    Planar layout on purpose: broadcasting over a trailing axis of 3 is ~10x slower."""
    tmp = colour.astype(np.float32)[:, None, None] - planes
    tmp *= weight
    planes += tmp


class _Frame:
    """Maps lesion coordinates (units of s around the lesion centre) to pixels.

    Continuous pixel coordinates: pixel i covers [i, i + 1), its centre is i + 0.5.
    """

    def __init__(self, plan: Plan, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.s = float(min(height, width))
        self.cx = width / 2 + plan.centre[0] * self.s
        self.cy = height / 2 + plan.centre[1] * self.s

    def fixed_point(self, uv: np.ndarray) -> np.ndarray:
        """Lesion coordinates (k x 2) -> OpenCV drawing coordinates with shift=4."""
        x = (self.cx - 0.5) + uv[..., 0] * self.s
        y = (self.cy - 0.5) + uv[..., 1] * self.s
        return np.round(np.stack([x, y], axis=-1) * 16).astype(np.int32)


def _render_smooth(plan: Plan, frame: _Frame, gh: int, gw: int) -> tuple[np.ndarray, np.ndarray | None]:
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
    r_edge = outline_radius(plan.outline, angle).astype(np.float32)
    w_edge = np.interp(angle, THETA, plan.edge_width, period=2 * math.pi).astype(np.float32)
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
        lesion = (p["colour"] * palette.PIGMENT_GAIN[tone_idx]).astype(np.float32)[:, None, None] * gain
        net_strength = np.float32(p["net"]["strength"]) * alpha * _smoothstep(1.0, 0.65, rho)
    elif plan.label == MELANOMA:
        pg, vg = palette.PIGMENT_GAIN[tone_idx], palette.VEIL_GAIN[tone_idx]
        a = p["asym_angle"]
        toward = (dx * np.float32(math.cos(a)) + dy * np.float32(math.sin(a))) / np.float32(plan.radius)
        np.clip(toward, -1.2, 1.2, out=toward)
        lesion = (palette.MEL_LIGHT_BROWN * pg)[:, None, None] * (np.float32(1.0) + np.float32(0.06) * variation)
        f = _field(g["dark"], gw, gh)
        f += np.float32(0.9) * toward
        _lerp_planes(lesion, palette.MEL_DARK_BROWN * pg, _smoothstep(-0.35, 0.35, f))
        f = _field(g["black"], gw, gh)
        f += np.float32(0.9) * toward - np.float32(0.55)
        _lerp_planes(lesion, palette.MEL_BLACK * pg, np.float32(0.9) * _smoothstep(-0.25, 0.25, f))
        f = _field(g["grey"], gw, gh)
        f -= np.float32(0.5) * toward + np.float32(0.5)
        _lerp_planes(lesion, palette.MEL_GREY * vg, np.float32(0.75) * _smoothstep(-0.2, 0.3, f))
        vx, vy, va, vb, vrot, vop = p["veil"]
        ex = dx / np.float32(plan.radius) - np.float32(vx)
        ey = dy / np.float32(plan.radius) - np.float32(vy)
        c, sn = np.float32(math.cos(vrot)), np.float32(math.sin(vrot))
        e = ((ex * c + ey * sn) / np.float32(va)) ** 2 + ((ey * c - ex * sn) / np.float32(vb)) ** 2
        e += np.float32(0.35) * _field(g["veil"], gw, gh)
        veil = _smoothstep(1.5, 0.3, e)
        veil *= np.float32(vop) * alpha
        _lerp_planes(lesion, palette.MEL_BLUE_WHITE * vg, veil)
        # Streaks: dark-brown pseudopods from inside the lesion across the border.
        canvas = np.zeros((gh, gw), np.uint8)
        small = _Frame(plan, gh, gw)
        small.s = s * gw / W  # same lesion coordinates, smaller pixels
        small.cx, small.cy = frame.cx * gw / W, frame.cy * gh / H
        cv2.fillPoly(canvas, [small.fixed_point(poly) for poly in plan.streaks], 255, cv2.LINE_AA, shift=4)
        streak = canvas.astype(np.float32)
        streak *= np.float32(1 / 255)
        _lerp_planes(lesion, palette.MEL_DARK_BROWN * pg, np.float32(0.85) * streak)
        patch = _smoothstep(-0.2, 0.4, _field(g["net_patch"], gw, gh))
        net_strength = np.float32(p["net"]["strength"]) * alpha * patch * _smoothstep(1.05, 0.85, rho)
        np.maximum(alpha, streak, out=alpha)
    else:
        gain = np.float32(1.0) + np.float32(0.06) * variation
        lesion = (p["colour"] * palette.VESSEL_GAIN[tone_idx]).astype(np.float32)[:, None, None] * gain

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


def _network(plan: Plan, frame: _Frame, box: Box) -> np.ndarray:
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


def render(plan: Plan, height: int, width: int, noise_rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
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
    outline_uv = np.stack([plan.outline * np.cos(THETA), plan.outline * np.sin(THETA)], axis=1)
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


def _draw_lacunae(plan: Plan, frame: _Frame, planes: list[np.ndarray], box: Box) -> None:
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

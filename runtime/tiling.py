"""Tiled inference for images larger than a model's input, in bounded memory.

The scheme is MONAI's ``sliding_window_inference`` (overlapping tiles, each
prediction weighted by a constant or gaussian window and normalised by the summed
weights), rewritten for a device with < 4 GB shared memory. Decisions taken where
MONAI is silent or does otherwise:

* The input stays uint8. Tiles are cut per batch and handed raw to the caller's
  ``predict``, which does its own preprocessing; a float copy of the full image is
  never made.
* No padding for sizes that do not divide: the last tile of a row/column is placed
  flush with the image edge, so it overlaps its neighbour more than the others.
  Only an axis shorter than the tile is padded, by *reflection* (``np.pad`` mode
  ``"reflect"``), because a constant black band looks like the dark vignette of a
  dermoscope and can pull predictions at the border; the padded part of the
  prediction is cropped away. Because such an axis lies wholly inside every tile,
  padding each tile is the same as padding the image, so the image is never copied.
* Accumulation happens in a *band* of ``tile`` rows that slides down the image.
  Tiles are processed row of tiles by row of tiles; as soon as the next row of
  tiles starts at ``y``, no future tile touches rows above ``y`` and they are
  normalised and handed on (to a full-size output, or to ``on_rows`` so that a
  caller can reduce to a uint8 mask on the fly). Memory therefore grows with the
  image width, not its area: ``(K + 1) x tile x W`` float32 accumulators.
  Batches may span rows of tiles; accumulation still happens in row-major order.
* Gaussian weights are floored at ``GAUSSIAN_FLOOR`` (relative to the centre) so a
  pixel seen only by tile edges, e.g. an image corner, never gets zero weight, and
  quantised to multiples of ``2**-WEIGHT_BITS``: the float32 weight sums are then
  exact, and so is ``weight * value`` for 8-bit-like values, so an identity or
  constant predictor is reconstructed to the last bit instead of drifting by a few
  ulps where many tiles overlap.

Also here: :func:`window_grid` / :func:`iter_windows`, the non-overlapping window
layout used by hierarchical (window -> region) classifiers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Iterator

import cv2
import numpy as np

from .errors import InputError
from .timings import Timings, timed

__all__ = [
    "BlendMode",
    "GAUSSIAN_FLOOR",
    "WEIGHT_BITS",
    "TileGrid",
    "TilingStats",
    "blend_weights",
    "iter_windows",
    "make_grid",
    "sliding_window",
    "window_grid",
]

# Smallest gaussian weight, relative to the centre weight of 1. exp(-16) at a tile
# corner with the default sigma would make corner pixels numerically fragile.
GAUSSIAN_FLOOR = 2.0**-10
# Gaussian weights are multiples of 2**-WEIGHT_BITS (see module docs).
WEIGHT_BITS = 12


class BlendMode(str, Enum):
    """How overlapping tile predictions are weighted before averaging."""

    CONSTANT = "constant"  # plain mean of the overlapping predictions
    GAUSSIAN = "gaussian"  # tile centres count more than tile edges (fewer seams)


@dataclass(frozen=True)
class TileGrid:
    """Top-left corners of the tiles covering a ``height x width`` image.

    Along an axis at least ``tile`` long the corners are ``0, stride, 2*stride, ...``
    and the last tile is flush with the image edge. Along a shorter axis there is
    one tile at 0 and the image is reflect-padded to ``tile`` (see module docs).
    """

    height: int
    width: int
    tile: int
    overlap: float
    stride: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def padded_height(self) -> int:
        """Rows the tiles span: the image height, or ``tile`` if the image is shorter."""
        return max(self.height, self.tile)

    @property
    def padded_width(self) -> int:
        """Columns the tiles span: the image width, or ``tile`` if the image is narrower."""
        return max(self.width, self.tile)

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def tiles(self) -> Iterator[tuple[int, int]]:
        """Yield ``(y, x)`` top-left corners in row-major order."""
        for y in self.ys:
            for x in self.xs:
                yield y, x


@dataclass
class TilingStats:
    """Filled in by :func:`sliding_window` when passed as ``stats=``.

    ``band_rows_max`` is the height of the row band the accumulators held (the
    memory that grows with width); ``accumulator_bytes`` their total size.
    """

    tiles: int = 0
    batches: int = 0
    band_rows_max: int = 0
    accumulator_bytes: int = 0


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_positive_int(name: str, value: object) -> int:
    if not _is_int(value) or int(value) < 1:  # type: ignore[call-overload]
        raise InputError(f"{name} must be an integer >= 1; got {value!r}")
    return int(value)  # type: ignore[call-overload]


def _check_overlap(overlap: object) -> float:
    if isinstance(overlap, (bool, np.bool_)) or not isinstance(overlap, (int, float, np.number)):
        raise InputError(f"overlap must be a number in [0, 1); got {overlap!r}")
    value = float(overlap)
    if not 0.0 <= value < 1.0:  # also rejects NaN
        raise InputError(
            f"overlap must be in [0, 1) (fraction of the tile shared with the next tile); "
            f"got {overlap!r}. Use e.g. 0.25"
        )
    return value


def _starts(length: int, tile: int, stride: int) -> tuple[int, ...]:
    if length <= tile:
        return (0,)
    # Every corner strictly before the flush-with-edge one, then the flush one.
    return tuple(range(0, length - tile, stride)) + (length - tile,)


def make_grid(height: int, width: int, tile: int, overlap: float) -> TileGrid:
    """Tile layout for a ``height x width`` image: ``stride = max(1, round(tile*(1-overlap)))``."""
    height = _check_positive_int("height", height)
    width = _check_positive_int("width", width)
    tile = _check_positive_int("tile", tile)
    overlap = _check_overlap(overlap)
    stride = max(1, int(round(tile * (1.0 - overlap))))
    return TileGrid(
        height=height,
        width=width,
        tile=tile,
        overlap=overlap,
        stride=stride,
        ys=_starts(height, tile, stride),
        xs=_starts(width, tile, stride),
    )


def _parse_blend(mode: BlendMode | str) -> BlendMode:
    try:
        return BlendMode(mode)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in BlendMode)
        raise InputError(f"blend mode {mode!r} is not known; expected one of {valid}") from None


def blend_weights(tile: int, mode: BlendMode | str, sigma_scale: float = 0.125) -> np.ndarray:
    """``tile x tile`` float32 weights, strictly positive, symmetric, max 1.

    Gaussian: ``sigma = sigma_scale * tile`` centred at ``(tile - 1) / 2`` (so the
    map is exactly symmetric), scaled to 1 at the centre and floored at
    :data:`GAUSSIAN_FLOOR`, in steps of ``2**-WEIGHT_BITS``.
    """
    tile = _check_positive_int("tile", tile)
    mode = _parse_blend(mode)
    if mode is BlendMode.CONSTANT:
        return np.ones((tile, tile), dtype=np.float32)
    if not (isinstance(sigma_scale, (int, float, np.number)) and float(sigma_scale) > 0):
        raise InputError(f"sigma_scale must be a number > 0; got {sigma_scale!r}")
    sigma = float(sigma_scale) * tile
    offsets = np.arange(tile, dtype=np.float64) - (tile - 1) / 2.0
    profile = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights = np.outer(profile, profile)
    weights /= weights.max()
    weights = np.round(weights * 2**WEIGHT_BITS) / 2**WEIGHT_BITS
    np.maximum(weights, GAUSSIAN_FLOOR, out=weights)
    return weights.astype(np.float32)


def _check_image(image: object, what: str = "image") -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise InputError(f"{what} must be a numpy array HxWxC uint8; got {type(image).__name__}")
    if image.ndim != 3:
        raise InputError(
            f"{what} must be 3-D HxWxC uint8; got shape {image.shape}"
            + ("; add a channel axis with image[..., None]" if image.ndim == 2 else "")
        )
    if image.dtype != np.uint8:
        raise InputError(
            f"{what} must be uint8 (the raw image; predict does the preprocessing); "
            f"got dtype {image.dtype}"
        )
    if min(image.shape) < 1:
        raise InputError(f"{what} is empty: shape {image.shape}")
    return image


def cut_tile(image: np.ndarray, y: int, x: int, tile: int) -> np.ndarray:
    """The ``tile`` x ``tile`` crop at (y, x), reflect-padded on an axis shorter than the tile."""
    crop = image[y : y + tile, x : x + tile]
    pad_y, pad_x = tile - crop.shape[0], tile - crop.shape[1]
    if pad_y or pad_x:
        # Only an axis shorter than the tile gets here, and it lies wholly inside the
        # crop, so padding the crop equals padding the whole image.
        crop = np.pad(crop, ((0, pad_y), (0, pad_x), (0, 0)), mode="reflect")
    return crop


def sliding_window(
    image: np.ndarray,
    predict: Callable[[np.ndarray], np.ndarray],
    *,
    tile: int,
    overlap: float = 0.25,
    blend: BlendMode | str = "gaussian",
    batch_size: int = 4,
    out_channels: int | None = None,
    out_dtype: np.dtype | type = np.float32,
    on_rows: Callable[[int, np.ndarray], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    stats: TilingStats | None = None,
    timings: Timings | None = None,
) -> np.ndarray | None:
    """Run ``predict`` over overlapping tiles of ``image`` and blend the results.

    Args:
        image: HxWxC uint8, the raw image.
        predict: takes a batch ``N x tile x tile x C`` uint8 (``N <= batch_size``)
            and returns ``N x K x tile x tile`` float predictions.
        tile: tile side in pixels.
        overlap: fraction in [0, 1) shared by neighbouring tiles.
        blend: ``"gaussian"`` or ``"constant"`` (:class:`BlendMode`).
        batch_size: tiles per ``predict`` call.
        out_channels: K, if known; otherwise taken from the first ``predict`` call.
        out_dtype: floating dtype of the returned array / the ``on_rows`` blocks.
        on_rows: if given, called as ``on_rows(y0, block)`` with each finalised
            ``K x rows x W`` block, top to bottom, covering every row once; the
            function then returns None and never holds a full-size output.
        progress: called as ``progress(done_tiles, total_tiles)`` after each batch.
        stats: a :class:`TilingStats` to fill in (tiles, batches, band size).
        timings: gains the milliseconds spent cutting tiles (``"tiles"``) and
            weighting, accumulating and handing on rows, ``on_rows`` included
            (``"blend"``); ``predict`` times itself (runtime/timings.py).

    Returns:
        ``K x H x W`` blended predictions, or None when ``on_rows`` is given.
    """
    image = _check_image(image)
    if not callable(predict):
        raise InputError(f"predict must be callable; got {type(predict).__name__}")
    batch_size = _check_positive_int("batch_size", batch_size)
    if out_channels is not None:
        out_channels = _check_positive_int("out_channels", out_channels)
    if on_rows is not None and not callable(on_rows):
        raise InputError(f"on_rows must be callable or None; got {type(on_rows).__name__}")
    if progress is not None and not callable(progress):
        raise InputError(f"progress must be callable or None; got {type(progress).__name__}")
    try:
        out_dtype = np.dtype(out_dtype)
    except TypeError as exc:
        raise InputError(f"out_dtype {out_dtype!r} is not a numpy dtype") from exc
    if out_dtype.kind != "f":
        raise InputError(
            f"out_dtype must be a floating dtype (predictions are blended averages); got "
            f"{out_dtype}. Reduce to a mask in on_rows instead"
        )
    height, width, _ = image.shape
    grid = make_grid(height, width, tile, overlap)
    weights = blend_weights(grid.tile, blend)
    return _run(image, predict, grid, weights, batch_size, out_channels, out_dtype, on_rows,
                progress, stats, timings)


def _run(
    image: np.ndarray,
    predict: Callable[[np.ndarray], np.ndarray],
    grid: TileGrid,
    weights: np.ndarray,
    batch_size: int,
    out_channels: int | None,
    out_dtype: np.dtype,
    on_rows: Callable[[int, np.ndarray], None] | None,
    progress: Callable[[int, int], None] | None,
    stats: TilingStats | None,
    timings: Timings | None,
) -> np.ndarray | None:
    tile = grid.tile
    height, width = grid.height, grid.width
    band_width = grid.padded_width
    blend_is_constant = bool(np.all(weights == 1.0))
    total = len(grid)

    # Band state; allocated once K is known (first predict call).
    channels = out_channels
    band_sum: np.ndarray | None = None
    band_weight: np.ndarray | None = None
    weighted: np.ndarray | None = None  # scratch K x tile x tile for pred * weights
    output: np.ndarray | None = None
    band_top = 0  # image row held in band row 0
    emitted = 0  # rows [0, emitted) of the image are final

    def finalise(until: int) -> None:
        """Normalise and hand on image rows [band_top, until), then slide the band."""
        nonlocal band_top, emitted
        assert band_sum is not None and band_weight is not None
        count = until - band_top
        if count <= 0:
            return
        keep = min(until, height) - band_top  # rows inside the real image
        if keep > 0:
            block_sum = band_sum[:, :keep, :width]
            block_weight = band_weight[:keep, :width]
            if output is not None:
                np.divide(block_sum, block_weight, out=output[:, band_top : band_top + keep],
                          casting="same_kind")
            else:
                assert on_rows is not None
                # At most `stride` rows per block (the last flush holds a whole tile),
                # so the caller's reduction never sees more than a regular step.
                for first in range(0, keep, grid.stride):
                    last = min(first + grid.stride, keep)
                    block = np.empty((block_sum.shape[0], last - first, width), dtype=out_dtype)
                    np.divide(block_sum[:, first:last], block_weight[first:last], out=block,
                              casting="same_kind")
                    on_rows(band_top + first, block)
            emitted = band_top + keep
        # Slide: rows still open move to the top of the band, the freed tail is zeroed.
        rows = band_sum.shape[1]
        rest = rows - count
        # Move in chunks of `count` rows: source and destination chunks never overlap,
        # so no temporary copy of the band is made.
        for dst in range(0, max(rest, 0), count):
            n = min(count, rest - dst)
            band_sum[:, dst : dst + n] = band_sum[:, dst + count : dst + count + n]
            band_weight[dst : dst + n] = band_weight[dst + count : dst + count + n]
        band_sum[:, max(rest, 0):] = 0.0
        band_weight[max(rest, 0):] = 0.0
        band_top = until

    def accumulate(pred: np.ndarray, y: int, x: int) -> None:
        assert band_sum is not None and band_weight is not None and weighted is not None
        rows = slice(y - band_top, y - band_top + tile)
        cols = slice(x, x + tile)
        if blend_is_constant:
            band_sum[:, rows, cols] += pred
        else:
            np.multiply(pred, weights, out=weighted)
            band_sum[:, rows, cols] += weighted
        band_weight[rows, cols] += weights

    corners = list(grid.tiles())
    done = 0
    for start in range(0, total, batch_size):
        batch_corners = corners[start : start + batch_size]
        with timed(timings, "tiles"):
            batch = np.empty((len(batch_corners), tile, tile, image.shape[2]), dtype=np.uint8)
            for i, (y, x) in enumerate(batch_corners):
                batch[i] = cut_tile(image, y, x, tile)
        pred = _check_prediction(predict(batch), len(batch_corners), tile, channels)
        del batch

        if band_sum is None:
            channels = pred.shape[1]
            band_rows = min(tile, grid.padded_height)
            band_sum = np.zeros((channels, band_rows, band_width), dtype=np.float32)
            band_weight = np.zeros((band_rows, band_width), dtype=np.float32)
            weighted = np.empty((channels, tile, tile), dtype=np.float32)
            if on_rows is None:
                output = np.empty((channels, height, width), dtype=out_dtype)
            if stats is not None:
                stats.band_rows_max = max(stats.band_rows_max, band_rows)
                stats.accumulator_bytes = band_sum.nbytes + band_weight.nbytes

        with timed(timings, "blend"):
            for i, (y, x) in enumerate(batch_corners):
                if y > band_top:
                    # A new row of tiles starts at y: nothing later touches rows above it.
                    finalise(y)
                accumulate(pred[i], y, x)

        done += len(batch_corners)
        if stats is not None:
            stats.tiles += len(batch_corners)
            stats.batches += 1
        if progress is not None:
            progress(done, total)

    with timed(timings, "blend"):
        finalise(grid.padded_height)
    assert emitted == height
    return output


def _check_prediction(pred: object, count: int, tile: int, channels: int | None) -> np.ndarray:
    try:
        array = np.asarray(pred, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"predict returned {type(pred).__name__}, which is not a float array: {exc}"
        ) from exc
    k = "K" if channels is None else str(channels)
    if (
        array.ndim != 4
        or array.shape[0] != count
        or array.shape[2:] != (tile, tile)
        or (channels is not None and array.shape[1] != channels)
        or array.shape[1] < 1
    ):
        raise InputError(
            f"predict returned {tuple(array.shape)} for a batch of {count} tiles of {tile}; "
            f"expected ({count}, {k}, {tile}, {tile})"
        )
    return array


# --------------------------------------------------------------------------- windows


def _round_half_up(value: float) -> int:
    # Python's round() rounds half to even; a layout should not depend on parity.
    return int(math.floor(value + 0.5))


def window_grid(
    height: int, width: int, window: int, max_windows_side: int | None = None
) -> tuple[int, int]:
    """Rows and columns of non-overlapping ``window`` squares for an image.

    Policy: the image will be resized to ``rows*window x cols*window`` with
    ``rows = round(height / window)`` and ``cols = round(width / window)`` (half
    rounds up), each at least 1. If ``max_windows_side`` is given and a side would
    exceed it, *both* sides are scaled by the same factor so the longer one has
    exactly ``max_windows_side`` windows, keeping the aspect ratio as far as
    rounding allows (rather than squashing only the long side).

    >>> window_grid(2048, 2048, 256)
    (8, 8)
    >>> window_grid(1000, 3000, 256)
    (4, 12)
    >>> window_grid(1000, 3000, 256, max_windows_side=8)
    (3, 8)
    """
    height = _check_positive_int("height", height)
    width = _check_positive_int("width", width)
    window = _check_positive_int("window", window)
    if max_windows_side is not None:
        max_windows_side = _check_positive_int("max_windows_side", max_windows_side)
    rows = max(1, _round_half_up(height / window))
    cols = max(1, _round_half_up(width / window))
    if max_windows_side is not None and max(rows, cols) > max_windows_side:
        scale = max_windows_side / max(height, width)
        rows = min(max_windows_side, max(1, _round_half_up(height * scale)))
        cols = min(max_windows_side, max(1, _round_half_up(width * scale)))
    return rows, cols


def iter_windows(
    image: np.ndarray, window: int, rows: int, cols: int, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Resize ``image`` once to ``rows*window x cols*window`` and yield window batches.

    Yields ``(batch, indices)``: ``batch`` is ``N x window x window x C`` uint8
    (``N <= batch_size``), ``indices`` the ``(N,)`` int64 row-major window indices
    (``row * cols + col``). Every window is yielded exactly once, in index order.
    """
    image = _check_image(image)
    window = _check_positive_int("window", window)
    rows = _check_positive_int("rows", rows)
    cols = _check_positive_int("cols", cols)
    batch_size = _check_positive_int("batch_size", batch_size)
    return _iter_windows(image, window, rows, cols, batch_size)


def _iter_windows(
    image: np.ndarray, window: int, rows: int, cols: int, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    target_h, target_w = rows * window, cols * window
    if image.shape[:2] == (target_h, target_w):
        resized = image
    else:
        resized = cv2.resize(image, (target_w, target_h), interpolation=cv2.INTER_AREA)
        if resized.ndim == 2:  # OpenCV drops a single channel axis
            resized = resized[:, :, None]
    total = rows * cols
    for start in range(0, total, batch_size):
        indices = np.arange(start, min(start + batch_size, total), dtype=np.int64)
        batch = np.empty((len(indices), window, window, resized.shape[2]), dtype=np.uint8)
        for i, index in enumerate(indices):
            r, c = divmod(int(index), cols)
            batch[i] = resized[r * window : (r + 1) * window, c * window : (c + 1) * window]
        yield batch, indices

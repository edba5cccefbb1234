"""Invariance tests for the tiler (MONAI-style): an identity predictor must
reconstruct the input for sizes that do not divide, any overlap, any batch, both
blend modes and both output paths; memory stays in a band of rows."""
from __future__ import annotations

import doctest
import re

import cv2
import numpy as np
import pytest

from edgederm.runtime import tiling
from edgederm.runtime.errors import InputError
from edgederm.runtime.tiling import (
    BlendMode,
    TilingStats,
    blend_weights,
    iter_windows,
    make_grid,
    sliding_window,
    window_grid,
)


def identity(batch: np.ndarray) -> np.ndarray:
    """N x T x T x C uint8 -> N x C x T x T float32, the tile itself."""
    return batch.transpose(0, 3, 1, 2).astype(np.float32)


def random_image(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def run_collecting_rows(image: np.ndarray, predict, **kwargs) -> np.ndarray:
    """Run the on_rows path and stitch the blocks, checking they arrive in order, once."""
    blocks: list[tuple[int, np.ndarray]] = []
    result = sliding_window(image, predict, on_rows=lambda y0, b: blocks.append((y0, b)), **kwargs)
    assert result is None
    next_row = 0
    for y0, block in blocks:
        assert y0 == next_row, "blocks must be contiguous and top to bottom"
        assert block.ndim == 3 and block.shape[2] == image.shape[1]
        next_row += block.shape[1]
    assert next_row == image.shape[0]
    return np.concatenate([b for _, b in blocks], axis=1)


# ----------------------------------------------------------------------------- grid


@pytest.mark.parametrize("size", [1, 5, 63, 64, 65, 97, 131, 300, 500])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.9])
def test_grid_covers_axis_flush_with_edge(size, overlap):
    grid = make_grid(size, size, 64, overlap)
    assert grid.ys == grid.xs
    starts = np.array(grid.ys)
    assert starts[0] == 0
    assert np.all(np.diff(starts) > 0)
    assert np.all(np.diff(starts) <= grid.stride)  # no gaps between tiles
    if size >= 64:
        assert starts[-1] == size - 64  # last tile flush with the edge, no padding
    else:
        assert grid.ys == (0,) and grid.padded_height == 64
    assert len(grid) == len(grid.ys) ** 2
    assert list(grid.tiles()) == [(y, x) for y in grid.ys for x in grid.xs]


def test_grid_stride_from_overlap():
    assert make_grid(100, 100, 64, 0.25).stride == 48
    assert make_grid(100, 100, 64, 0.0).stride == 64
    assert make_grid(100, 100, 1, 0.5).stride == 1  # never 0


@pytest.mark.parametrize("overlap", [1.0, -0.1, 1.5, float("nan")])
def test_grid_rejects_overlap_out_of_range(overlap):
    with pytest.raises(InputError, match=r"overlap must be in \[0, 1\)"):
        make_grid(100, 100, 64, overlap)


def test_grid_rejects_bad_tile():
    with pytest.raises(InputError, match="tile must be an integer >= 1; got 0"):
        make_grid(100, 100, 0, 0.25)


# -------------------------------------------------------------------------- weights


@pytest.mark.parametrize("tile", [1, 7, 64, 65])
def test_gaussian_weights_positive_symmetric_max_at_centre(tile):
    w = blend_weights(tile, "gaussian")
    assert w.shape == (tile, tile) and w.dtype == np.float32
    assert np.all(w > 0)
    assert w.min() >= tiling.GAUSSIAN_FLOOR - 1e-9
    np.testing.assert_array_equal(w, w.T)
    np.testing.assert_array_equal(w, w[::-1, :])
    np.testing.assert_array_equal(w, w[:, ::-1])
    assert w.max() == pytest.approx(1.0)
    c = (tile - 1) // 2
    assert w[c, c] == pytest.approx(1.0)
    if tile > 2:
        assert w[0, 0] < w[c, c]


def test_constant_weights_are_ones():
    np.testing.assert_array_equal(blend_weights(16, BlendMode.CONSTANT), np.ones((16, 16)))


def test_unknown_blend_mode():
    with pytest.raises(InputError, match="blend mode 'cosine' is not known; expected one of"):
        blend_weights(16, "cosine")


# ----------------------------------------------------------------- reconstruction


SIZES = [(97, 131), (300, 257), (64, 64), (20, 500), (50, 40)]


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("blend", ["constant", "gaussian"])
def test_identity_reconstructs_full_array(height, width, overlap, batch_size, blend):
    image = random_image(height, width, seed=height * width)
    out = sliding_window(image, identity, tile=64, overlap=overlap, blend=blend,
                         batch_size=batch_size)
    assert out.shape == (3, height, width) and out.dtype == np.float32
    np.testing.assert_allclose(out, image.transpose(2, 0, 1), atol=1e-4, rtol=0)
    # Dyadic weights make the float32 sums exact, so it is in fact bit-exact.
    np.testing.assert_array_equal(out, image.transpose(2, 0, 1))


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("blend", ["constant", "gaussian"])
def test_identity_reconstructs_on_rows(height, width, overlap, batch_size, blend):
    image = random_image(height, width, seed=height + width)
    out = run_collecting_rows(image, identity, tile=64, overlap=overlap, blend=blend,
                              batch_size=batch_size)
    np.testing.assert_allclose(out, image.transpose(2, 0, 1), atol=1e-4, rtol=0)


def test_on_rows_equals_full_array():
    image = random_image(230, 170, seed=3)
    kwargs = dict(tile=48, overlap=0.3, blend="gaussian", batch_size=5)
    full = sliding_window(image, identity, **kwargs)
    np.testing.assert_array_equal(run_collecting_rows(image, identity, **kwargs), full)


def test_single_channel_and_out_dtype():
    image = random_image(70, 90, channels=1)
    out = sliding_window(image, identity, tile=32, out_dtype=np.float16)
    assert out.shape == (1, 70, 90) and out.dtype == np.float16
    np.testing.assert_allclose(out[0].astype(np.float32), image[..., 0], atol=0.5)


def test_small_image_is_reflect_padded_and_cropped():
    image = random_image(50, 40, seed=9)
    seen = []

    def record(batch):
        seen.append(batch.copy())
        return identity(batch)

    out = sliding_window(image, record, tile=64)
    assert len(seen) == 1 and seen[0].shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(seen[0][0, :50, :40], image)
    np.testing.assert_array_equal(seen[0][0], np.pad(image, ((0, 14), (0, 24), (0, 0)), "reflect"))
    assert out.shape == (3, 50, 40)


def test_pointwise_nonlinear_predictor_matches_untiled():
    image = random_image(211, 157, seed=4)

    def sigmoid_predict(batch):
        x = batch.transpose(0, 3, 1, 2).astype(np.float32)
        return 1.0 / (1.0 + np.exp(-(x - 128.0) / 20.0))

    untiled = sigmoid_predict(image[None])[0]
    for blend in BlendMode:
        out = sliding_window(image, sigmoid_predict, tile=64, overlap=0.25, blend=blend,
                             batch_size=3)
        np.testing.assert_allclose(out, untiled, atol=1e-5, rtol=0)


def test_out_channels_can_differ_from_input_channels():
    image = random_image(100, 120, seed=5)

    def two_class(batch):
        p = batch[..., 0].astype(np.float32) / 255.0
        return np.stack([p, 1.0 - p], axis=1)

    out = sliding_window(image, two_class, tile=40, overlap=0.5, out_channels=2)
    np.testing.assert_allclose(out[0], image[..., 0] / 255.0, atol=1e-6)
    np.testing.assert_allclose(out.sum(axis=0), 1.0, atol=1e-6)


# ------------------------------------------------------------- coverage and visits


@pytest.mark.parametrize("height,width,tile,overlap,batch_size", [
    (97, 131, 32, 0.25, 3), (300, 257, 64, 0.5, 8), (20, 500, 64, 0.0, 1), (50, 40, 64, 0.25, 4),
    (129, 129, 64, 0.0, 2),
])
def test_every_pixel_covered_every_tile_visited_once(height, width, tile, overlap, batch_size):
    """A position-dependent predictor: the coordinates of each tile pixel are encoded
    into the image so each batch reveals where it was cut from."""
    ys, xs = np.mgrid[0:height, 0:width]
    high = (ys // 256) * 16 + xs // 256
    image = np.stack([high, ys % 256, xs % 256], axis=-1).astype(np.uint8)
    grid = make_grid(height, width, tile, overlap)
    coverage = np.zeros((height, width), dtype=np.int64)
    visited: list[tuple[int, int]] = []
    calls = []

    def locate(batch):
        calls.append(len(batch))
        assert 1 <= len(batch) <= batch_size
        for t in batch.astype(np.int64):
            tile_y = (t[..., 0] // 16) * 256 + t[..., 1]
            tile_x = (t[..., 0] % 16) * 256 + t[..., 2]
            visited.append((int(tile_y[0, 0]), int(tile_x[0, 0])))
            # Count only the real (unpadded) pixels the tile covers.
            rows = min(tile, height)
            cols = min(tile, width)
            coverage[tile_y[0, 0] : tile_y[0, 0] + rows, tile_x[0, 0] : tile_x[0, 0] + cols] += 1
        return np.ones((len(batch), 1, tile, tile), dtype=np.float32)

    progress = []
    stats = TilingStats()
    out = sliding_window(image, locate, tile=tile, overlap=overlap, batch_size=batch_size,
                         progress=lambda d, t: progress.append((d, t)), stats=stats)
    np.testing.assert_allclose(out, 1.0)
    assert coverage.min() >= 1
    assert sum(calls) == len(grid) == stats.tiles
    assert len(calls) == stats.batches == -(-len(grid) // batch_size)
    assert visited == list(grid.tiles())  # each once, row-major
    assert progress[-1] == (len(grid), len(grid))
    assert [d for d, _ in progress] == list(np.cumsum(calls))


# -------------------------------------------------------------------------- memory


def test_band_memory_bounded_by_tile_plus_stride():
    image = np.zeros((2000, 300, 3), dtype=np.uint8)
    image[::7] = 200
    stats = TilingStats()
    rows_seen = []
    grid = make_grid(2000, 300, 64, 0.25)

    def on_rows(y0, block):
        rows_seen.append(block.shape[1])
        np.testing.assert_allclose(block, image[y0 : y0 + block.shape[1]].transpose(2, 0, 1),
                                   atol=1e-4)

    result = sliding_window(image, identity, tile=64, overlap=0.25, batch_size=7,
                            on_rows=on_rows, stats=stats)
    assert result is None
    assert stats.band_rows_max <= grid.tile + grid.stride
    assert stats.accumulator_bytes <= (3 + 1) * (grid.tile + grid.stride) * 300 * 4
    assert sum(rows_seen) == 2000
    assert max(rows_seen) <= grid.stride  # rows are handed on as the band moves
    assert len(rows_seen) >= len(grid.ys)


# ------------------------------------------------------------------------ validation


def test_rejects_float_image():
    with pytest.raises(InputError, match="must be uint8.*got dtype float32"):
        sliding_window(np.zeros((64, 64, 3), np.float32), identity, tile=32)


def test_rejects_2d_image():
    with pytest.raises(InputError, match=r"3-D HxWxC uint8; got shape \(64, 64\)"):
        sliding_window(np.zeros((64, 64), np.uint8), identity, tile=32)


def test_rejects_overlap_one():
    with pytest.raises(InputError, match=r"overlap must be in \[0, 1\).*got 1.0"):
        sliding_window(np.zeros((64, 64, 3), np.uint8), identity, tile=32, overlap=1.0)


def test_rejects_wrong_prediction_shape():
    def wrong(batch):
        return np.zeros((len(batch), 2, 200, 200), np.float32)

    with pytest.raises(InputError, match=re.escape(
            "predict returned (4, 2, 200, 200) for a batch of 4 tiles of 256; "
            "expected (4, K, 256, 256)")):
        sliding_window(np.zeros((600, 600, 3), np.uint8), wrong, tile=256, batch_size=4)


def test_rejects_channel_count_change_between_batches():
    calls = []

    def flaky(batch):
        calls.append(1)
        return np.zeros((len(batch), 1 + len(calls), 32, 32), np.float32)

    with pytest.raises(InputError, match=r"expected \(2, 2, 32, 32\)"):
        sliding_window(np.zeros((64, 64, 3), np.uint8), flaky, tile=32, batch_size=2)


def test_rejects_out_channels_mismatch_and_int_out_dtype():
    with pytest.raises(InputError, match=r"predict returned \(1, 3, 32, 32\).*expected \(1, 5, 32, 32\)"):
        sliding_window(np.zeros((32, 32, 3), np.uint8), identity, tile=32, out_channels=5)
    with pytest.raises(InputError, match="out_dtype must be a floating dtype"):
        sliding_window(np.zeros((32, 32, 3), np.uint8), identity, tile=32, out_dtype=np.uint8)


# -------------------------------------------------------------------------- windows


def test_window_grid_policy():
    assert window_grid(2048, 2048, 256) == (8, 8)
    assert window_grid(1000, 3000, 256) == (4, 12)
    assert window_grid(100, 100, 256) == (1, 1)  # at least one window
    assert window_grid(384, 640, 256) == (2, 3)  # 1.5 and 2.5 round half up
    assert window_grid(1000, 3000, 256, max_windows_side=8) == (3, 8)  # aspect kept
    assert window_grid(4096, 4096, 256, max_windows_side=8) == (8, 8)
    with pytest.raises(InputError, match="window must be an integer >= 1"):
        window_grid(100, 100, 0)


@pytest.mark.parametrize("height,width,batch_size", [(2048, 2048, 5), (1000, 3000, 16), (100, 90, 4)])
def test_iter_windows_cover_each_window_once_in_order(height, width, batch_size):
    image = random_image(height, width, seed=1)
    window = 256 if height > 100 else 32
    rows, cols = window_grid(height, width, window)
    resized = cv2.resize(image, (cols * window, rows * window), interpolation=cv2.INTER_AREA)
    seen = []
    for batch, indices in iter_windows(image, window, rows, cols, batch_size):
        assert batch.dtype == np.uint8 and batch.shape[1:] == (window, window, 3)
        assert 1 <= len(batch) == len(indices) <= batch_size
        assert indices.dtype.kind == "i"
        for tile_pixels, index in zip(batch, indices):
            r, c = divmod(int(index), cols)
            np.testing.assert_array_equal(
                tile_pixels, resized[r * window : (r + 1) * window, c * window : (c + 1) * window])
        seen.extend(indices.tolist())
    assert seen == list(range(rows * cols))
    if (height, width) == (2048, 2048):
        assert (rows, cols) == (8, 8) and len(seen) == 64


def test_iter_windows_validates_image():
    with pytest.raises(InputError, match="must be uint8"):
        next(iter_windows(np.zeros((64, 64, 3), np.float32), 32, 2, 2, 4))


def test_module_doctests():
    results = doctest.testmod(tiling)
    assert results.attempted > 0 and results.failed == 0


def test_runtime_module_does_not_import_torch():
    import ast
    import pathlib

    tree = ast.parse(pathlib.Path(tiling.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert imported <= {"__future__", "math", "dataclasses", "enum", "typing", "cv2", "numpy"}

"""Preprocessing: numbers checked with tolerances, not just shapes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgederm.runtime import preprocess as preprocess_module
from edgederm.runtime.errors import InputError
from edgederm.runtime.preprocess import (
    ColorStats,
    PreprocessConfig,
    apply_color_constancy,
    color_stats,
    gray_world,
    gwsd,
    normalize,
    preprocess,
    preprocess_batch,
    remove_hair,
    resize_image,
)

REPO = Path(__file__).resolve().parents[2]


def _skin(height: int, width: int, seed: int = 0, noise: float = 2.0) -> np.ndarray:
    """Skin-coloured RGB image: smooth shading, a dark lesion, mild sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [200 + 10 * np.sin(xx / 97), 150 + 8 * np.cos(yy / 83), 130 + 6 * np.sin((xx + yy) / 120)], axis=-1
    )
    radius = np.hypot(yy - height / 2, xx - width / 2) / (min(height, width) / 3)
    lesion = np.clip(1.2 - radius, 0, 1)[..., None]
    image = base * (1 - lesion) + np.array([95, 60, 45], np.float32) * lesion
    image += rng.normal(0, noise, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _gradient_image(height: int = 256, width: int = 320) -> np.ndarray:
    """Channels spread uniformly over different ranges (GWSD barely clips these)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    red = 120 + 60 * xx / (width - 1)
    green = 70 + 90 * yy / (height - 1)
    blue = 40 + 50 * (xx + yy) / (width + height - 2)
    return np.clip(np.rint(np.stack([red, green, blue], axis=-1)), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- colour


def test_color_stats_on_downsampled_copy_match_full_resolution() -> None:
    image = _skin(2048, 1536)
    stats = color_stats(image)  # downsampled to 512 px
    full = image.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(stats.mean, full.mean(axis=0), atol=1.0)
    np.testing.assert_allclose(stats.std, full.std(axis=0), atol=1.0)
    assert stats.mean.shape == (3,) and stats.mean.dtype == np.float64


def test_color_stats_are_read_only_and_validated() -> None:
    stats = color_stats(_gradient_image())
    with pytest.raises(ValueError):
        stats.mean[0] = 1.0
    with pytest.raises(InputError, match="ColorStats.std"):
        ColorStats(mean=np.zeros(3), std=np.zeros(4))
    with pytest.raises(InputError, match="max_side"):
        color_stats(_gradient_image(), max_side=0)


def test_gray_world_equalises_channel_means() -> None:
    image = _skin(400, 500)
    before = image.reshape(-1, 3).mean(axis=0)
    assert before.max() - before.min() > 40  # skin is far from gray
    corrected = gray_world(image)
    means = corrected.reshape(-1, 3).mean(axis=0)
    assert means.max() - means.min() < 1.0
    # The overall brightness (mean of channel means) is kept.
    assert abs(means.mean() - before.mean()) < 1.0


def test_gwsd_hits_target_mean_and_std() -> None:
    image = _gradient_image()
    corrected = gwsd(image, target_mean=163.7, target_std=47.5)
    pixels = corrected.reshape(-1, 3).astype(np.float64)
    clipped = np.mean((corrected == 0) | (corrected == 255))
    assert clipped < 0.01  # the image was chosen so clipping does not bias the figures
    np.testing.assert_allclose(pixels.mean(axis=0), 163.7, atol=3.0)
    np.testing.assert_allclose(pixels.std(axis=0), 47.5, atol=3.0)


def test_gwsd_matches_the_formula_with_given_stats() -> None:
    image = _skin(64, 80)
    stats = ColorStats(mean=np.array([150.0, 120.0, 100.0]), std=np.array([30.0, 25.0, 20.0]))
    result = gwsd(image, stats, target_mean=128.0, target_std=40.0)
    expected = (image.astype(np.float64) - stats.mean) * (40.0 / stats.std) + 128.0
    expected = np.clip(np.rint(expected), 0, 255)
    np.testing.assert_array_equal(result, expected.astype(np.uint8))


def test_gwsd_flat_channel_is_not_amplified() -> None:
    image = _gradient_image()
    image[..., 2] = 60
    image[0, 0, 2] = 61  # one grey level of difference in one pixel
    corrected = gwsd(image, target_mean=163.7, target_std=47.5)
    blue = corrected[..., 2].astype(int)
    assert abs(int(np.median(blue)) - 164) <= 1  # moved to the target mean ...
    assert blue.max() - blue.min() <= 48  # ... with at most target_std of gain per level


def test_gray_world_black_channel_is_left_alone() -> None:
    image = _gradient_image()
    image[..., 2] = 0
    corrected = gray_world(image)
    assert np.all(corrected[..., 2] == 0)
    means = corrected[..., :2].reshape(-1, 2).mean(axis=0)
    assert abs(means[0] - means[1]) < 1.0


def test_apply_color_constancy_dispatch() -> None:
    image = _skin(64, 64)
    stats = color_stats(image)
    assert apply_color_constancy(image, "none") is image
    np.testing.assert_array_equal(apply_color_constancy(image, "gray_world", stats), gray_world(image, stats))
    np.testing.assert_array_equal(
        apply_color_constancy(image, "gwsd", stats, 150.0, 40.0), gwsd(image, stats, 150.0, 40.0)
    )
    with pytest.raises(InputError, match="'shades_of_gray'.*allowed: 'none', 'gray_world', 'gwsd'"):
        apply_color_constancy(image, "shades_of_gray")


# --------------------------------------------------------------------------- hair


def test_remove_hair_erases_dark_lines_and_leaves_skin() -> None:
    clean = _skin(512, 512, seed=3)
    hair = np.zeros((512, 512), np.uint8)
    for start, end in [((20, 40), (490, 300)), ((100, 480), (400, 20)), ((0, 256), (511, 262)), ((30, 100), (480, 110))]:
        cv2.line(hair, start, end, 255, 3)
    hairy = clean.copy()
    hairy[hair > 0] = (45, 30, 25)

    cleaned = remove_hair(hairy)

    clean_gray = cv2.cvtColor(clean, cv2.COLOR_RGB2GRAY).astype(int)

    def dark_on_lines(image: np.ndarray) -> int:
        # "Dark" relative to the skin (or lesion) under the hair: the lines also
        # cross the dark lesion, where absolute darkness is expected.
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(int)
        return int(np.count_nonzero((gray < clean_gray - 30)[hair > 0]))

    before, after = dark_on_lines(hairy), dark_on_lines(cleaned)
    assert before > 5000
    assert after < 0.2 * before  # > 80% of the hair pixels are gone
    away = cv2.dilate(hair, np.ones((21, 21), np.uint8)) == 0
    change = np.abs(cleaned.astype(int) - hairy.astype(int))[away].mean()
    assert change < 2.0
    # The inpainted pixels look like the skin under the hair, not like the hair.
    restored = np.abs(cleaned.astype(int) - clean.astype(int))[hair > 0].mean()
    assert restored < 8.0


def test_remove_hair_without_hair_returns_equal_copy() -> None:
    image = _gradient_image()
    result = remove_hair(image)
    assert result is not image
    np.testing.assert_array_equal(result, image)


def _hairy(height: int, width: int, seed: int, hairs: int = 12, specks: int = 40) -> np.ndarray:
    """``_skin`` with dark hairs (curves 1-4 px wide, some leaving the image) and specks."""
    rng = np.random.default_rng(seed)
    image = _skin(height, width, seed=seed)
    for _ in range(hairs):
        points = np.cumsum(rng.normal(0, 25, (8, 2)), axis=0) + rng.uniform(-20, [width + 20, height + 20], 2)
        cv2.polylines(image, [points.astype(np.int32)], False, (40, 28, 22), int(rng.integers(1, 5)))
    for _ in range(specks):
        cv2.circle(image, (int(rng.integers(0, width)), int(rng.integers(0, height))), int(rng.integers(1, 3)),
                   (50, 35, 30), -1)
    return image


def _whole_image_hair_removal(image: np.ndarray) -> np.ndarray:
    """The DullRazor steps as OpenCV gives them on the whole image: the reference."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    blackhat = cv2.morphologyEx(gray, cv2.MORPH_BLACKHAT, cv2.getStructuringElement(cv2.MORPH_CROSS, (17, 17)))
    _, mask = cv2.threshold(blackhat, 10, 255, cv2.THRESH_BINARY)
    return cv2.inpaint(image, mask, preprocess_module.HAIR_INPAINT_RADIUS, cv2.INPAINT_TELEA)


@pytest.fixture()
def split_every_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inpaint by groups whatever the image size, so small images test the split."""
    monkeypatch.setattr(preprocess_module, "_SPLIT_MIN_PIXELS", 0)


@pytest.fixture(params=[1, 3], ids=["1-thread", "3-threads"])
def opencv_threads(request: pytest.FixtureRequest):
    previous = cv2.getNumThreads()
    cv2.setNumThreads(request.param)
    yield request.param
    cv2.setNumThreads(previous)


@pytest.mark.parametrize("seed", range(4))
def test_hair_removal_by_groups_is_the_whole_image_inpaint_bit_for_bit(seed, split_every_image, opencv_threads) -> None:
    image = _hairy(300, 420, seed)
    np.testing.assert_array_equal(remove_hair(image), _whole_image_hair_removal(image))


def test_hair_groups_at_every_gap_are_inpainted_as_in_the_whole_image(split_every_image) -> None:
    # Two strokes whose gap crosses the distance at which Telea's neighbourhoods meet
    # (2 * radius + 1) and the grid cell, at every alignment with the cells, one of
    # them touching the image edge.
    base = _skin(96, 128, seed=5)
    for gap in range(1, 24):
        for shift in range(0, 16, 5):
            image = base.copy()
            top = 20 + shift
            image[top:top + 2, 0:90] = (35, 25, 20)
            image[top + 2 + gap:top + 4 + gap, 30:128] = (35, 25, 20)
            np.testing.assert_array_equal(remove_hair(image), _whole_image_hair_removal(image),
                                          err_msg=f"gap {gap}, shift {shift}")


def test_large_image_is_inpainted_in_several_smaller_crops(monkeypatch: pytest.MonkeyPatch) -> None:
    image = _hairy(1100, 1000, seed=7, hairs=20, specks=200)
    calls: list[tuple[int, int]] = []
    inpaint = cv2.inpaint

    def counting(src: np.ndarray, *args: object) -> np.ndarray:
        calls.append(src.shape[:2])
        return inpaint(src, *args)

    monkeypatch.setattr(preprocess_module.cv2, "inpaint", counting)
    result = remove_hair(image)
    monkeypatch.setattr(preprocess_module.cv2, "inpaint", inpaint)
    assert len(calls) > 1 and all(h * w < image.shape[0] * image.shape[1] for h, w in calls)
    np.testing.assert_array_equal(result, _whole_image_hair_removal(image))


@pytest.mark.parametrize(("kwargs", "pattern"), [({"kernel_size": 16}, "odd integer"), ({"threshold": 300}, "0, 254")])
def test_remove_hair_validates(kwargs: dict, pattern: str) -> None:
    with pytest.raises(InputError, match=pattern):
        remove_hair(_gradient_image(), **kwargs)


# --------------------------------------------------------------------------- resize


def test_stretch_shapes_and_interpolation() -> None:
    image = _skin(300, 400)
    small = resize_image(image, (224, 224), "stretch")
    assert small.shape == (224, 224, 3)
    # Shrinking uses INTER_AREA, enlarging INTER_LINEAR.
    np.testing.assert_array_equal(small, cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA))
    big = resize_image(image, (600, 800), "stretch")
    np.testing.assert_array_equal(big, cv2.resize(image, (800, 600), interpolation=cv2.INTER_LINEAR))
    assert resize_image(image, (300, 400), "stretch") is image


@pytest.mark.parametrize(("src", "dst"), [((300, 600), (224, 224)), ((600, 300), (224, 224)), ((100, 100), (64, 128))])
def test_letterbox_keeps_aspect_and_pads_with_zeros(src: tuple[int, int], dst: tuple[int, int]) -> None:
    image = np.full((*src, 3), 200, np.uint8)
    boxed = resize_image(image, dst, "letterbox")
    assert boxed.shape == (*dst, 3)
    content = boxed.max(axis=2) > 0
    rows, cols = np.nonzero(content)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert abs(width / height - src[1] / src[0]) < 0.02
    assert np.all(boxed[~content] == 0)
    # Centred: the padding on both sides differs by at most one pixel.
    assert abs(rows.min() - (dst[0] - 1 - rows.max())) <= 1
    assert abs(cols.min() - (dst[1] - 1 - cols.max())) <= 1
    if src == (300, 600):
        assert np.all(boxed[:56] == 0) and np.all(boxed[-56:] == 0)  # 224x112 content, 56 rows each side
        assert np.all(boxed[56:168] == 200)


def test_center_crop_takes_the_central_square() -> None:
    image = np.zeros((200, 400, 3), np.uint8)
    image[:, 100:300] = (10, 200, 30)  # central 200x200 square; the sides are black
    cropped = resize_image(image, (100, 100), "center_crop")
    assert cropped.shape == (100, 100, 3)
    assert np.all(cropped == np.array([10, 200, 30], np.uint8))
    tall = np.zeros((400, 200, 3), np.uint8)
    tall[100:300] = 90
    assert np.all(resize_image(tall, (50, 50), "center_crop") == 90)


def test_center_crop_non_square_target_keeps_its_aspect() -> None:
    image = np.zeros((300, 300, 3), np.uint8)
    image[75:225] = 120  # central band 150 rows high = the 2:1 crop of a square
    cropped = resize_image(image, (100, 200), "center_crop")
    assert cropped.shape == (100, 200, 3)
    assert np.all(cropped == 120)


def test_resize_none_requires_the_exact_size() -> None:
    image = _skin(224, 224)
    assert resize_image(image, (224, 224), "none") is image
    with pytest.raises(InputError, match=r"image is 300x400 \(HxW\) but resize='none' requires exactly 224x224"):
        resize_image(_skin(300, 400), (224, 224), "none")
    with pytest.raises(InputError, match="allowed: 'stretch', 'letterbox', 'center_crop', 'none'"):
        resize_image(image, (224, 224), "crop")
    with pytest.raises(InputError, match="two positive integers"):
        resize_image(image, (0, 224), "stretch")


# --------------------------------------------------------------------------- normalise


def test_normalize_matches_hand_computation() -> None:
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, (3, 17, 23, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    result = normalize(batch, mean, std)
    assert result.shape == (3, 3, 17, 23) and result.dtype == np.float32
    expected = (batch.astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(result, expected.transpose(0, 3, 1, 2), rtol=0, atol=1e-6)
    single = normalize(batch[1], mean, std)
    assert single.shape == (3, 17, 23)
    np.testing.assert_array_equal(single, result[1])


def test_normalize_writes_into_out_and_validates() -> None:
    image = np.full((4, 5, 3), 255, np.uint8)
    out = np.zeros((2, 3, 4, 5), np.float32)
    returned = normalize(image, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), out=out[1])
    assert np.shares_memory(returned, out)
    np.testing.assert_allclose(out[1], 1.0, atol=1e-6)
    assert np.all(out[0] == 0)
    with pytest.raises(InputError, match=r"normalize: received shape \(4, 5, 3\), dtype float32"):
        normalize(image.astype(np.float32), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(InputError, match="std=.*three positive numbers"):
        normalize(image, (0.5,) * 3, (0.5, 0.0, 0.5))


# --------------------------------------------------------------------------- config


def test_config_roundtrips_through_dict_and_json() -> None:
    config = PreprocessConfig(
        input_size=(256, 192), resize="letterbox", color_constancy="gwsd", gwsd_target_mean=150.0,
        gwsd_target_std=40.0, hair_removal=True, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
    )
    assert PreprocessConfig.from_dict(config.to_dict()) == config
    through_json = PreprocessConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert through_json == config
    assert through_json.input_size == (256, 192) and isinstance(through_json.mean, tuple)
    assert PreprocessConfig.from_dict({}) == PreprocessConfig()  # missing keys take defaults


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"resize": "crop"}, r"resize='crop'; allowed: 'stretch', 'letterbox', 'center_crop', 'none'"),
        ({"color_constancy": "GWSD"}, r"color_constancy='GWSD'; allowed: 'none', 'gray_world', 'gwsd'"),
        ({"input_size": [224]}, r"input_size=\[224\]; allowed: \[height, width\]"),
        ({"input_size": [224, -1]}, "two positive integers"),
        ({"gwsd_target_std": 0}, r"gwsd_target_std=0; allowed: a number in \(0, 255\]"),
        ({"gwsd_target_mean": float("nan")}, "gwsd_target_mean=nan"),
        ({"hair_removal": "yes"}, r"hair_removal='yes' \(str\); allowed: true or false"),
        ({"mean": [0.5, 0.5]}, "mean=.*three numbers"),
        ({"std": [0.5, 0.0, 0.5]}, "std=.*three positive numbers"),
        ({"colour_constancy": "gwsd"}, "unknown key.*'colour_constancy'.*allowed keys: input_size"),
    ],
)
def test_config_from_dict_rejects_bad_values(data: dict, pattern: str) -> None:
    with pytest.raises(InputError, match=pattern):
        PreprocessConfig.from_dict(data)


def test_config_validates_on_construction() -> None:
    with pytest.raises(InputError, match="resize='strech'"):
        PreprocessConfig(resize="strech")


# --------------------------------------------------------------------------- pipeline


def test_preprocess_runs_the_steps_in_order() -> None:
    image = _skin(300, 400)
    config = PreprocessConfig(input_size=(64, 96), color_constancy="gwsd", hair_removal=True,
                              mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    result = preprocess(image, config)
    assert result.shape == (3, 64, 96) and result.dtype == np.float32
    step = gwsd(image, color_stats(image), config.gwsd_target_mean, config.gwsd_target_std)
    step = remove_hair(step)
    step = resize_image(step, (64, 96), "stretch")
    np.testing.assert_allclose(result, normalize(step, config.mean, config.std), atol=1e-6)


def test_tiles_use_the_whole_image_statistics() -> None:
    image = _skin(256, 256)
    stats = color_stats(image)
    config = PreprocessConfig(input_size=(128, 128), resize="none", color_constancy="gray_world")
    tiles = [image[:128, :128], image[128:, 128:]]
    batch = preprocess_batch(tiles, config, stats=stats)
    whole = gray_world(image, stats)
    np.testing.assert_allclose(batch[1], normalize(whole[128:, 128:], config.mean, config.std), atol=1e-6)
    # With their own statistics the tiles would come out differently.
    own = preprocess_batch(tiles, config)
    assert np.abs(own - batch).max() > 0.01


def test_preprocess_batch_equals_single_calls_and_accepts_arrays() -> None:
    config = PreprocessConfig(input_size=(32, 32), color_constancy="gwsd")
    images = [_skin(80, 60, seed=s) for s in range(3)] + [_skin(50, 70, seed=9)]
    batch = preprocess_batch(images, config)
    assert batch.shape == (4, 3, 32, 32) and batch.dtype == np.float32
    for i, image in enumerate(images):
        np.testing.assert_array_equal(batch[i], preprocess(image, config))
    stacked = np.stack(images[:3])
    np.testing.assert_array_equal(preprocess_batch(stacked, config), batch[:3])
    assert preprocess_batch([], config).shape == (0, 3, 32, 32)
    with pytest.raises(InputError, match="2 ColorStats for 4 images"):
        preprocess_batch(images, config, stats=[color_stats(images[0])] * 2)


def test_preprocess_refuses_float_images_with_the_index() -> None:
    config = PreprocessConfig(input_size=(32, 32))
    with pytest.raises(InputError, match=r"images\[1\]: received shape \(40, 40, 3\), dtype float32"):
        preprocess_batch([_skin(40, 40), np.zeros((40, 40, 3), np.float32)], config)


def test_runtime_modules_import_without_torch() -> None:
    code = (
        "import sys\n"
        "for name in ('torch', 'onnx', 'torchvision'):\n"
        "    sys.modules[name] = None\n"
        "import numpy as np\n"
        "from edgederm.runtime import imageio, preprocess\n"
        "cfg = preprocess.PreprocessConfig(color_constancy='gwsd')\n"
        "out = preprocess.preprocess(np.full((300, 200, 3), 128, np.uint8), cfg)\n"
        "assert out.shape == (3, 224, 224)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr

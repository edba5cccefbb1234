"""The synthetic dermoscopy generator: determinism, shapes, masks, a measurable class
grammar, metadata correlations, resolution independence, learnability without torch,
the dataset writer and its CSV, and errors that say what to do."""
from __future__ import annotations

import csv
import pathlib
import subprocess
import sys
from functools import lru_cache

import cv2
import numpy as np
import pytest

from edgederm.data.synthetic import (
    CLASS_NAMES,
    CSV_FIELDS,
    SEXES,
    SITES,
    SyntheticCase,
    generate_case,
    generate_dataset,
    read_labels_csv,
)

NEVUS, MELANOMA, VASCULAR = (CLASS_NAMES.index(n) for n in ("nevus", "melanoma", "vascular"))


@lru_cache(maxsize=None)
def cases(label: int, n: int, size: int = 128, first_seed: int = 1000) -> tuple[SyntheticCase, ...]:
    return tuple(generate_case(first_seed + i, size, label=label) for i in range(n))


def lesion_pixels(case: SyntheticCase) -> np.ndarray:
    return case.image[case.mask.astype(bool)].astype(np.float64)


# --------------------------------------------------------------------------- basics


def test_class_names_and_sites_are_the_contract():
    assert CLASS_NAMES == ("nevus", "melanoma", "vascular")
    assert SITES == ("back", "face", "upper_extremity", "lower_extremity", "trunk", "scalp")
    assert CSV_FIELDS == ("id", "label", "class_name", "age", "sex", "site", "skin_tone")


@pytest.mark.parametrize("size", [64, 300])
def test_same_seed_gives_identical_case_and_other_seeds_differ(size):
    a, b = generate_case(42, size, label=MELANOMA), generate_case(42, size, label=MELANOMA)
    assert np.array_equal(a.image, b.image) and a.image.tobytes() == b.image.tobytes()
    assert np.array_equal(a.mask, b.mask)
    assert a.metadata == b.metadata and a.label == b.label == MELANOMA
    c = generate_case(43, size, label=MELANOMA)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.mask, c.mask)
    # Mean absolute difference well above JPEG noise: a different lesion, not jitter.
    assert np.abs(a.image.astype(int) - c.image.astype(int)).mean() > 5


def test_label_none_is_drawn_from_the_seed_and_equals_passing_it():
    drawn = [generate_case(seed, 32) for seed in range(90)]
    counts = np.bincount([case.label for case in drawn], minlength=3)
    assert counts.min() >= 18, counts  # roughly uniform over the three classes
    for seed in (3, 4, 5):
        free = generate_case(seed, 96)
        fixed = generate_case(seed, 96, label=free.label)
        assert np.array_equal(free.image, fixed.image) and free.metadata == fixed.metadata
        assert free.class_name == CLASS_NAMES[free.label]


@pytest.mark.parametrize(
    "size, shape",
    [(32, (32, 32)), ((100, 160), (100, 160)), ((48, 600), (48, 600)), (1024, (1024, 1024))],
)
def test_shapes_and_dtypes(size, shape):
    case = generate_case(7, size, label=VASCULAR)
    assert case.image.shape == (*shape, 3) and case.image.dtype == np.uint8
    assert case.mask.shape == shape and case.mask.dtype == np.uint8
    assert set(np.unique(case.mask)) == {0, 1}
    assert case.image.flags.c_contiguous
    # The picture uses its range (vignette black, lesion, skin), it is not blank.
    assert case.image.std() > 10
    with pytest.raises(AttributeError):
        case.label = 0  # frozen


def test_largest_size_renders_the_same_lesion():
    large = generate_case(21, 4096, label=MELANOMA)
    assert large.image.shape == (4096, 4096, 3) and large.mask.shape == (4096, 4096)
    small = generate_case(21, 256, label=MELANOMA)
    down = cv2.resize(large.mask, (256, 256), interpolation=cv2.INTER_AREA)
    assert (small.mask & down).sum() / (small.mask | down).sum() > 0.9


@pytest.mark.parametrize("label", [NEVUS, MELANOMA, VASCULAR])
def test_mask_is_binary_non_empty_and_covers_5_to_60_percent(label):
    for size in (32, 128, 512):
        for case in cases(label, 20, size=size, first_seed=50):
            values = np.unique(case.mask)
            assert set(values) <= {0, 1}
            coverage = case.mask.mean()
            assert 0.05 <= coverage <= 0.60, (size, coverage)
            # The lesion is one blob near the centre and does not touch the frame.
            n_blobs, _ = cv2.connectedComponents(case.mask)
            assert n_blobs - 1 == 1
            ys, xs = np.nonzero(case.mask)
            assert ys.min() > 0 and xs.min() > 0
            assert ys.max() < size - 1 and xs.max() < size - 1
            assert abs(ys.mean() / size - 0.5) < 0.12 and abs(xs.mean() / size - 0.5) < 0.12


def test_lesion_stands_out_from_the_skin_on_every_skin_tone():
    seen_tones = set()
    for label in range(3):
        for case in cases(label, 30):
            m = case.mask.astype(bool)
            ring = cv2.dilate(case.mask, np.ones((9, 9), np.uint8)).astype(bool) & ~m
            contrast = np.abs(case.image[m].mean(0) - case.image[ring].mean(0)).max()
            assert contrast > 15, (label, case.metadata, contrast)
            seen_tones.add(case.metadata["skin_tone"])
    assert seen_tones == {1, 2, 3, 4, 5, 6}


# --------------------------------------------------------------------------- grammar


def colour_stats(label: int) -> dict[str, float]:
    redness, blueness, spread = [], [], []
    for case in cases(label, 30):
        px = lesion_pixels(case)
        r, g, b = px.mean(0)
        redness.append(r - g)
        blueness.append(b / r)
        spread.append(px.std(0).mean())  # colour variation inside the lesion
    return {
        "redness": float(np.mean(redness)),
        "blueness": float(np.mean(blueness)),
        "spread": float(np.mean(spread)),
    }


def test_class_grammar_is_measurable():
    nev, mel, vas = (colour_stats(label) for label in (NEVUS, MELANOMA, VASCULAR))
    # Measured over 30 cases per class at 128 px: redness ~32 / 18 / 95,
    # blueness ~0.48 / 0.70 / 0.45, spread ~20 / 36 / 29 (nevus / melanoma / vascular).
    assert vas["redness"] > 2 * max(nev["redness"], mel["redness"]), (nev, mel, vas)
    assert vas["redness"] > 60
    assert mel["blueness"] > max(nev["blueness"], vas["blueness"]) + 0.12, (nev, mel, vas)
    assert mel["spread"] > 1.4 * nev["spread"], (nev, mel)


def test_melanoma_outline_is_less_regular_than_nevus():
    """Solidity (area / convex-hull area) is near 1 for round lesions, lower for
    irregular ones; melanoma streaks and notches lower it."""

    def solidity(case: SyntheticCase) -> float:
        contours, _ = cv2.findContours(case.mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        contour = max(contours, key=cv2.contourArea)
        return cv2.contourArea(contour) / cv2.contourArea(cv2.convexHull(contour))

    nevus = [solidity(c) for c in cases(NEVUS, 30)]
    melanoma = [solidity(c) for c in cases(MELANOMA, 30)]
    assert np.mean(nevus) > 0.97
    assert np.mean(melanoma) < np.mean(nevus) - 0.08
    assert max(melanoma) < min(nevus)


def test_metadata_correlates_with_class():
    meta = {label: [c.metadata for c in cases(label, 150, size=32, first_seed=5000)] for label in range(3)}
    for rows in meta.values():
        for row in rows:
            assert set(row) == {"age", "sex", "site", "skin_tone"}
            assert isinstance(row["age"], int) and 1 <= row["age"] <= 95
            assert row["sex"] in SEXES and row["site"] in SITES
            assert row["skin_tone"] in range(1, 7)

    def mean_age(label):
        return np.mean([r["age"] for r in meta[label][:60]])

    def share(label, key, values):
        return np.mean([r[key] in values for r in meta[label]])

    assert mean_age(MELANOMA) > mean_age(NEVUS) + 15
    assert mean_age(NEVUS) < mean_age(VASCULAR) < mean_age(MELANOMA)
    assert share(MELANOMA, "sex", {"male"}) > share(NEVUS, "sex", {"male"}) + 0.05
    back_trunk = {"back", "trunk"}
    assert share(MELANOMA, "site", back_trunk) > share(VASCULAR, "site", back_trunk) + 0.2
    face_leg = {"face", "lower_extremity"}
    assert share(VASCULAR, "site", face_leg) > max(
        share(NEVUS, "site", face_leg), share(MELANOMA, "site", face_leg)
    ) + 0.15


def test_same_lesion_at_every_resolution():
    for label in range(3):
        small = generate_case(11, 128, label=label)
        large = generate_case(11, 1024, label=label)
        assert small.metadata == large.metadata
        down = cv2.resize(large.mask, (128, 128), interpolation=cv2.INTER_AREA)
        iou = (small.mask & down).sum() / (small.mask | down).sum()
        assert iou > 0.9, (label, iou)
        image_down = cv2.resize(large.image, (128, 128), interpolation=cv2.INTER_AREA)
        assert np.abs(image_down.astype(int) - small.image.astype(int)).mean() < 12


# --------------------------------------------------------------------------- learnability


def lesion_histogram(case: SyntheticCase) -> np.ndarray:
    """Chromaticity (r, b) histogram of the lesion plus its relative brightness spread."""
    px = lesion_pixels(case) + 1.0
    chroma = px / px.sum(1, keepdims=True)
    hist, _, _ = np.histogram2d(chroma[:, 0], chroma[:, 2], bins=8, range=[[0.2, 0.7], [0.1, 0.45]])
    brightness = px.mean(1)
    return np.concatenate([hist.ravel() / len(px), [brightness.std() / brightness.mean()]])


def test_nearest_centroid_on_colour_histograms_separates_classes():
    train = [generate_case(i, 128, label=i % 3) for i in range(150)]
    test = [generate_case(i, 128, label=i % 3) for i in range(10_000, 10_090)]
    x_train = np.stack([lesion_histogram(c) for c in train])
    x_test = np.stack([lesion_histogram(c) for c in test])
    y_train = np.array([c.label for c in train])
    y_test = np.array([c.label for c in test])
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    z_train, z_test = (x_train - mu) / sd, (x_test - mu) / sd
    centroids = np.stack([z_train[y_train == k].mean(0) for k in range(3)])
    predicted = np.argmin(((z_test[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = (predicted == y_test).mean()
    assert accuracy > 0.8, accuracy


# --------------------------------------------------------------------------- dataset files


def test_generate_dataset_writes_images_masks_and_a_csv_that_round_trips(tmp_path, capsys):
    out = generate_dataset(tmp_path / "ds", n_per_class=4, size=64, seed=3, progress=True)
    assert out == tmp_path / "ds"
    ids = [f"syn_{i:06d}" for i in range(12)]
    assert sorted(p.stem for p in (out / "images").glob("*.jpg")) == ids
    assert sorted(p.stem for p in (out / "masks").glob("*.png")) == ids
    assert sorted(p.name for p in out.iterdir()) == ["images", "labels.csv", "masks"]  # no temp file left

    with open(out / "labels.csv", newline="") as fh:
        assert next(csv.reader(fh)) == list(CSV_FIELDS)
    rows = read_labels_csv(out / "labels.csv")
    assert rows == read_labels_csv(out)  # the directory works too
    assert [r["id"] for r in rows] == ids
    assert [r["label"] for r in rows] == [i % 3 for i in range(12)]
    for i, row in enumerate(rows):
        case = generate_case(3 * 1_000_003 + i, 64, label=i % 3)
        assert row["class_name"] == CLASS_NAMES[row["label"]] == case.class_name
        assert {k: row[k] for k in ("age", "sex", "site", "skin_tone")} == case.metadata
        assert all(isinstance(row[k], int) for k in ("label", "age", "skin_tone"))
        written = cv2.cvtColor(cv2.imread(str(out / "images" / f"{row['id']}.jpg")), cv2.COLOR_BGR2RGB)
        assert np.abs(written.astype(int) - case.image.astype(int)).mean() < 3  # RGB order kept
        mask = cv2.imread(str(out / "masks" / f"{row['id']}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
        assert np.array_equal(mask // 255, case.mask)

    progress = capsys.readouterr().err
    assert "12/12" in progress and "100%" in progress


def test_read_labels_csv_says_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="does not exist.*generate_dataset"):
        read_labels_csv(tmp_path / "nothing.csv")
    bad = tmp_path / "labels.csv"
    bad.write_text("id,label\nsyn_000000,0\n")
    with pytest.raises(ValueError, match="lacks columns"):
        read_labels_csv(bad)
    bad.write_text(",".join(CSV_FIELDS) + "\nsyn_000000,zero,nevus,30,female,back,2\n")
    with pytest.raises(ValueError, match="line 2"):
        read_labels_csv(bad)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("size", [8, 31, 4097, (64, 8), (5000, 64)])
def test_size_out_of_range_is_a_clear_error(size):
    with pytest.raises(ValueError, match=r"out of range.*between 32 and 4096.*fix: pass size=128"):
        generate_case(0, size)


@pytest.mark.parametrize("size", [64.0, "128", (64,), (64, 64, 3), True])
def test_size_of_the_wrong_type_is_a_clear_error(size):
    with pytest.raises(ValueError, match="not an image size"):
        generate_case(0, size)


@pytest.mark.parametrize("label", [7, -1, 3, "nevus", 1.0])
def test_bad_label_is_a_clear_error(label):
    with pytest.raises(ValueError, match=r"label .* is not a valid class.*0\.\.2.*'melanoma'"):
        generate_case(0, 64, label=label)


def test_bad_seed_and_dataset_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="non-negative int"):
        generate_case(-1, 64)
    with pytest.raises(ValueError, match="n_per_class must be a positive int"):
        generate_dataset(tmp_path, n_per_class=0)
    with pytest.raises(ValueError, match="between 32 and 4096"):
        generate_dataset(tmp_path, n_per_class=1, size=8)
    assert list(tmp_path.iterdir()) == []  # nothing written before the checks


def test_module_does_not_import_torch():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from edgederm.data.synthetic import generate_case\n"
        "case = generate_case(1, 64)\n"
        "assert 'torch' not in sys.modules\n"
        "print(case.image.shape)\n"
    )
    repo_root = pathlib.Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=repo_root
    )
    assert done.returncode == 0, done.stderr
    assert "(64, 64, 3)" in done.stdout

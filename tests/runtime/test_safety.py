"""needs_review reason codes (runtime/safety.py): thresholds, malignancy operating point, not-skin check."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from edgederm.data.synthetic import generate_case
from edgederm.runtime.safety import (
    FIXED_RANGES, default_malignant_classes, fit_image_reference, image_statistics, malignant_probability,
    malignant_threshold, not_skin_reasons, review,
)

CLASSES = ["nevus", "melanoma", "vascular"]


def _skin_images():
    # every class, several seeds, sizes from the model input up to a dermoscope frame
    return [generate_case(seed=500 + i, size=size, label=i % 3).image
            for i, size in enumerate([64, 96, 128, 256, 512, 1024, 128, 64, 256])]


def _not_skin_images():
    rng = np.random.default_rng(0)
    text = np.full((256, 384, 3), 255, np.uint8)
    for row in range(12):
        cv2.putText(text, "Patient consent form 2024", (4, 18 + 20 * row), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1)
    return {
        "plain_blue": np.full((300, 400, 3), (30, 60, 200), np.uint8),
        "text": text,
        "noise_64": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "noise_512": rng.integers(0, 256, (512, 512, 3), dtype=np.uint8),
        "lens_cap": np.zeros((480, 640, 3), np.uint8),
        "green_drape": np.full((200, 200, 3), (40, 150, 70), np.uint8),
    }


@pytest.fixture(scope="module")
def reference():
    # fitted on synthetic training-like images (different seeds from the ones tested)
    stats = [image_statistics(generate_case(seed=s, size=128 if s % 2 else 256, label=s % 3).image) for s in range(60)]
    return fit_image_reference(stats)


@pytest.mark.parametrize("use_reference", [False, True], ids=["fixed_ranges", "fitted_reference"])
def test_skin_is_not_flagged_and_non_skin_is(reference, use_reference, record_property):
    ref = reference if use_reference else None
    flagged_skin = [not_skin_reasons(image_statistics(im), ref) for im in _skin_images()]
    assert not any(flagged_skin), flagged_skin
    outcomes = {name: not_skin_reasons(image_statistics(im), ref) for name, im in _not_skin_images().items()}
    missed = [name for name, reasons in outcomes.items() if not reasons]
    assert not missed, outcomes
    assert all(r[0].startswith("not_skin:") for r in outcomes.values())
    record_property(f"figure:not_skin_{'fitted' if use_reference else 'fixed'}",
                    f"skin flagged 0/{len(flagged_skin)}, non-skin flagged {len(outcomes)}/{len(outcomes)}")


def test_reference_is_fitted_from_training_images(reference):
    assert reference["images"] == 60 and set(reference["ranges"]) == set(FIXED_RANGES)
    lo, hi = reference["ranges"]["skin_fraction"]
    assert 0.0 <= lo < hi <= 1.0
    assert fit_image_reference([image_statistics(np.zeros((8, 8, 3), np.uint8))] * 5) is None  # too few images


def test_image_statistics_do_not_depend_on_resolution():
    small = image_statistics(generate_case(seed=7, size=256, label=1).image)
    large = image_statistics(generate_case(seed=7, size=1024, label=1).image)
    assert small["skin_fraction"] == pytest.approx(large["skin_fraction"], abs=0.08)
    assert small["colorfulness"] == pytest.approx(large["colorfulness"], rel=0.15)


def test_malignant_threshold_reaches_target_sensitivity():
    rng = np.random.default_rng(3)
    is_mal = rng.random(400) < 0.3
    scores = np.clip(np.where(is_mal, rng.normal(0.7, 0.2, 400), rng.normal(0.25, 0.2, 400)), 0, 1)
    for target in (0.8, 0.9, 0.95, 1.0):
        point = malignant_threshold(scores, is_mal, target)
        sens = (scores[is_mal] >= point["threshold"]).mean()
        assert sens >= target and point["sensitivity"] == pytest.approx(sens)
        # the highest such threshold: one step higher misses the target
        positives = scores[is_mal]
        higher = positives[positives > point["threshold"]]
        if len(higher):
            assert (scores[is_mal] >= higher.min()).mean() < target
        assert point["specificity"] == pytest.approx((scores[~is_mal] < point["threshold"]).mean())
    # 10 positives, target 0.95 -> all 10 must be caught: the lowest positive score
    point = malignant_threshold(np.linspace(0.1, 1.0, 10), np.ones(10, bool), 0.95)
    assert point["threshold"] == pytest.approx(0.1)
    assert malignant_threshold(np.ones(4), np.zeros(4, bool))["threshold"] is None


def test_default_malignant_classes_and_probability():
    assert default_malignant_classes(["NV", "MEL", "BCC", "BKL", "AKIEC", "VASC"]) == ["MEL", "BCC", "AKIEC"]
    assert default_malignant_classes(CLASSES) == ["melanoma"]
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    assert malignant_probability(probs, CLASSES, ["melanoma", "vascular"]) == pytest.approx([0.5, 0.9])


def test_review_reason_codes():
    clinical = {"review_threshold": 0.6, "malignant_classes": ["melanoma"], "malignant_threshold": 0.2,
                "review_classes": ["vascular"], "review_class_min_probability": 0.1}
    assert review(np.array([0.9, 0.05, 0.05]), CLASSES, clinical) == []
    assert review(np.array([0.5, 0.45, 0.05]), CLASSES, clinical) == ["low_confidence:0.50<0.60", "possible_malignancy:0.45>=0.20"]
    # top class malignant: the label says it already, no possible_malignancy
    assert review(np.array([0.15, 0.8, 0.05]), CLASSES, clinical) == []
    assert review(np.array([0.7, 0.05, 0.25]), CLASSES, clinical) == ["review_class:vascular:rank2:0.25"]
    assert review(np.array([0.1, 0.1, 0.8]), CLASSES, clinical) == ["review_class:vascular:rank1:0.80"]
    assert review(np.array([0.75, 0.2, 0.05]), CLASSES, clinical) == ["possible_malignancy:0.20>=0.20"]
    # no thresholds in the bundle: nothing to flag but the safety list
    assert review(np.array([0.4, 0.35, 0.25]), CLASSES, {}) == []
    blue = image_statistics(np.full((64, 64, 3), (30, 60, 200), np.uint8))
    reasons = review(np.array([0.9, 0.05, 0.05]), CLASSES, clinical, blue)
    assert len(reasons) == 1 and reasons[0].startswith("not_skin:skin_fraction=0<")
    assert review(np.array([0.9, 0.05, 0.05]), CLASSES, {**clinical, "ood_check": False}, blue) == []


def test_runtime_applies_review_rules():
    # The runtime's result step without a bundle (loading one is the runtime tests' job)
    from edgederm.runtime.bundle import Clinical
    from edgederm.runtime.model import classification_result

    settings = {"temperature": 2.0, "review_threshold": 0.0, "malignant_classes": ["melanoma"],
                "malignant_threshold": 0.3, "review_classes": []}
    clinical = Clinical(temperature=2.0, review_threshold=0.0, settings=settings)

    def result_of(logits, image):
        return classification_result(logits, CLASSES, clinical, image, "test", "fp32")

    skin = generate_case(seed=42, size=512, label=0).image
    logits = np.log(np.array([0.6, 0.3, 0.1]))
    result = result_of(logits, skin)
    # temperature 2 flattens (0.6, 0.3, 0.1) to (0.47, 0.33, 0.19): P(melanoma) over the threshold
    assert result.probabilities["melanoma"] == pytest.approx(np.sqrt(0.3) / np.sqrt([0.6, 0.3, 0.1]).sum(), rel=1e-5)
    assert result.label == "nevus" and result.review_reasons == ["possible_malignancy:0.33>=0.30"]
    assert (result.backend, result.precision) == ("test", "fp32")
    blue = result_of(np.array([5.0, 0.0, 0.0]), np.full((256, 256, 3), (30, 60, 200), np.uint8))
    assert blue.needs_review and blue.review_reasons[0].startswith("not_skin:")
    assert result_of(np.array([5.0, 0.0, 0.0]), None).review_reasons == []

"""The checkpoint's ``clinical`` section, fitted on the validation split each epoch.

Temperature scaling (Guo et al., 2017), the P(malignant) threshold for the target
sensitivity, rare and safety-listed classes for review (``edgederm.runtime.safety``),
and the training images' colour statistics for the not-skin check. Threshold and ECE
come from the split the temperature was fitted on, so they are in-sample estimates;
check them on held-out data.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from edgederm.metrics import expected_calibration_error, fit_temperature
from edgederm.runtime.errors import InputError
from edgederm.training.config import TrainConfig

if TYPE_CHECKING:
    from edgederm.data.labelled import LabelledImages
    from edgederm.runtime.preprocess import PreprocessConfig


def reference_stats(data: LabelledImages, idx: np.ndarray, preprocess: PreprocessConfig | None) -> list[dict[str, float]] | None:
    """Image statistics of the training images, for the not-skin check's reference."""
    from edgederm.runtime.safety import image_statistics

    if data.image_stats is not None:
        return [data.image_stats[i] for i in idx]
    if preprocess is None or preprocess.color_constancy != "none" or preprocess.hair_removal:
        return None  # the tensors no longer show the camera's colours; use the fixed ranges
    mean = np.array(preprocess.mean, np.float32)[:, None, None]
    std = np.array(preprocess.std, np.float32)[:, None, None]
    return [image_statistics(np.clip((data.x[i] * std + mean) * 255 + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0))
            for i in idx]


def fit_operating_point(logits: np.ndarray, labels: np.ndarray, class_names: Sequence[str], malignant: Sequence[str],
                        target_sensitivity: float) -> tuple[float, np.ndarray, dict[str, Any] | None]:
    """(temperature, calibrated probabilities, malignant operating point) fitted on labelled logits.

    Training fits them on the validation split; quantize refits them for each
    reduced-precision graph on the labelled evaluation split (calibration/clinical.py).
    """
    from edgederm.runtime.probabilities import softmax
    from edgederm.runtime.safety import malignant_probability, malignant_threshold

    temperature = fit_temperature(logits, labels)
    probs = softmax(logits, temperature)
    malignant_idx = [list(class_names).index(c) for c in malignant]
    operating = malignant_threshold(malignant_probability(probs, class_names, malignant),
                                    np.isin(labels, malignant_idx), target_sensitivity) if malignant else None
    return temperature, probs, operating


def calibrate(val_logits: np.ndarray, val_labels: np.ndarray, class_names: Sequence[str], config: TrainConfig,
              train_labels: np.ndarray, image_reference: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(clinical section, calibration report) from validation logits."""
    from edgederm.runtime.probabilities import softmax
    from edgederm.runtime.safety import default_malignant_classes

    malignant = list(config.malignant_classes) if config.malignant_classes is not None else default_malignant_classes(class_names)
    unknown = [c for c in malignant if c not in class_names]
    if unknown:
        raise InputError(f"malignant classes {unknown} are not class names of this dataset ({list(class_names)})")
    temperature, probs, operating = fit_operating_point(val_logits, val_labels, class_names, malignant,
                                                        config.target_sensitivity)
    prevalence = np.bincount(train_labels, minlength=len(class_names)) / max(1, len(train_labels))
    rare = [c for c, p in zip(class_names, prevalence) if p < config.rare_class_fraction]
    clinical: dict[str, Any] = {
        "temperature": temperature,
        "review_threshold": config.review_threshold,
        "review_classes": sorted(set(config.review_classes) | set(rare)),
        "malignant_classes": malignant,
        "malignant_threshold": operating["threshold"] if operating else None,
        "target_sensitivity": config.target_sensitivity,
    }
    if operating:
        clinical["malignant_operating_point"] = operating
    if image_reference is not None:
        clinical["image_reference"] = image_reference
    report = {
        "temperature": temperature,
        "val_ece_before": expected_calibration_error(softmax(val_logits), val_labels),
        "val_ece_after": expected_calibration_error(probs, val_labels),
    }
    return clinical, report

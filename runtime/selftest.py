"""Golden self-test: stored inputs and reference outputs per stage, run on the device's backend.

TensorRT has no pre-flight check (an engine must run to show it is wrong), and a
graph can be damaged, mis-built or mis-quantized without failing its sha256 (it was
written that way). The self-test runs each stage of the loaded model on golden
inputs and refuses the bundle when an output leaves its tolerance, naming stage,
precision, max difference and tolerance.

Goldens live in the bundle (``selftest/<stage>.npz``, numeric arrays only, read with
``allow_pickle=False``; listed with their sha256 in the manifest's file table, so a
signature covers them) and are described in the manifest's ``selftest`` section
(:class:`runtime.bundle.SelfTest`):

* inputs: a deterministic synthetic lesion (a brown ellipse with a darker core on
  skin tone, seeded) put through the bundle's own preprocessing at each image input's
  size; metadata encoded from an empty record; modality masks all present; inputs
  fed from earlier stages are those stages' fp32 outputs on their goldens.
* reference: the bundle's fp32 graph on ONNX Runtime CPU, for every precision.
* tolerance per stage and precision: ``max(floor * scale, 3 x the difference that
  precision showed against fp32 when the goldens were made)``, where ``scale`` is
  ``max(1, max|reference|)`` and the floors are those in :data:`TOLERANCE_FLOOR`.
  A backend's own rounding (ORT CPU vs CUDA vs TensorRT) stays inside; a graph with
  a scaled weight does not.

This module is the check ``load(..., selftest=True)`` runs on a loaded model; making
goldens (``add_goldens``) and testing every precision of a bundle
(``selftest_bundle``) load bundles and live in runtime/goldens.py.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import cv2
import numpy as np

from .errors import SelfTestError

if TYPE_CHECKING:
    from .backends.base import Backend
    from .bundle import Manifest
    from .model import DeployedModel

FOLDER = "selftest"
SEED = 20240611
TOLERANCE_FLOOR = {"fp32": 1e-4, "fp16": 2e-2, "int8": 5e-2, "int8_dynamic": 5e-2}
MARGIN = 3.0


def synthetic_lesion(height: int, width: int, seed: int = SEED) -> np.ndarray:
    """A deterministic dermoscopy-like RGB uint8 image: skin tone, pigmented ellipse, mild noise."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = (214, 170, 140)
    center = (width // 2 + int(rng.integers(-width // 8, width // 8 + 1)),
              height // 2 + int(rng.integers(-height // 8, height // 8 + 1)))
    axes = (max(2, width // 4), max(2, height // 5))
    cv2.ellipse(image, center, axes, float(rng.integers(0, 180)), 0, 360, (120, 72, 50), -1)
    cv2.ellipse(image, center, (max(1, axes[0] // 2), max(1, axes[1] // 2)), 0, 0, 360, (70, 40, 30), -1)
    noise = rng.integers(-12, 13, size=image.shape)
    return np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def run_selftest(model: DeployedModel) -> list[dict[str, Any]]:
    """Run the goldens on ``model``'s backend and precision; SelfTestError on the first output out of tolerance.

    The parser (runtime/bundle.py) has checked that each goldens file is in the file
    table, so ``load`` verified its sha256 with the graphs'.
    """
    return check_goldens(model.manifest, model.stages, model.precision, model.backend_name)


def has_goldens(manifest: Manifest, precision: str) -> bool:
    """Whether every stage has goldens with a tolerance for ``precision``."""
    section = manifest.selftest
    return section is not None and all(
        s.name in section.stages and precision in section.stages[s.name].tolerance for s in manifest.stages)


def check_goldens(manifest: Manifest, stages: Mapping[str, Backend], precision: str,
                  backend_name: str, refuse: bool = True) -> list[dict[str, Any]]:
    """The goldens of every stage run on ``stages`` (opened for ``precision``): a row per
    stage; ``refuse``: SelfTestError on the first output out of tolerance."""
    if manifest.selftest is None or not manifest.selftest.stages:
        raise SelfTestError(f"bundle {manifest.root} has no golden self-test; "
                            f"add one with `edgederm selftest add {manifest.root}` (then sign again)")
    rows = []
    for stage in manifest.stages:
        goldens = manifest.selftest.stages.get(stage.name)
        if goldens is None:
            raise SelfTestError(f"stage {stage.name!r} has no goldens; run `edgederm selftest add` again")
        tolerance = goldens.tolerance.get(precision)
        if tolerance is None:
            raise SelfTestError(f"stage {stage.name!r} has no {precision} tolerance (goldens made before "
                                f"that precision was added); run `edgederm selftest add {manifest.root}` again")
        with np.load(manifest.root / goldens.file, allow_pickle=False) as stored:
            feed = {k[len("input."):]: stored[k] for k in stored.files if k.startswith("input.")}
            expected = {k[len("output."):]: stored[k] for k in stored.files if k.startswith("output.")}
        got = stages[stage.name].run(feed)
        diff = max(float(np.max(np.abs(got[k].astype(np.float64) - v))) if got[k].shape == v.shape else float("inf")
                   for k, v in expected.items())
        row = {"stage": stage.name, "precision": precision, "backend": backend_name,
               "max_abs_diff": diff, "tolerance": tolerance, "passed": bool(diff <= tolerance)}
        rows.append(row)
        if refuse and not row["passed"]:
            raise SelfTestError(
                f"self-test failed on {backend_name}: stage {stage.name!r} {precision} output differs "
                f"from the golden by {diff:.4g} (tolerance {tolerance:.4g}); the graph is damaged or mis-built for "
                "this device. Do not use this bundle; re-install the released bundle or rebuild its engines")
    return rows

"""Result.timings: every step of a prediction measured once, the steps adding up to the whole."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

import edgederm.runtime as rt
from edgederm.runtime.bundle import write_manifest
from edgederm.runtime.timings import PIXEL_STEPS, breakdown, is_step, whole_ms
from edgederm.runtime.tiling import sliding_window

BACKEND_SECONDS = 0.02  # each backend run sleeps this long, so the steps, not the glue, make the whole


class _Sleeping:
    """A stage backend that takes a known time (a model large enough to dominate)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(BACKEND_SECONDS)
        return self.backend.run(feed)


def _with_preprocessing(root: Path) -> Path:
    data = json.loads((root / "manifest.json").read_text())
    data["preprocess"].update(color_constancy="gwsd", hair_removal=True)
    write_manifest(root, data)
    return root


def _segmenter(write_onnx_bundle: Any, root: Path) -> Path:
    """A 1x1-convolution segmenter on 32 px tiles, overlap 0.25, gaussian blend, batches of 4."""
    from onnx import TensorProto, helper

    weights = np.array([[[[0.5]], [[-0.2]], [[0.1]]], [[[-0.4]], [[0.3]], [[0.2]]]], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["dermoscopy", "w"], ["logits"])], "seg",
        [helper.make_tensor_value_info("dermoscopy", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2, 32, 32])],
        [helper.make_tensor("w", TensorProto.FLOAT, weights.shape, weights.ravel())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return write_onnx_bundle(root, {"fp32": model}, ["background", "lesion"], 32,
                             {"temperature": 1.0, "review_threshold": 0.5, "review_classes": []}, task="segment",
                             tiling={"tile": 32, "overlap": 0.25, "blend": "gaussian", "batch_size": 4})


def _hairy_file(path: Path, height: int, width: int) -> Path:
    rng = np.random.default_rng(1)
    image = np.clip(rng.normal((190, 140, 120), 6, (height, width, 3)), 0, 255).astype(np.uint8)
    for y in range(10, height, 37):
        cv2.line(image, (0, y), (width - 1, y + 25), (40, 30, 25), 2)
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return path


def _predict_file(bundle: Path, image: Path) -> tuple[rt.Result, float]:
    model = rt.load(bundle, precision="fp32", cache=False)
    model.pipeline.backends = {name: _Sleeping(backend) for name, backend in model.pipeline.backends.items()}
    start = time.perf_counter()
    result = model.predict_file(image)
    return result, (time.perf_counter() - start) * 1000


def _check_adds_up(timings: dict[str, float], wall_ms: float) -> None:
    steps = {k: v for k, v in timings.items() if is_step(k)}
    assert all(v >= 0 for v in timings.values())
    assert timings["preprocess"] == pytest.approx(sum(timings.get(s, 0.0) for s in PIXEL_STEPS), abs=1e-9)
    assert timings["inference"] == pytest.approx(
        sum(v for k, v in timings.items() if k.startswith("inference:")), abs=1e-9)
    whole = whole_ms(timings)
    # Steps are sequential and inside the whole (guaranteed), and they are what takes the time:
    # the glue between them (Python calls, small copies) is far below the sleeping backend's runs.
    assert sum(steps.values()) <= whole + 1e-6
    assert whole <= wall_ms + 1e-6
    assert sum(steps.values()) >= 0.5 * whole
    shares = breakdown(timings)
    assert sum(s["share"] for s in shares.values()) == pytest.approx(1.0, abs=1e-9)
    assert shares["other"]["ms"] == pytest.approx(whole - sum(steps.values()), abs=1e-6)


def test_segmenter_timings_name_every_step_and_add_up_to_the_whole(write_onnx_bundle, tmp_path) -> None:
    bundle = _with_preprocessing(_segmenter(write_onnx_bundle, tmp_path / "seg"))
    result, wall = _predict_file(bundle, _hairy_file(tmp_path / "lesion.png", 150, 200))
    timings = result.timings
    expected = {"decode", "checks", "color_stats", "color_constancy", "hair_removal", "resize", "tiles", "normalize",
                "inference:classifier", "probabilities", "blend", "review"}
    assert expected <= {k for k in timings if is_step(k)}
    assert {"total", "preprocess", "inference", "tiled_inference"} <= set(timings)
    # 48 tiles in batches of 4: twelve backend runs, each at least the sleep.
    assert timings["inference:classifier"] >= 12 * BACKEND_SECONDS * 1000
    assert timings["tiled_inference"] <= timings["total"]
    _check_adds_up(timings, wall)


def test_classifier_timings_name_every_step_and_add_up_to_the_whole(mini_bundle, tmp_path) -> None:
    bundle = _with_preprocessing(mini_bundle)
    result, wall = _predict_file(bundle, _hairy_file(tmp_path / "lesion.png", 120, 90))
    expected = {"decode", "checks", "color_stats", "color_constancy", "hair_removal", "resize", "normalize",
                "inference:classifier", "review"}
    assert expected <= {k for k in result.timings if is_step(k)}
    assert result.timings["inference:classifier"] >= BACKEND_SECONDS * 1000
    _check_adds_up(result.timings, wall)


def test_timing_the_tiler_leaves_its_output_unchanged() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)

    def predict(batch: np.ndarray) -> np.ndarray:
        return batch.transpose(0, 3, 1, 2).astype(np.float32) / 255.0

    timings: dict[str, float] = {}
    timed = sliding_window(image, predict, tile=32, overlap=0.25, timings=timings)
    plain = sliding_window(image, predict, tile=32, overlap=0.25)
    np.testing.assert_array_equal(timed, plain)
    assert set(timings) == {"tiles", "blend"} and all(v > 0 for v in timings.values())

"""The runtime contract: predict on arrays and files, no torch, clear errors."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest

from edgederm.data.synthetic import generate_case
from edgederm.runtime import ImageDecodeError, InputError, Result, load


def test_runtime_predicts_where_torch_cannot_be_imported(tiny_bundle, tmp_path):
    image = generate_case(seed=3, size=300).image
    path = tmp_path / "case.png"
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    script = textwrap.dedent(f"""
        import builtins, json, sys
        real_import = builtins.__import__
        def guarded(name, *args, **kwargs):
            if name == "torch" or name.startswith("torch.") or name in ("onnx", "onnxscript"):
                raise ImportError("torch is blocked in this test")
            return real_import(name, *args, **kwargs)
        builtins.__import__ = guarded
        from edgederm.runtime import load
        model = load({str(tiny_bundle)!r})
        result = model.predict_file({str(path)!r})
        assert "torch" not in sys.modules
        print(json.dumps(result.to_dict()))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["label"] in ("nevus", "melanoma", "vascular")
    assert abs(sum(out["probabilities"].values()) - 1.0) < 1e-5


def test_runtime_matches_torch_on_the_same_pixels(tiny_bundle):
    torch = pytest.importorskip("torch")
    from edgederm.models import create_model
    from edgederm.runtime.probabilities import softmax
    from edgederm.runtime.preprocess import PreprocessConfig, preprocess

    torch.manual_seed(0)  # the fixture's weights
    model = create_model("hifuse_tiny", class_names=["nevus", "melanoma", "vascular"]).eval()
    image = generate_case(seed=5, size=512).image
    x = preprocess(image, PreprocessConfig(input_size=(128, 128)))
    with torch.no_grad():
        expected = softmax(model(torch.from_numpy(x[None])).numpy())[0]
    result = load(tiny_bundle, precision="fp32").predict(dermoscopy=image)
    got = np.array([result.probabilities[c] for c in ["nevus", "melanoma", "vascular"]])
    assert np.allclose(got, expected, atol=1e-5)
    assert result.backend == "onnxruntime-cpu" and result.precision == "fp32"
    assert set(result.timings) >= {"preprocess", "inference", "total"}


def test_result_fields_and_review(tiny_bundle):
    result = load(tiny_bundle).predict(dermoscopy=generate_case(seed=1, size=256).image, metadata={"age": 54})
    assert isinstance(result, Result)
    # auto on CPU: int8 only if quantize measured it faster than fp32 on this machine
    latency = json.loads((tiny_bundle / "manifest.json").read_text())["calibration"]["int8"]["latency"]
    assert result.precision == ("int8" if latency["speedup"] > 1.0 else "fp32"), latency
    assert result.needs_review == bool(result.review_reasons)
    assert "metadata ignored: this model does not use it" in result.notes
    assert result.memory_peak_bytes and result.memory_peak_bytes > 10 * 2**20


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "empty"),
        (b"hello, this is text\n" * 4, "not a decodable image"),
    ],
)
def test_bad_files_are_typed_errors_naming_the_file(tiny_bundle, tmp_path, content, match):
    path = tmp_path / "lesion.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=match) as info:
        load(tiny_bundle).predict_file(path)
    assert "lesion.jpg" in str(info.value)


def test_truncated_jpeg_is_a_typed_error(tiny_bundle, tmp_path):
    ok, data = cv2.imencode(".jpg", generate_case(seed=2, size=256).image)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data.tobytes()[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="truncated") as info:
        load(tiny_bundle).predict_file(path)
    assert "cut.jpg" in str(info.value)


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((64, 64, 5), np.uint8), "channel"),
        (np.zeros((64, 64, 3), np.float32), "uint8"),
        (np.zeros((0, 64, 3), np.uint8), "empty|0"),
    ],
)
def test_bad_arrays_are_refused(tiny_bundle, array, match):
    with pytest.raises(InputError, match=match):
        load(tiny_bundle).predict(dermoscopy=array)


def test_nan_metadata_is_refused(tiny_bundle):
    with pytest.raises(InputError, match="age.*finite"):
        load(tiny_bundle).predict(dermoscopy=np.zeros((64, 64, 3), np.uint8), metadata={"age": float("nan")})


def test_gray_and_rgba_arrays_are_accepted(tiny_bundle):
    model = load(tiny_bundle, precision="fp32")
    gray = np.full((80, 90), 150, np.uint8)
    rgba = np.dstack([np.full((80, 90, 3), 150, np.uint8), np.zeros((80, 90), np.uint8)])
    a, b = model.predict(dermoscopy=gray), model.predict(dermoscopy=rgba)
    assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)


def _with_calibration(tiny_bundle, sections):
    from edgederm.runtime.bundle import parse_manifest, read_manifest

    manifest = read_manifest(tiny_bundle)
    data = copy.deepcopy(manifest.data)
    data["calibration"] = sections
    for stage in data["stages"]:
        for p in sections:
            stage["graphs"].setdefault(p, stage["graphs"]["int8"])
    return parse_manifest(data, manifest.root)


@pytest.mark.parametrize("sections, expected", [
    ({"int8": {"latency": {"speedup": 1.4}}}, "int8"),
    ({"int8": {"latency": {"speedup": 0.8}}}, "fp32"),  # slower than fp32 on this CPU
    ({"int8": {"latency": {"speedup": 1.2}}, "int8_dynamic": {"latency": {"speedup": 1.9}}}, "int8_dynamic"),
    ({"int8": {"latency": {"speedup": 1.2}}, "int8_dynamic": {"latency": {"speedup": 1.9}, "target": {"reached": False}}},
     "int8"),  # a graph that missed its agreement target is never chosen by auto
    ({"int8": {}}, "int8"),  # quantized before latency was recorded: the fixed order
])
def test_auto_precision_on_cpu_follows_measured_speed(tiny_bundle, sections, expected):
    from edgederm.runtime.selection import CPU, choose, choose_precision

    manifest = _with_calibration(tiny_bundle, sections)
    assert choose_precision(manifest, "auto", "cpu") == expected
    assert choose_precision(manifest, "fp32", "cpu") == "fp32"  # an explicit choice is kept
    choice = choose(manifest, "auto", "auto", ["CPUExecutionProvider"])
    assert (choice.backend, choice.providers, choice.precision, choice.notes) == ("onnxruntime-cpu", CPU, expected, ())

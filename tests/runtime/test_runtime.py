"""The runtime contract: predict on arrays and files, no torch, clear errors."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgederm.data.synthetic import generate_case
from edgederm.runtime import ImageDecodeError, InputError, Result, load
from edgederm.runtime.backends.onnxruntime import cpu_identity
from edgederm.runtime.selection import SPEEDUP_MARGIN

REPO = Path(__file__).resolve().parents[2]


# What a device without torch has: importing any of these fails in the child process.
_BLOCKED = ("torch", "torchvision", "onnx", "onnxscript", "safetensors", "timm", "monai")


def _run_without_torch(tmp_path, args: list[str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``python ARGS`` with the torch side unimportable from interpreter start (a
    sitecustomize first on the path); returns the process and the modules it had loaded."""
    modules_file = tmp_path / "modules.json"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import atexit, json, sys

        class BlockTorchSide:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {_BLOCKED!r}:
                    raise ImportError(f"{{name}} is blocked in this test")
                return None

        def report_modules():
            with open({str(modules_file)!r}, "w") as f:
                json.dump(sorted(sys.modules), f)

        sys.meta_path.insert(0, BlockTorchSide())
        atexit.register(report_modules)
    """))
    path = [str(site), str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(modules_file.read_text())


@pytest.mark.parametrize("entry", ["cli", "api"])
def test_runtime_predicts_where_torch_cannot_be_imported(tiny_bundle, tmp_path, entry):
    """`edgederm predict` and ``edgederm.runtime.load`` on a machine without torch or onnx
    load the runtime alone: no trainer, model, data, export or calibration module."""
    image = generate_case(seed=3, size=300).image
    path = tmp_path / "case.png"
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if entry == "cli":
        args = ["-m", "edgederm.cli", "predict", str(tiny_bundle), str(path), "--json"]
        # the parser's `train` options and the TrainConfig record they fill: no torch, no trainer
        allowed = {"edgederm", "edgederm.cli", "edgederm.training", "edgederm.training.options", "edgederm.training.config"}
    else:
        args = ["-c", f"import json; from edgederm.runtime import load; "
                      f"print(json.dumps(load({str(tiny_bundle)!r}).predict_file({str(path)!r}).to_dict()))"]
        allowed = {"edgederm"}
    proc, modules = _run_without_torch(tmp_path, args)
    out = json.loads(proc.stdout)
    assert out["label"] in ("nevus", "melanoma", "vascular")
    assert abs(sum(out["probabilities"].values()) - 1.0) < 1e-5
    assert "edgederm.runtime.model" in modules  # the report is of the process that predicted
    loaded = {m for m in modules if m.split(".")[0] == "edgederm" and not m.startswith("edgederm.runtime")}
    assert loaded <= allowed, f"{entry}: the device loaded {sorted(loaded - allowed)}"
    assert not [m for m in modules if m.split(".")[0] in _BLOCKED]


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
    # auto on CPU: int8 only if quantize measured it faster than fp32 by the margin on this CPU
    latency = json.loads((tiny_bundle / "manifest.json").read_text())["calibration"]["int8"]["latency"]
    assert latency["cpu"] == cpu_identity()
    assert result.precision == ("int8" if latency["speedup"] > SPEEDUP_MARGIN else "fp32"), latency
    assert any(n.startswith(f"precision auto: {result.precision} (int8 ") and "measured on this CPU at quantize time" in n
               for n in result.notes), result.notes
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
    ({"int8": {"latency": {"speedup": 1.04}}}, "fp32"),  # within the margin load can move
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


def test_the_runtime_ships_its_metadata_schemas(tmp_path):
    """One copy of the schemas, inside the runtime package (read with importlib.resources)."""
    from edgederm.runtime import metadata

    runtime_dir = Path(metadata.__file__).resolve().parent
    assert Path(str(metadata.SCHEMAS)).resolve() == runtime_dir / "schemas"
    bundled = metadata.bundled_schemas()
    assert bundled == sorted(p.stem for p in (runtime_dir / "schemas").glob("*.json"))
    assert {"synthetic", "ham10000", "pad_ufes_20", "derm7pt", "isic2019"} <= set(bundled)
    assert not list(REPO.glob("edgederm/data/**/*.json"))
    assert metadata.load_schema("ham10000").name == "ham10000"
    with pytest.raises(InputError, match=r"'ham10001' is neither a file nor a bundled schema; bundled: \['derm7pt'"):
        metadata.load_schema("ham10001")
    own = tmp_path / "clinic.json"  # a file path still wins over the bundled names
    own.write_text(json.dumps({"name": "clinic", "fields": [{"name": "age", "type": "numeric", "min": 0, "max": 100}]}))
    assert metadata.load_schema(str(own)).dim == 2

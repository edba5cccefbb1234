"""TensorRT: engine target checks, cache keys, calibration cache, `edgederm build`, runtime fallback.

The pure-Python parts run everywhere. Tests marked ``trt``/``gpu`` build fp16 and
int8 engines for each stage of the tiny bundle and compare them with ONNX Runtime;
they skip on machines without TensorRT and a CUDA GPU (TensorRT cannot be installed
on this project's CI machines).
"""
from __future__ import annotations

import json
import math
import shutil
import struct
import sys

import numpy as np
import pytest

from edgederm.calibration import trt_cache
from edgederm.export import tensorrt as trt_export
from edgederm.runtime.backends import tensorrt as trt_backend
from edgederm.runtime.backends.cuda import DeviceInfo, query_device
from edgederm.runtime.backends.engines import check_engine_target, engine_cache_key, select_engine, select_engines
from edgederm.runtime.errors import InputError, MissingDependencyError
from edgederm.runtime.optional import import_tensorrt, tensorrt_available

NO_TRT_REASON = ("TensorRT and a CUDA GPU are needed; TensorRT cannot be installed on this project's CI machines "
                 "(run on a Jetson or a GPU workstation with TensorRT 8.5+/10.x and cuda-python)")

ORIN = DeviceInfo(gpu_name="Orin", compute_capability="8.7", sm_count=8, tensorrt_version="8.5.2.2", integrated=True)


def _entry(**target_overrides):
    target = {"gpu_name": "Orin", "compute_capability": "8.7", "sm_count": 8, "tensorrt_version": "8.5.2.2"}
    target.update(target_overrides)
    return {"stage": "classifier", "precision": "int8", "file": "engines/classifier.int8.abc.engine", "target": target}


def _has_gpu_tensorrt() -> bool:
    if not tensorrt_available():
        return False
    try:
        query_device()
    except Exception:
        return False
    return True


# -- engine target check ----------------------------------------------------------------------------
def test_engine_target_matches_same_device():
    assert check_engine_target(_entry(), ORIN) == []
    # A different TensorRT build number of the same release still matches; case and spaces in the name do not matter.
    assert check_engine_target(_entry(tensorrt_version="8.5.2.9", gpu_name=" orin "), ORIN) == []


@pytest.mark.parametrize("override, expected", [
    ({"gpu_name": "NVIDIA GeForce RTX 4090"}, r"built for GPU 'NVIDIA GeForce RTX 4090', this device is 'Orin'"),
    ({"compute_capability": "7.2"}, r"built for compute capability 7.2, this device has 8.7"),
    ({"tensorrt_version": "10.3.0.30"}, r"built with TensorRT 10.3.0.30, this device has 8.5.2.2"),
    ({"tensorrt_version": "8.6.2"}, r"built with TensorRT 8.6.2, this device has 8.5.2.2"),
    ({"sm_count": 16}, r"built for 16 SMs, this device has 8"),
])
def test_engine_target_mismatch_says_why(override, expected):
    reasons = check_engine_target(_entry(**override), ORIN)
    assert len(reasons) == 1
    assert reasons[0] == expected.replace("\\", "")


def test_engine_target_reports_every_mismatch_and_missing_target():
    reasons = check_engine_target(_entry(gpu_name="Xavier", compute_capability="7.2", tensorrt_version="8.4.1"), ORIN)
    assert len(reasons) == 3
    assert "records no target" in check_engine_target({"file": "x.engine"}, ORIN)[0]


def test_select_engine_prefers_int8_and_explains_rejections():
    fp16 = dict(_entry(), precision="fp16", file="engines/classifier.fp16.engine")
    int8 = _entry()
    entry, reason = select_engine([fp16, int8], ORIN, "classifier")
    assert entry is not None and entry["precision"] == "int8" and reason == ""
    entry, reason = select_engine([fp16, int8], ORIN, "classifier", precision="fp16")
    assert entry is not None and entry["file"] == fp16["file"]
    other = DeviceInfo("NVIDIA A100-SXM4-80GB", "8.0", 108, "10.3.0")
    entry, reason = select_engine([fp16, int8], other, "classifier")
    assert entry is None
    assert "no TensorRT engine matches this device" in reason and "compute capability 8.7" in reason
    assert "engines/classifier.int8.abc.engine" in reason and "engines/classifier.fp16.engine" in reason
    entry, reason = select_engine([int8], ORIN, "region_encoder")
    assert entry is None and "no TensorRT engine for stage 'region_encoder'" in reason


def test_select_engines_needs_every_stage():
    stages, engines = ["window_encoder", "region_encoder"], [dict(_entry(), stage="window_encoder")]
    chosen, reason = select_engines(stages, engines, ORIN)
    assert chosen is None and "region_encoder" in reason
    engines.append(dict(_entry(), stage="region_encoder", file="engines/r.engine"))
    chosen, reason = select_engines(stages, engines, ORIN)
    assert chosen is not None and sorted(chosen) == ["region_encoder", "window_encoder"] and reason == ""


# -- engine cache key -----------------------------------------------------------------------------------
def test_engine_cache_key_changes_with_each_component():
    profiles = {"image": {"min": [1, 3, 224, 224], "opt": [4, 3, 224, 224], "max": [4, 3, 224, 224]}}
    base = dict(model_sha256="a" * 64, tensorrt_version="8.5.2.2", gpu_name="Orin", sm_count=8, precision="int8",
                profile_shapes=profiles, compute_capability="8.7")
    key = engine_cache_key(**base)
    assert len(key) == 64 and key == engine_cache_key(**base)
    changes = {
        "model_sha256": "b" * 64, "tensorrt_version": "10.3.0", "gpu_name": "NVIDIA Jetson AGX Orin",
        "sm_count": 16, "precision": "fp16", "compute_capability": "8.6",
        "profile_shapes": {"image": {**profiles["image"], "max": [8, 3, 224, 224], "opt": [8, 3, 224, 224]}},
    }
    keys = {key}
    for field, value in changes.items():
        other = engine_cache_key(**{**base, field: value})
        assert other != key, field
        keys.add(other)
    assert len(keys) == len(changes) + 1
    # Order of dict keys does not change the key.
    reordered = {"image": {"max": [4, 3, 224, 224], "min": [1, 3, 224, 224], "opt": [4, 3, 224, 224]}}
    assert engine_cache_key(**{**base, "profile_shapes": reordered}) == key


# -- calibration cache ------------------------------------------------------------------------------------
def test_calibration_cache_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    names = ["input", "/stem/conv/Conv_output_0", "blocks.0/attn:qkv", "logits"]
    ranges = {n: (float(-rng.uniform(0, 10)), float(rng.uniform(0, 10))) for n in names}
    ranges["all_zero"] = (0.0, 0.0)
    scales = trt_cache.scales_from_ranges(ranges)
    for name, (low, high) in ranges.items():
        expected = max(abs(low), abs(high)) / 127 if name != "all_zero" else 1 / 127
        assert scales[name] == pytest.approx(expected, rel=1e-12)
    path = trt_cache.write_calibration_cache(tmp_path / "calib" / "classifier.cache", scales)
    text = path.read_text()
    assert text.splitlines()[0] == "TRT-8502-EntropyCalibration2"
    assert all(": " in line for line in text.splitlines()[1:])
    header, back = trt_cache.read_calibration_cache(path)
    assert header == "TRT-8502-EntropyCalibration2"
    assert list(back) == list(scales)  # names survive, colons included, in order
    for name, scale in scales.items():
        # The cache stores float32: the read-back scale is the float32 rounding of the written one.
        assert back[name] == float(np.float32(scale))
    assert not list(tmp_path.glob("calib/.*.tmp"))  # atomic writer left nothing behind


def test_calibration_cache_format_details():
    assert trt_cache.float_to_hex(1 / 127) == "3c010204"
    assert trt_cache.float_to_hex(1.0) == "3f800000"
    assert trt_cache.hex_to_float("3f800000") == 1.0
    assert trt_cache.header("8.5.1") == "TRT-8501-EntropyCalibration2"
    assert trt_cache.header("10.3.0") == "TRT-100300-EntropyCalibration2"
    # Known TensorRT-written line (scale 0.0078125 = 2**-7 is 0x3c000000); small values are not zero-padded.
    header, scales = trt_cache.parse_cache("TRT-8502-EntropyCalibration2\ninput: 3c000000\ntiny: 1\n")
    assert scales["input"] == 2 ** -7 and scales["tiny"] == struct.unpack("<f", struct.pack("<I", 1))[0]
    with pytest.raises(trt_cache.CalibrationCacheError, match="expected a header like 'TRT-8502-EntropyCalibration2'"):
        trt_cache.parse_cache("input: 3c000000\n")
    with pytest.raises(trt_cache.CalibrationCacheError, match="line 2 'input 3c000000' is not '<tensor>: <float32 hex>'"):
        trt_cache.parse_cache("TRT-8502-EntropyCalibration2\ninput 3c000000\n")
    with pytest.raises(InputError, match="non-finite calibration range"):
        trt_cache.scales_from_ranges({"x": (0.0, math.inf)})


def test_calibration_cache_from_onnx_runtime_ranges(tmp_path):
    """Scales come from ONNX Runtime's calibrator: for minmax they are the data's absmax / 127."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    weight = np.array([[1.0, -2.0, 0.5], [0.25, 1.5, -1.0]], np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["mm"]), helper.make_node("Relu", ["mm"], ["output"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor("w", TensorProto.FLOAT, weight.shape, weight.ravel())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "tiny.onnx"
    onnx.save(model, str(path))
    rng = np.random.default_rng(1)
    batches = [{"input": rng.normal(size=(4, 2)).astype(np.float32) * 3} for _ in range(3)]
    scales = trt_cache.calibration_cache_from_onnx(path, batches, tmp_path / "tiny.cache", method="minmax")
    data = np.concatenate([b["input"] for b in batches])
    mm = data @ weight
    assert scales["input"] == pytest.approx(np.abs(data).max() / 127, rel=1e-6)
    assert scales["mm"] == pytest.approx(np.abs(mm).max() / 127, rel=1e-6)
    assert scales["output"] == pytest.approx(max(np.maximum(mm, 0).max(), 0) / 127, rel=1e-6)
    _, back = trt_cache.read_calibration_cache(tmp_path / "tiny.cache")
    assert back["mm"] == float(np.float32(scales["mm"]))


# -- planning helpers -----------------------------------------------------------------------------------
def test_memory_limits():
    with pytest.raises(InputError, match="'lots' is not understood"):
        trt_export.memory_limits("lots", None)
    assert trt_export.memory_limits("3.5G", None)[1] == int(3.5 * 2**30) // 2  # G = GiB, as load() reads it
    assert trt_export.memory_limits(None, None) == (1 << 30, None)
    assert trt_export.memory_limits("2GiB", None) == (512 * 2**20, 2**30)
    assert trt_export.memory_limits("3.5GiB", "256MiB") == (256 * 2**20, int(3.5 * 2**30) // 2)
    assert trt_export.memory_limits("64MiB", None)[0] == 32 * 2**20  # floor
    with pytest.raises(InputError, match="does not fit the memory budget"):
        trt_export.memory_limits("1GiB", "2GiB")


def test_stage_profiles_and_timing_cache_name(tmp_path, tiny_bundle):
    import dataclasses

    from edgederm.runtime.bundle import DEFAULT_TILE_BATCH, Stage, TensorSpec, Tiling, read_manifest

    out = (TensorSpec("logits", ("batch", 3)),)
    stage = Stage("classifier", (TensorSpec("image", ("batch", 3, 224, 224), source="dermoscopy"),), out, {})
    assert trt_export.stage_profiles(stage, 6) == {
        "image": {"min": [1, 3, 224, 224], "opt": [6, 3, 224, 224], "max": [6, 3, 224, 224]}}
    with pytest.raises(Exception, match="every dimension but the batch to be static"):
        trt_export.stage_profiles(Stage("s", (TensorSpec("x", ("batch", 3, "h", 224)),), out, {}), 4)
    manifest = read_manifest(tiny_bundle)
    classifier = manifest.stages[0]
    assert trt_export.planned_batch(dataclasses.replace(manifest, tiling=Tiling(batch_size=6)), classifier) == \
        (6, "bundle tiling.batch_size")
    assert trt_export.planned_batch(manifest, classifier)[0] == DEFAULT_TILE_BATCH
    a = trt_export.timing_cache_path(tmp_path, ORIN)
    assert a.parent == tmp_path and "trt8.5.2.2" in a.name and "orin" in a.name and "sm8.7x8" in a.name
    assert trt_export.timing_cache_path(tmp_path, DeviceInfo("Orin", "8.7", 8, "10.3.0")) != a


# -- missing TensorRT ---------------------------------------------------------------------------------------
def test_type_stubs_alone_do_not_count_as_tensorrt(tmp_path, monkeypatch):
    """tensorrt-stubs installs tensorrt/*.pyi, which imports as an empty namespace package."""
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "__init__.pyi").write_text("__version__: str\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = sys.modules.pop("tensorrt", None)
    try:
        with pytest.raises(MissingDependencyError, match="not the TensorRT Python package"):
            import_tensorrt()
        assert tensorrt_available() is False
        with pytest.raises(MissingDependencyError, match="TensorRT is not installed"):
            trt_export.require_tensorrt()
    finally:  # leave no fake module behind for later tests
        sys.modules.pop("tensorrt", None)
        if saved is not None:
            sys.modules["tensorrt"] = saved


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here; this test is for machines without it")
def test_build_without_tensorrt_gives_install_hint(mini_bundle, capsys):
    from edgederm.cli import main

    bundle_copy = mini_bundle
    before = (bundle_copy / "manifest.json").read_text()
    code = main(["build", str(bundle_copy), "--precision", "fp16"])
    err = capsys.readouterr().err
    assert code == 2
    assert "edgederm build: error: TensorRT is not installed" in err
    assert "install TensorRT 8.5+ or 10.x" in err and "pip install 'edgederm[tensorrt]'" in err
    assert (bundle_copy / "manifest.json").read_text() == before  # nothing recorded
    assert not (bundle_copy / "engines").exists() or not any((bundle_copy / "engines").iterdir())
    # Bad options are refused before TensorRT is looked for, with what was expected.
    assert main(["build", str(bundle_copy), "--workspace", "lots"]) == 2
    assert "'lots' is not understood" in capsys.readouterr().err
    assert main(["build", str(bundle_copy), "--precision", "int8"]) == 2
    assert "has no int8 (QDQ) graph" in capsys.readouterr().err


def _fake_engine(bundle, target):
    """Put an engine entry (and a file, so hashes verify) into a bundle's manifest."""
    from edgederm.runtime.bundle import sha256_file, write_json_atomic

    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "engines").mkdir(exist_ok=True)
    entries = []
    for stage in manifest["stages"]:
        name = f"engines/{stage['name']}.int8.000000000000.engine"
        (bundle / name).write_bytes(b"not a real plan: must never be deserialised here")
        entries.append({"stage": stage["name"], "precision": "int8", "file": name, "sha256": sha256_file(bundle / name),
                        "target": target, "profiles": {}})
        manifest["files"][name] = {"sha256": entries[-1]["sha256"], "bytes": (bundle / name).stat().st_size}
    manifest["engines"] = entries
    write_json_atomic(bundle / "manifest.json", manifest)
    return manifest


def test_runtime_falls_back_to_onnxruntime_and_records_why(mini_bundle):
    from edgederm.data.synthetic import generate_case
    from edgederm.runtime import load
    from edgederm.runtime.bundle import read_manifest

    bundle_copy = mini_bundle

    target = {"gpu_name": "Orin", "compute_capability": "8.7", "sm_count": 8, "tensorrt_version": "8.5.2.2"}
    _fake_engine(bundle_copy, target)
    # Target check with a device that differs: reason names the mismatch, nothing is deserialised.
    manifest = read_manifest(bundle_copy)
    chosen, reason = select_engines([s.name for s in manifest.stages], manifest.engines,
                                    DeviceInfo("NVIDIA T4", "7.5", 40, "10.3.0"))
    assert chosen is None and "built for GPU 'Orin', this device is 'NVIDIA T4'" in reason
    image = generate_case(seed=5, size=160).image
    reference = load(bundle_copy, backend="onnxruntime-cpu").predict(image)
    for backend in ("tensorrt", "auto"):
        model = load(bundle_copy, backend=backend)
        assert model.backend_name.startswith("onnxruntime")
        notes = " ".join(model.notes)
        if tensorrt_available():
            assert "TensorRT engines not used" in notes
        else:
            assert "TensorRT engines not used" in notes and "not installed" in notes, notes
        result = model.predict(image)
        assert result.backend.startswith("onnxruntime")
        assert any("TensorRT engines not used" in n for n in result.notes)
        assert result.label == reference.label
        assert result.probabilities == pytest.approx(reference.probabilities, abs=1e-6)


# -- on a machine with TensorRT and a GPU ---------------------------------------------------------------
def needs_trt_gpu(test):
    """Marks trt + gpu (+ slow) and skips, saying why, where TensorRT or the GPU is missing."""
    for mark in (pytest.mark.trt, pytest.mark.gpu, pytest.mark.slow,
                 pytest.mark.skipif(not _has_gpu_tensorrt(), reason=NO_TRT_REASON)):
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def built_bundle(tiny_bundle, tmp_path_factory):
    if not _has_gpu_tensorrt():
        pytest.skip(NO_TRT_REASON)
    bundle = tmp_path_factory.mktemp("trt") / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    cache_dir = tmp_path_factory.mktemp("timing")
    entries = {p: trt_export.build_engines(bundle, precision=p, timing_cache=cache_dir, memory_budget="3.5GiB",
                                           say=lambda m: None) for p in ("fp16", "int8")}
    return bundle, entries, cache_dir


def _eval_feed(bundle, n=16):
    from edgederm.data.synthetic import generate_case
    from edgederm.runtime import preprocess as pp
    from edgederm.runtime.bundle import read_manifest

    manifest = read_manifest(bundle)
    config = manifest.preprocess
    x = np.stack([pp.preprocess(generate_case(seed=100 + i, size=160).image, config) for i in range(n)]).astype(np.float32)
    return manifest, x


@needs_trt_gpu
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engines_match_onnxruntime(built_bundle, precision, record_property):
    from edgederm.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from edgederm.runtime.probabilities import softmax

    bundle, entries, cache_dir = built_bundle
    manifest, x = _eval_feed(bundle)
    device = query_device()
    for stage in manifest.stages:
        entry, reason = select_engine(manifest.engines, device, stage.name, precision)
        assert entry is not None, reason
        assert entry["target"]["gpu_name"] == device.gpu_name
        assert entry["target"]["tensorrt_version"] == device.tensorrt_version
        assert entry["profiles"][stage.inputs[0].name]["min"][0] == 1
        assert entry["cache_key"] == engine_cache_key(entry["onnx"]["sha256"], device.tensorrt_version, device.gpu_name,
                                                      device.sm_count, precision, entry["profiles"],
                                                      device.compute_capability)
        engine = trt_backend.TensorRTBackend(bundle / entry["file"], entry)
        # ORT reference: fp32 graph for the fp16 engine, the same QDQ graph for the int8 engine.
        reference = OnnxRuntimeBackend(manifest.graph_path(stage, "fp32" if precision == "fp16" else "int8"))
        name_in, name_out = stage.inputs[0].name, stage.outputs[0].name
        got = engine.run({name_in: x})[name_out]  # 16 > profile max: split into batches inside
        want = reference.run({name_in: x})[name_out]
        p_got, p_want = softmax(got), softmax(want)
        agreement = float((p_got.argmax(1) == p_want.argmax(1)).mean())
        max_dp = float(np.abs(p_got - p_want).max())
        record_property(f"figure:{stage.name}_{precision}_trt_vs_ort_agreement", agreement)
        record_property(f"figure:{stage.name}_{precision}_trt_vs_ort_max_dp", round(max_dp, 4))
        assert max_dp <= (0.02 if precision == "fp16" else 0.1)
        assert agreement >= (1.0 if precision == "fp16" else 0.9)
        assert engine.memory_bytes() and engine.memory_bytes() > 0
        engine.close()
    assert list(cache_dir.glob("timing-trt*.cache")), "timing cache was not persisted"


@needs_trt_gpu
def test_runtime_uses_matching_engine(built_bundle):
    from edgederm.data.synthetic import generate_case
    from edgederm.runtime import load

    bundle, _, _ = built_bundle
    image = generate_case(seed=9, size=160).image
    model = load(bundle, backend="tensorrt")
    assert model.backend_name == "tensorrt", model.notes
    result = model.predict(image)
    reference = load(bundle, backend="onnxruntime-cpu", precision=model.precision).predict(image)
    assert result.backend == "tensorrt"
    assert result.probabilities == pytest.approx(reference.probabilities, abs=0.1)


@needs_trt_gpu
def test_rebuild_supersedes_engine_and_keeps_manifest_valid(built_bundle):
    from edgederm.runtime.bundle import read_manifest

    bundle, entries, cache_dir = built_bundle
    trt_export.build_engines(bundle, precision="fp16", timing_cache=cache_dir, memory_budget="3.5GiB", say=lambda m: None)
    manifest = read_manifest(bundle)  # verifies every hash, engines included
    fp16 = [e for e in manifest.engines if e["precision"] == "fp16"]
    assert len(fp16) == len(manifest.stages)
    assert sorted(p.name for p in (bundle / "engines").iterdir() if not p.name.startswith(".")) == sorted(
        e["file"].split("/")[-1] for e in manifest.engines)


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.slow
def test_torch_tensorrt_compile_matches_eager(tmp_path, torch):
    pytest.importorskip("torch_tensorrt", reason="torch-TensorRT is not installed (cannot be on this project's CI machines)")
    if not torch.cuda.is_available():
        pytest.skip(NO_TRT_REASON)
    from edgederm.export.torch_tensorrt import compile_torch_tensorrt
    from edgederm.models import create_model

    torch.manual_seed(0)
    model = create_model("hifuse_tiny", class_names=["nevus", "melanoma", "vascular"]).eval()
    paths = compile_torch_tensorrt(model, tmp_path, precision="fp16", max_batch=4, say=lambda m: None)
    for stage in model.cuda().export_stages():
        loaded = torch.export.load(str(paths[stage.name])).module()
        inputs = [t.cuda() for t in stage.inputs.values()]
        with torch.no_grad():
            want = stage.module(*inputs)
            got = loaded(*inputs)
        want = want[0] if isinstance(want, (tuple, list)) else want
        got = got[0] if isinstance(got, (tuple, list)) else got
        assert torch.allclose(got.float(), want.float(), atol=5e-2, rtol=5e-2)


def test_engine_builder_and_runner_import_without_torch():
    """`edgederm build` runs on the device, where torch may be absent (and would cost memory)."""
    import subprocess
    import textwrap

    script = textwrap.dedent("""
        import builtins, sys
        real_import = builtins.__import__
        def guarded(name, *args, **kwargs):
            if name == "torch" or name.startswith("torch.") or name == "tensorrt":
                raise ImportError(f"{name} is blocked in this test")
            return real_import(name, *args, **kwargs)
        builtins.__import__ = guarded
        import edgederm.export.tensorrt, edgederm.runtime.backends.tensorrt
        from edgederm.export.tensorrt import build_engines
        assert "torch" not in sys.modules and "tensorrt" not in sys.modules
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr

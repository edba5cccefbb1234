"""INT8 that knows the CPU: quantize records the CPU and the form it chose for the CPU the
graphs are for; load re-checks a graph whose arithmetic differs on this CPU; and, in
numpy, why the chosen form is needed: ONNX Runtime's u8 x s8 kernels on x86 without VNNI
add pairs of products in saturating 16-bit lanes (vpmaddubsw)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from edgederm.calibration import cpu_form, quantize_bundle  # noqa: E402
from edgederm.calibration.graphs import QuantSettings, quantize_dynamic_graph, quantize_graph  # noqa: E402
from edgederm.runtime import cpu_check, load  # noqa: E402
from edgederm.runtime.bundle import sha256_file  # noqa: E402
from edgederm.runtime.cpu import SATURATION_FREE_WEIGHT, parse_cpuinfo  # noqa: E402
from edgederm.runtime.errors import CpuMismatchError  # noqa: E402
from edgederm.runtime.goldens import add_goldens  # noqa: E402
from edgederm.runtime.selftest import synthetic_lesion  # noqa: E402

RECORDED = Path(__file__).resolve().parents[1] / "recorded" / "cpuinfo"
VNNI = parse_cpuinfo((RECORDED / "x86-zen5-avx512-vnni.txt").read_text())
AVX2 = parse_cpuinfo((RECORDED / "x86-haswell-avx2.txt").read_text())
INT16_MAX = 32767


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    cv2 = pytest.importorskip("cv2")
    folder = tmp_path_factory.mktemp("calib")
    for i in range(32):
        cv2.imwrite(str(folder / f"{i}.png"), synthetic_lesion(40, 40, i))
    return folder


def _quantized(root: Path, write_mini_bundle, calib: Path, for_cpu: str | None, goldens: bool = True) -> Path:
    """The mini classifier quantized (int8, int8_dynamic) on a recorded VNNI CPU for ``for_cpu``."""
    bundle = write_mini_bundle(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_form, "this_cpu", lambda: VNNI)
        for precision in ("int8", "int8_dynamic"):
            quantize_bundle(bundle, calib, precision=precision, target_agreement=None, for_cpu=for_cpu,
                            say=lambda m: None)
    if goldens:
        add_goldens(bundle)
    return bundle


@pytest.fixture(scope="module")
def for_vnni(tmp_path_factory, write_mini_bundle, calib):
    """Full 8-bit weights, quantized and measured on a VNNI CPU: other numbers on AVX2."""
    return _quantized(tmp_path_factory.mktemp("vnni") / "bundle", write_mini_bundle, calib, "vnni")


def _int8_weights(graph_path: Path) -> list[np.ndarray]:
    """The int8 weight initializers the graph dequantizes (QDQ) or multiplies (dynamic)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph_path))
    return [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]


def _graph(bundle: Path, precision: str) -> dict:
    return json.loads((bundle / "manifest.json").read_text())["stages"][0]["graphs"][precision]


# --------------------------------------------------------------------------- quantize
def test_quantize_records_the_cpu_and_the_class_it_was_made_for(for_vnni):
    for precision in ("int8", "int8_dynamic"):
        record = _graph(for_vnni, precision)["cpu"]
        assert record["made_on"] == {"class": "vnni", "arch": "x86_64", "features": list(VNNI.int8_features)}
        assert (record["made_for"], record["saturation_free"]) == ("vnni", False)
    report = json.loads((for_vnni / "manifest.json").read_text())["calibration"]["int8"]
    assert report["cpu"]["form"] == "u8 activations, 8-bit weights" and report["reduce_range"] is False
    assert "32 bits" in report["cpu"]["reason"]
    weights = _int8_weights(for_vnni / _graph(for_vnni, "int8")["file"])
    assert weights and max(int(np.abs(w).max()) for w in weights) == 127  # symmetric per channel: full 8 bits


def test_for_cpu_avx2_makes_7_bit_weights_and_says_why(tmp_path, write_mini_bundle, calib):
    lines: list[str] = []
    bundle = write_mini_bundle(tmp_path / "bundle")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_form, "this_cpu", lambda: VNNI)
        report = quantize_bundle(bundle, calib, precision="int8", target_agreement=None, for_cpu="avx2",
                                 say=lines.append)
    weights = _int8_weights(bundle / _graph(bundle, "int8")["file"])
    assert weights and max(int(np.abs(w).max()) for w in weights) == SATURATION_FREE_WEIGHT  # 2x255x64 <= 32767
    assert _graph(bundle, "int8")["cpu"] == {
        "made_on": VNNI.to_record(), "made_for": "avx2", "saturation_free": True,
        "form": "u8 activations, 7-bit weights (reduce_range)"}
    assert report["reduce_range"] is True
    printed = "\n".join(lines)
    assert "int8 form                  u8 activations, 7-bit weights (reduce_range) for avx2 CPUs" in printed
    assert "saturating 16-bit lanes" in printed and "quantized and measured on  vnni (x86_64:" in printed


def test_quantize_for_this_cpu_by_default_and_refuses_unknown_classes(tmp_path, write_mini_bundle, calib):
    from edgederm.runtime.errors import InputError

    bundle = write_mini_bundle(tmp_path / "bundle")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_form, "this_cpu", lambda: AVX2)
        quantize_bundle(bundle, calib, precision="int8", target_agreement=None, say=lambda m: None)
    assert _graph(bundle, "int8")["cpu"]["made_for"] == "avx2" and _graph(bundle, "int8")["cpu"]["saturation_free"]
    with pytest.raises(InputError, match=r"--for-cpu 'avx3' is not an int8 kernel class; choose one of amx, vnni"):
        quantize_bundle(bundle, calib, precision="int8", for_cpu="avx3", say=lambda m: None)


def test_dynamic_int8_for_avx2_has_7_bit_weights(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(1).normal(size=(16, 8)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "m",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "fp32.onnx"))
    for reduce_range, bound in ((False, 127), (True, SATURATION_FREE_WEIGHT)):
        info = quantize_dynamic_graph(tmp_path / "fp32.onnx", tmp_path / f"q{reduce_range}.onnx", fuse_gelu=False,
                                      reduce_range=reduce_range)
        assert info["reduce_range"] is reduce_range
        assert max(int(np.abs(w).max()) for w in _int8_weights(tmp_path / f"q{reduce_range}.onnx")) == bound


# --------------------------------------------------------------------------- load
class _Spy:
    """Counts the golden self-tests the re-check runs."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        real = cpu_check.check_goldens

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(cpu_check, "check_goldens", counted)


def test_same_arithmetic_needs_no_recheck(for_vnni, monkeypatch):
    spy = _Spy(monkeypatch)
    for running in (VNNI, parse_cpuinfo((RECORDED / "x86-sapphire-rapids-amx.txt").read_text())):
        monkeypatch.setattr(cpu_check, "this_cpu", lambda running=running: running)
        model = load(for_vnni, precision="int8", cache=False)
        assert model.notes == [] and spy.calls == 0


def test_other_arithmetic_runs_the_selftest_once_per_bundle_and_cpu(for_vnni, monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEDERM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_check, "this_cpu", lambda: AVX2)
    spy = _Spy(monkeypatch)
    first = load(for_vnni, precision="int8")
    assert spy.calls == 1
    assert any("quantized on a vnni CPU for vnni; this CPU is avx2" in n and "golden self-test passed here" in n
               and "checked now" in n for n in first.notes)
    again = load(for_vnni, precision="int8")
    assert spy.calls == 1  # the cached verdict
    assert any("checked on this CPU earlier" in n for n in again.notes)
    assert again.predict(dermoscopy=synthetic_lesion(40, 40, 3)).notes == again.notes
    load(for_vnni, precision="int8", cache=False)
    assert spy.calls == 2  # no cache: checked again


def _scale_last_weight(bundle: Path, precision: str = "int8") -> None:
    """The last layer's weight x4 (an int8 weight: its scale), hashes rewritten: graph arithmetic
    that changed, as saturation would change it."""
    import onnx
    from onnx import numpy_helper

    entry = _graph(bundle, precision)
    path = bundle / entry["file"]
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    last = [n for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")][-1]
    dq = producers.get(last.input[1])
    tensor = inits[dq.input[1]] if dq is not None and dq.op_type == "DequantizeLinear" else inits[last.input[1]]
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 4.0, tensor.name))
    onnx.save(model, str(path))
    manifest = json.loads((bundle / "manifest.json").read_text())
    digest = sha256_file(path)
    manifest["files"][entry["file"]]["sha256"] = digest
    manifest["stages"][0]["graphs"][precision]["sha256"] = digest
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_a_graph_that_fails_the_recheck_is_refused_or_left_out(for_vnni, monkeypatch, tmp_path):
    bundle = tmp_path / "scaled"
    shutil.copytree(for_vnni, bundle)
    _scale_last_weight(bundle)
    monkeypatch.setattr(cpu_check, "this_cpu", lambda: VNNI)
    assert load(bundle, precision="int8", cache=False).notes == []  # where it was measured nothing is re-checked
    monkeypatch.setattr(cpu_check, "this_cpu", lambda: AVX2)
    with pytest.raises(CpuMismatchError, match=r"quantized on a vnni CPU for vnni; this CPU is avx2.*golden self-test "
                                               r"FAILED here.*Fix: re-quantize for this CPU \(`edgederm quantize .* "
                                               r"--precision int8 --for-cpu avx2`"):
        load(bundle, precision="int8", cache=False)
    model = load(bundle, precision="auto", cache=False)
    assert model.precision != "int8"
    assert any(n.startswith("precision auto: int8 not used:") and "FAILED" in n for n in model.notes)
    assert any("int8_dynamic graphs" in n and "passed" in n for n in model.notes)  # re-checked and kept
    assert model.predict(dermoscopy=synthetic_lesion(40, 40, 1)).precision == model.precision


def test_every_candidate_failing_falls_back_to_fp32(for_vnni, monkeypatch, tmp_path):
    bundle = tmp_path / "scaled"
    shutil.copytree(for_vnni, bundle)
    _scale_last_weight(bundle, "int8")
    _scale_last_weight(bundle, "int8_dynamic")
    monkeypatch.setattr(cpu_check, "this_cpu", lambda: AVX2)
    model = load(bundle, precision="auto", cache=False)
    assert model.precision == "fp32"
    assert sum(n.startswith("precision auto: ") and "not used" in n for n in model.notes) == 2


def test_a_saturation_free_graph_is_trusted_everywhere(tmp_path, write_mini_bundle, calib, monkeypatch):
    bundle = _quantized(tmp_path / "bundle", write_mini_bundle, calib, "avx2")
    _scale_last_weight(bundle)  # not re-checked: its arithmetic is the same on every CPU
    spy = _Spy(monkeypatch)
    for running in (AVX2, VNNI):
        monkeypatch.setattr(cpu_check, "this_cpu", lambda running=running: running)
        assert load(bundle, precision="int8", cache=False).notes == []
    assert spy.calls == 0


def test_without_goldens_the_load_says_unchecked(tmp_path, write_mini_bundle, calib, monkeypatch):
    bundle = _quantized(tmp_path / "bundle", write_mini_bundle, calib, "vnni", goldens=False)
    monkeypatch.setattr(cpu_check, "this_cpu", lambda: AVX2)
    model = load(bundle, precision="int8", cache=False)
    assert any("run UNCHECKED on this CPU class" in n and "edgederm selftest add" in n for n in model.notes)


def test_an_old_bundle_without_the_record_loads_unchanged(for_vnni, monkeypatch, tmp_path):
    bundle = tmp_path / "old"
    shutil.copytree(for_vnni, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    for graph in manifest["stages"][0]["graphs"].values():
        graph.pop("cpu", None)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(cpu_check, "this_cpu", lambda: AVX2)
    spy = _Spy(monkeypatch)
    for precision in ("int8", "int8_dynamic"):
        assert load(bundle, precision=precision, cache=False).notes == []
    assert spy.calls == 0


# --------------------------------------------------------------------------- why: the 16-bit saturation
def _emulated_u8s8(a_u8: np.ndarray, w_s8: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """``a_u8 @ w_s8`` as AVX2's u8 x s8 kernel computes it (vpmaddubsw: each pair of adjacent
    products summed with int16 saturation; vpmaddwd: pairs widened to int32), the exact int32
    product, and the number of saturated pairs."""
    a = a_u8.astype(np.int32)
    w = w_s8.astype(np.int32)
    k = a.shape[1] - a.shape[1] % 2
    pairs = a[:, 0:k:2, None] * w[None, 0:k:2, :] + a[:, 1:k:2, None] * w[None, 1:k:2, :]
    clipped = np.clip(pairs, -INT16_MAX - 1, INT16_MAX)
    tail = a[:, k:] @ w[k:] if k < a.shape[1] else 0
    return clipped.sum(axis=1) + tail, a @ w, int((clipped != pairs).sum())


def _qdq_matmul_parts(path: Path) -> tuple[float, int, np.ndarray, np.ndarray]:
    """Activation scale and zero point, the int8 weight and its per-column scale of a QDQ MatMul."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    dq_w = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and inits[n.input[0]].dtype == np.int8)
    return float(inits[q.input[1]]), int(inits[q.input[2]]), inits[dq_w.input[0]], inits[dq_w.input[1]]


def test_why_avx2_needs_7_bit_weights(tmp_path, record_property):
    """A real ORT-quantized layer: with full 8-bit weights an in-range input saturates AVX2's
    16-bit pairs and changes the output; with the form chosen for avx2 nothing can saturate,
    for any u8 input, and ONNX Runtime here computes exactly what the emulation says."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    k, n = 64, 32
    weight = (rng.normal(size=(k, n)) / np.sqrt(k)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "layer",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "fp32.onnx"))
    feeds = [{"x": np.abs(rng.normal(size=(16, k))).astype(np.float32)} for _ in range(4)]  # post-ReLU activations
    top = max(float(f["x"].max()) for f in feeds)
    x = np.full((1, k), top, np.float32)  # every value at the calibrated maximum: inside the range
    saturated = {}
    for reduce_range in (False, True):
        path = tmp_path / f"int8.{reduce_range}.onnx"
        quantize_graph(tmp_path / "fp32.onnx", path, feeds, settings=QuantSettings(reduce_range=reduce_range))
        scale, zero, w_q, w_scale = _qdq_matmul_parts(path)
        a_u8 = np.clip(np.round(x / scale) + zero, 0, 255).astype(np.uint8)
        assert a_u8.max() == 255
        emulated, exact, saturated[reduce_range] = _emulated_u8s8(a_u8, w_q)
        # The exact int32 arithmetic (VNNI, AMX, ARM) is what ONNX Runtime computes on a CPU that does not saturate.
        expected = (exact - zero * w_q.astype(np.int64).sum(axis=0)) * scale * w_scale
        if reduce_range or cpu_check.this_cpu().kernel_class not in ("avx2", "sse"):
            got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
        if reduce_range:
            assert int(np.abs(w_q).max()) <= SATURATION_FREE_WEIGHT
            assert 2 * 255 * int(np.abs(w_q).max()) <= INT16_MAX  # no u8 input can saturate a pair
            assert saturated[True] == 0 and np.array_equal(emulated, exact)
        else:
            assert saturated[False] > 0 and not np.array_equal(emulated, exact)
            changed = (exact - emulated) * scale * w_scale
            rows = np.concatenate([f["x"] for f in feeds])
            natural = _emulated_u8s8(np.clip(np.round(rows / scale) + zero, 0, 255).astype(np.uint8), w_q)[2]
            record_property("figure:avx2 u8s8 8-bit weights: saturated pairs / output change",
                            f"{saturated[False]} of {(k // 2) * n} at the calibrated maximum, max change "
                            f"{float(np.abs(changed).max()):.3g} (output max {float(np.abs(expected).max()):.3g}); "
                            f"{natural} of {(k // 2) * n * len(rows)} on the calibration rows")


def test_cli_for_cpu(tmp_path, write_mini_bundle, calib, capsys):
    from edgederm.cli import main as cli_main

    bundle = write_mini_bundle(tmp_path / "bundle")
    assert cli_main(["quantize", str(bundle), "--calib", str(calib), "--for-cpu", "avx2", "--no-fallback",
                     "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cpu"]["made_for"] == "avx2" and report["cpu"]["saturation_free"] is True
    assert max(int(np.abs(w).max()) for w in _int8_weights(bundle / _graph(bundle, "int8")["file"])) == 64
    with pytest.raises(SystemExit):
        cli_main(["quantize", str(bundle), "--calib", str(calib), "--for-cpu", "avx3"])
    assert "invalid choice: 'avx3'" in capsys.readouterr().err

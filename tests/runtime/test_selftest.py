"""Golden self-test: goldens from the fp32 graph, run per precision, a perturbed weight refused with the stage named."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgederm.cli import main as cli_main
from edgederm.runtime import load
from edgederm.runtime.bundle import sha256_file
from edgederm.runtime.errors import BundleIntegrityError, SelfTestError
from edgederm.runtime.goldens import add_goldens, selftest_bundle
from edgederm.runtime.selftest import TOLERANCE_FLOOR, run_selftest, synthetic_lesion


@pytest.fixture(scope="module")
def quantized_mini(tmp_path_factory, write_mini_bundle):
    """The hand-made mini classifier with fp32, int8, int8_dynamic and fp16 graphs and goldens."""
    cv2 = pytest.importorskip("cv2")
    pytest.importorskip("onnx")
    from edgederm.calibration import quantize_bundle

    root = tmp_path_factory.mktemp("selftest")
    calib = root / "calib"
    calib.mkdir()
    for i in range(32):
        cv2.imwrite(str(calib / f"{i}.png"), synthetic_lesion(40, 40, i))
    bundle = write_mini_bundle(root / "bundle")
    for precision in ("int8", "int8_dynamic", "fp16"):
        quantize_bundle(bundle, calib, precision=precision, target_agreement=None, say=lambda m: None)
    add_goldens(bundle)
    return bundle


def test_goldens_are_deterministic_and_listed_in_the_file_table(quantized_mini, tmp_path):
    manifest = json.loads((quantized_mini / "manifest.json").read_text())
    section = manifest["selftest"]["stages"]["classifier"]
    assert section["file"] in manifest["files"]
    assert set(section["tolerance"]) == {"fp32", "int8", "int8_dynamic", "fp16"}
    assert section["tolerance"]["fp32"] == pytest.approx(TOLERANCE_FLOOR["fp32"] * max(1.0, _ref_scale(quantized_mini)))
    copy = tmp_path / "again"
    shutil.copytree(quantized_mini, copy)
    add_goldens(copy)
    with np.load(quantized_mini / section["file"]) as a, np.load(copy / section["file"]) as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])
    assert np.array_equal(synthetic_lesion(33, 47), synthetic_lesion(33, 47))


def _ref_scale(bundle) -> float:
    with np.load(bundle / "selftest" / "classifier.npz") as stored:
        return float(np.max(np.abs(stored["output.logits"])))


@pytest.mark.parametrize("precision", ["fp32", "int8", "int8_dynamic", "fp16"])
def test_selftest_passes_on_every_precision(quantized_mini, precision):
    rows = run_selftest(load(quantized_mini, precision=precision, cache=False))
    assert [(r["stage"], r["precision"], r["passed"]) for r in rows] == [("classifier", precision, True)]
    assert rows[0]["max_abs_diff"] <= rows[0]["tolerance"]
    if precision == "fp32":
        assert rows[0]["max_abs_diff"] < 1e-5  # the same graph on the same backend


def test_perturbed_weight_is_refused_naming_the_stage(quantized_mini, tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    bundle = tmp_path / "perturbed"
    shutil.copytree(quantized_mini, bundle)
    graph_path = bundle / "classifier.fp32.onnx"
    graph = onnx.load(str(graph_path))
    weight = next(t for t in graph.graph.initializer if t.name == "dense_w")
    values = numpy_helper.to_array(weight).copy()
    values[0, 0] *= 3.0  # one weight scaled
    weight.CopyFrom(numpy_helper.from_array(values, "dense_w"))
    onnx.save(graph, str(graph_path))
    manifest = json.loads((bundle / "manifest.json").read_text())  # a build that wrote its own (wrong) graph
    manifest["files"]["classifier.fp32.onnx"]["sha256"] = manifest["stages"][0]["graphs"]["fp32"]["sha256"] = \
        sha256_file(graph_path)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SelfTestError, match=r"stage 'classifier' fp32 output differs from the golden by [0-9.e-]+ "
                                            r"\(tolerance [0-9.e-]+\)"):
        load(bundle, precision="fp32", cache=False, selftest=True)
    # The other precisions' graphs are untouched and still pass.
    assert all(r["passed"] for r in selftest_bundle(bundle, precisions=["int8"]))


def test_bundle_without_goldens_says_how_to_add_them(mini_bundle):
    with pytest.raises(SelfTestError, match=r"no golden self-test; add one with `edgederm selftest add"):
        load(mini_bundle, cache=False, selftest=True)


def test_goldens_outside_the_file_table_are_refused_when_read(quantized_mini, tmp_path):
    bundle = tmp_path / "unlisted"
    shutil.copytree(quantized_mini, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["files"]["selftest/classifier.npz"]  # goldens no hash covers
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleIntegrityError, match=r"goldens 'selftest/classifier.npz' of stage 'classifier' are not "
                                                   r"in the manifest's file table"):
        load(bundle, cache=False, selftest=True)


def test_cli_selftest_add_and_run(mini_bundle, capsys):
    assert cli_main(["selftest", "add", str(mini_bundle)]) == 0
    assert cli_main(["selftest", str(mini_bundle), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert [(r["stage"], r["precision"], r["passed"]) for r in rows] == [("classifier", "fp32", True)]
    with np.load(mini_bundle / "selftest" / "classifier.npz") as stored:
        data = {k: stored[k] for k in stored.files}
    data["output.logits"] = data["output.logits"] + 1.0
    np.savez(mini_bundle / "selftest" / "classifier.npz", **data)
    capsys.readouterr()
    assert cli_main(["selftest", str(mini_bundle)]) == 2  # the changed goldens fail the bundle's hash check
    assert capsys.readouterr().err.count("\n") == 1


def _perturb_largest_weight(bundle, stage: dict) -> None:
    """Scale one weight of ``stage``'s fp32 graph and rewrite its hashes: a mis-built graph with a correct sha256."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    entry = stage["graphs"]["fp32"]
    path = bundle / entry["file"]
    graph = onnx.load(str(path))
    # The last Conv/MatMul/Gemm weight: nothing after it (a norm, a softmax over a mask) can cancel the change.
    weights = {t.name: t for t in graph.graph.initializer}
    node = [n for n in graph.graph.node if n.op_type in ("Conv", "MatMul", "Gemm") and n.input[1] in weights][-1]
    tensor = weights[node.input[1]]
    values = numpy_helper.to_array(tensor).copy()
    flat = values.reshape(-1)
    flat[int(np.argmax(np.abs(flat)))] *= 4.0
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    onnx.save(graph, str(path))
    manifest = json.loads((bundle / "manifest.json").read_text())
    digest = sha256_file(path)
    manifest["files"][entry["file"]]["sha256"] = digest
    next(s for s in manifest["stages"] if s["name"] == stage["name"])["graphs"]["fp32"]["sha256"] = digest
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cfformer_tiny", "hifuse_tiny", "remixformer_tiny", "sgmcnet_tiny", "transxv2s_tiny"])
def test_zoo_tiny_models_pass_on_every_precision_and_fail_when_perturbed(name, tmp_path, synthetic_data, torch):
    from edgederm.calibration import quantize_bundle
    from edgederm.export import export_bundle
    from edgederm.models import create_model, list_models

    assert name in list_models("*_tiny")
    torch.manual_seed(0)
    bundle = export_bundle(create_model(name), tmp_path / name, verify=False, profile_memory=False)
    for precision in ("int8", "int8_dynamic", "fp16"):
        quantize_bundle(bundle, synthetic_data / "train", precision=precision, target_agreement=None, max_images=32,
                        say=lambda m: None)
    add_goldens(bundle)
    rows = selftest_bundle(bundle, backend="onnxruntime-cpu")
    stages = [s["name"] for s in json.loads((bundle / "manifest.json").read_text())["stages"]]
    assert sorted((r["stage"], r["precision"]) for r in rows) == sorted(
        (s, p) for s in stages for p in ("fp32", "fp16", "int8", "int8_dynamic"))
    assert all(r["passed"] and r["max_abs_diff"] <= r["tolerance"] for r in rows)
    manifest = json.loads((bundle / "manifest.json").read_text())
    target = manifest["stages"][-1]
    _perturb_largest_weight(bundle, target)
    with pytest.raises(SelfTestError, match=rf"stage '{target['name']}' fp32 output differs from the golden"):
        load(bundle, precision="fp32", backend="onnxruntime-cpu", cache=False, selftest=True)

"""`quantize --gate` and the clinical settings refitted per precision.

The bundle is the hand-built lesion-colour classifier of tests/flat_lesions.py with its
quantization defect: one weight of the melanoma row on a feature that is always 0,
nothing in float, but INT8's per-channel weight scale sized for it rounds the row's real
weights away, so plain INT8 loses melanomas and returning that one Gemm to float
restores them. Light skin only (no darkness defect).
"""
from __future__ import annotations

import numpy as np
import pytest

from edgederm.runtime import load
from edgederm.runtime.bundle import read_manifest
from edgederm.runtime.probabilities import softmax

from tests.flat_lesions import CLASSES, SIZE, lesion_colour_classifier, write_flat_dataset

GATE = "sensitivity[melanoma]>=-0.01,auroc>=-0.005,ece<=+0.01"


@pytest.fixture(scope="module")
def gate_setup(tmp_path_factory, write_onnx_bundle):
    """Calibration and labelled eval data, and a bundle whose fp32 temperature was fitted on
    the eval split (as training fits it on its validation split)."""
    from edgederm.data import read_dataset
    from edgederm.metrics import fit_temperature
    from edgederm.runtime.safety import malignant_probability, malignant_threshold

    base = tmp_path_factory.mktemp("gate")
    calib = write_flat_dataset(base / "calib", per_cell=6, seed=5, tones=3)
    evald = write_flat_dataset(base / "eval", per_cell=8, seed=6, tones=3)
    graphs = {outlier: {"fp32": lesion_colour_classifier(outlier=outlier, darkness=0.0)} for outlier in (300.0, 30.0)}
    clinical = {"temperature": 1.0, "review_threshold": 0.6, "review_classes": [], "malignant_classes": ["melanoma"],
                "malignant_threshold": 0.3, "target_sensitivity": 0.95}
    probe = write_onnx_bundle(base / "probe", graphs[300.0], CLASSES, SIZE, clinical)
    model = load(probe, precision="fp32")
    dataset = read_dataset(evald, classes=CLASSES)
    logits = []
    for record in dataset:
        model.predict_file(record.image)
        logits.append(model.last_run["logits"])
    logits = np.stack(logits)
    temperature = fit_temperature(logits, dataset.labels)
    p_mal = malignant_probability(softmax(logits, temperature), CLASSES, ["melanoma"])
    threshold = malignant_threshold(p_mal, dataset.labels == 1)["threshold"]
    clinical.update(temperature=temperature, malignant_threshold=threshold)
    # In float the outlier multiplies 0: every variant has the same fp32 logits, temperature and threshold.
    return calib, evald, lambda root, outlier=300.0: write_onnx_bundle(root, graphs[outlier], CLASSES, SIZE, dict(clinical))


@pytest.mark.slow
def test_gate_fails_with_plain_int8_and_passes_after_the_fallback(gate_setup, tmp_path):
    from edgederm.calibration import quantize_bundle

    calib, evald, make_bundle = gate_setup
    bundle = make_bundle(tmp_path / "bundle")
    report = quantize_bundle(bundle, calib, eval_dir=evald, target_agreement=None, gate=GATE, say=lambda m: None)
    gate = report["gate"]
    before = {row["metric"]: row for row in gate["table_before"]}
    assert not before["sensitivity[melanoma]"]["passed"]  # plain INT8 loses melanomas
    assert gate["reached"] and gate["nodes_kept_float"] == ["classifier/colour_gemm"]
    after = {row["metric"]: row for row in gate["table"]}
    assert all(row["passed"] for row in gate["table"])
    assert after["sensitivity[melanoma]"]["change"] >= -0.01
    # The table's numbers are what `evaluate` measures on the bundle as written.
    from edgederm.evaluate import EvaluateOptions, evaluate

    result = evaluate(bundle, evald, tmp_path / "report", EvaluateOptions(n_boot=0))
    for metric in ("sensitivity[melanoma]", "auroc", "ece"):
        assert result["precisions"]["int8"]["metrics"][metric]["value"] == pytest.approx(after[metric]["value"], abs=1e-9)
        assert result["precisions"]["fp32"]["metrics"][metric]["value"] == pytest.approx(after[metric]["fp32"], abs=1e-9)


@pytest.mark.slow
def test_int8_gets_its_own_temperature_and_thresholds(gate_setup, tmp_path, record_property):
    from edgederm.calibration import quantize_bundle

    calib, evald, make_bundle = gate_setup
    bundle = make_bundle(tmp_path / "bundle", outlier=30.0)  # INT8 perturbs the logits without breaking them
    report = quantize_bundle(bundle, calib, eval_dir=evald, target_agreement=None, say=lambda m: None)
    assert report["fidelity"]["max_probability_diff"] > 0.01  # a graph that really differs from fp32
    refit = report["clinical_refit"]
    record_property("figure:int8 ECE before/after/fp32",
                    f"{refit['ece_before']:.4f} / {refit['ece_after']:.4f} / {refit['ece_fp32']:.4f}")
    assert refit["ece_after"] <= refit["ece_fp32"] + 0.01
    manifest = read_manifest(bundle)
    own = manifest.clinical.settings["precisions"]["int8"]
    assert own["temperature"] == pytest.approx(refit["temperature"])
    assert set(own) == {"temperature", "review_threshold", "malignant_threshold"}
    # The runtime applies the chosen precision's own values, and fp32 keeps its own.
    int8 = load(bundle, precision="int8")
    fp32 = load(bundle, precision="fp32")
    assert int8.clinical.temperature == pytest.approx(own["temperature"])
    assert fp32.clinical.temperature == pytest.approx(manifest.clinical.temperature)
    image = next(iter(sorted((evald / "images").iterdir())))
    result = int8.predict_file(image)
    expected = softmax(int8.last_run["logits"], own["temperature"])
    assert [result.probabilities[c] for c in CLASSES] == pytest.approx(expected.tolist(), abs=1e-6)


@pytest.mark.slow
def test_cli_gate_that_cannot_be_met_exits_3_with_the_table(gate_setup, tmp_path, capsys):
    from edgederm.cli import main

    calib, evald, make_bundle = gate_setup
    bundle = make_bundle(tmp_path / "bundle")
    code = main(["quantize", str(bundle), "--calib", str(calib), "--eval", str(evald), "--no-fallback",
                 "--gate", "auroc>=+0.5"])
    out = capsys.readouterr().out
    assert code == 3
    assert "gate NOT reached" in out and "auroc>=+0.5" in out


def test_gate_syntax_errors_say_what_was_received_and_the_fix():
    from edgederm.calibration.gate import parse_gate
    from edgederm.runtime.errors import InputError

    terms = parse_gate("sensitivity[melanoma]>=-0.01, ece<=+0.01")
    assert [(t.metric, t.op, t.bound) for t in terms] == [("sensitivity[melanoma]", ">=", -0.01), ("ece", "<=", 0.01)]
    assert terms[0].slack(-0.005) == pytest.approx(0.005) and terms[1].slack(0.02) == pytest.approx(-0.01)
    with pytest.raises(InputError, match="'auroc>0.1' is not METRIC>=CHANGE"):
        parse_gate("auroc>0.1")


def test_manifest_refuses_a_bad_per_precision_temperature(gate_setup, tmp_path):
    import json

    from edgederm.runtime.errors import BundleError

    _, _, make_bundle = gate_setup
    bundle = make_bundle(tmp_path / "bundle")
    data = json.loads((bundle / "manifest.json").read_text())
    data["clinical"]["precisions"] = {"int8": {"temperature": -1.0}}
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="clinical.precisions.int8.temperature"):
        read_manifest(bundle)

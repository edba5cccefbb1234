"""The parser lint over the zoo, with the findings expected from the onnx-tensorrt tables:

- TensorRT 8.5 (jetson-orin-nano-4gb-jp5): the exporter's opset 18 is above the parser's
  17, and LayerNormalization is "N" in the 8.5-GA table: every model but SGMC-Net
  (convolutions and an MLP, no LayerNorm) has both findings.
- TensorRT 8.6 (jetson-orin-nx-jp60): LayerNormalization is "Y" in the 8.6-GA table;
  only the opset is above 17.
- TensorRT 10.3 (the jp6 profiles, x86-trt10): opset 9-20, every op the zoo uses is "Y".
- After `export --target` (opset 17 forms, LayerNorm decomposed for 8.5): no finding.
- An int8_dynamic graph (ONNX Runtime CPU only) is refused by every TensorRT: the fused
  com.microsoft Gelu, DynamicQuantizeLinear and MatMulInteger.
"""
from __future__ import annotations

import os
import shutil

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

from edgederm.export.lint import lint_bundle  # noqa: E402
from edgederm.export.zoo_lint import ZooLintRow, export_zoo_graphs, lint_graphs  # noqa: E402
from edgederm.models import list_models  # noqa: E402
from edgederm.runtime.targets import load_target, target_names  # noqa: E402

WITHOUT_LAYER_NORM = ("sgmcnet_",)
# Exporting a paper-size model takes tens of seconds to minutes on 2 cores, so the suite
# lints the smallest paper-size variant of each architecture (every op each architecture
# uses; the larger variants repeat the same blocks); EDGEDERM_LINT_ALL_PAPER_MODELS=1
# lints all ten (docs/lint.md is generated from all of them by scripts/lint_zoo.py).
SMALLEST_PAPER_VARIANT = ("cfformer_s", "hifuse_t", "remixformer_pp", "sgmcnet_18", "transxv2s_net")


def paper_models() -> list[str]:
    every = list_models(paper_size=True)
    if os.environ.get("EDGEDERM_LINT_ALL_PAPER_MODELS") == "1":
        return every
    assert set(SMALLEST_PAPER_VARIANT) <= set(every)
    return list(SMALLEST_PAPER_VARIANT)


def expected(model: str, target: str) -> dict[tuple[str, str], bool]:
    """(rule, op) -> present, as the operator tables say."""
    trt = load_target(target).parser_table
    has_ln = not model.startswith(WITHOUT_LAYER_NORM)
    return {("opset", "opset 18"): trt in ("8.5", "8.6"), ("operator", "LayerNormalization"): trt == "8.5" and has_ln}


def check(rows: list[ZooLintRow]) -> None:
    assert rows
    for row in rows:
        found = ZooLintRow.counts(row.exported)
        want = {key for key, present in expected(row.model, row.target).items() if present}
        assert set(found) == want, (row.model, row.stage, row.target, found)
        for f in row.exported:
            if f.rule == "operator":
                assert f.reference == "onnx-tensorrt 8.5-GA docs/operators.md: LayerNormalization N"
        assert row.with_target == [], (row.model, row.stage, row.target, ZooLintRow.counts(row.with_target))
        if load_target(row.target).max_opset == 17:
            assert any("axes input -> attribute" in k for k in row.rewrites) or row.stage in (
                "window_encoder", "region_encoder"), row  # stages without a Reduce op have nothing to move


@pytest.fixture(scope="module")
def tiny_graphs(tmp_path_factory):
    return export_zoo_graphs(list_models(paper_size=False), tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def tiny_rows(tiny_graphs):
    return lint_graphs(tiny_graphs, target_names())


@pytest.mark.slow
def test_every_tiny_model_against_every_target(tiny_rows):
    check(tiny_rows)
    assert {r.model for r in tiny_rows} == set(list_models(paper_size=False))
    assert {r.target for r in tiny_rows} == set(target_names())


@pytest.mark.slow
@pytest.mark.parametrize("name", paper_models())
def test_every_paper_size_model_against_every_target(name, tmp_path):
    check(lint_graphs(export_zoo_graphs([name], tmp_path), target_names()))


@pytest.mark.slow
def test_int8_dynamic_graph_is_flagged_for_every_tensorrt(tiny_bundle, synthetic_data, tmp_path):
    from edgederm.calibration import quantize_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    quantize_bundle(bundle, synthetic_data / "train", precision="int8_dynamic", max_images=8, target_agreement=None,
                    say=lambda m: None)
    for target in ("jetson-orin-nano-4gb-jp5", "jetson-orin-nx-jp60", "x86-trt10"):
        findings = lint_bundle(bundle, target, precisions=["int8_dynamic"])
        ops = {(f.rule, f.op) for f in findings if f.severity == "error"}
        assert {("domain", "com.microsoft.Gelu"), ("operator", "DynamicQuantizeLinear"), ("operator", "MatMulInteger")} <= ops
        assert all(f.graph.startswith("classifier.int8_dynamic.") and f.target == target for f in findings)
        # The static int8 graph of the same bundle (uint8 activations, ORT's default) is flagged on its own terms.
        int8 = {(f.rule, f.op) for f in lint_bundle(bundle, target, precisions=["int8"])}
        assert ("qdq", "QuantizeLinear") in int8


@pytest.mark.slow
def test_export_and_quantize_with_a_target(tmp_path, synthetic_data):
    """`export --target` writes opset 17 without LayerNormalization, parity-checked against torch, records the
    target and lints clean; `quantize --target` lints the new graphs (ORT's static int8 keeps INT32 biases)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import onnx

    out = tmp_path / "bundle"
    repo = Path(__file__).resolve().parents[2]
    cli = [sys.executable, "-m", "edgederm.cli"]
    export = subprocess.run([*cli, "export", "hifuse_tiny", "--out", str(out), "--target", "jetson-orin-nano-4gb-jp5"],
                            capture_output=True, text=True, timeout=900, cwd=repo)
    assert export.returncode == 0, export.stdout + export.stderr
    assert "lint: no findings for jetson-orin-nano-4gb-jp5" in export.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["name"] == "jetson-orin-nano-4gb-jp5" and manifest["export"]["opset"] == 17
    assert all(p["passed"] for p in manifest["export"]["parity"].values())
    for stage in manifest["stages"]:
        graph = onnx.load(str(out / stage["graphs"]["fp32"]["file"]))
        assert graph.opset_import[0].version == 17
        assert "LayerNormalization" not in {n.op_type for n in graph.graph.node}
        assert manifest["target"]["stages"][stage["name"]]["rewrites"]
    quantize = subprocess.run([*cli, "quantize", str(out), "--calib", str(synthetic_data / "train"), "--max-images", "8",
                               "--no-fallback", "--activation-type", "int8", "--target", "jetson-orin-nano-4gb-jp5"],
                              capture_output=True, text=True, timeout=900, cwd=repo)
    assert quantize.returncode == 1, quantize.stdout + quantize.stderr
    assert "reads a bias quantized to INT32" in quantize.stdout and "UINT8" not in quantize.stdout
    assert lint_bundle(out, "jetson-orin-nano-4gb-jp5", precisions=["fp32"]) == []


@pytest.mark.slow
def test_target_rewrites_keep_every_tiny_graphs_outputs(tiny_graphs, tmp_path_factory):
    """What `export --target` rewrites computes what the exporter's graph computes (ONNX Runtime, random inputs)."""
    import numpy as np
    import onnx

    from edgederm.export.target_forms import to_target_forms
    from edgederm.runtime.backends.onnxruntime import cpu_session

    rng = np.random.default_rng(0)
    for name, stage, path in tiny_graphs:
        for target in ("jetson-orin-nano-4gb-jp5", "jetson-orin-nx-jp60"):
            adapted = onnx.load(str(path))
            to_target_forms(adapted, load_target(target))
            rewritten = tmp_path_factory.mktemp("forms") / f"{name}.{stage}.onnx"
            onnx.save(adapted, str(rewritten))
            before, after = cpu_session(path), cpu_session(rewritten)
            feed = {i.name: rng.standard_normal([2 if not isinstance(d, int) else d for d in i.shape]).astype(np.float32)
                    for i in before.get_inputs()}
            for want, got in zip(before.run(None, feed), after.run(None, feed)):
                scale = float(np.abs(want).max()) + 1e-12
                assert float(np.abs(want - got).max()) / scale < 1e-5, (name, stage, target)

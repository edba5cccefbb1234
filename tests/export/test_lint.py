"""`edgederm lint`: each rule on a constructed ONNX graph, with the expected findings read from
the onnx-tensorrt operator tables (export/parser_tables/*.json); the zoo in test_lint_zoo.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgederm.export.lint import Finding, LintError, lint_model, parser_table, summarize  # noqa: E402

JP5, JP60, TRT10 = "jetson-orin-nano-4gb-jp5", "jetson-orin-nx-jp60", "x86-trt10"
F = TensorProto.FLOAT


def model(nodes, inputs, outputs, initializers=(), opset=17, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])


def vi(name, shape, dtype=F):
    return helper.make_tensor_value_info(name, dtype, shape)


def rules(findings: list[Finding]) -> set[tuple[str, str, str]]:
    return {(f.rule, f.severity, f.op) for f in findings}


def layer_norm(opset=17):
    return model([helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], name="ln", axis=-1)],
                 [vi("x", ["batch", 4, 8])], [vi("y", ["batch", 4, 8])],
                 [numpy_helper.from_array(np.ones(8, np.float32), "g"), numpy_helper.from_array(np.zeros(8, np.float32), "b")],
                 opset=opset)


def test_tables_are_the_releases_they_name():
    for version, release, max_opset in (("8.5", "8.5-GA", 17), ("8.6", "8.6-GA", 17), ("10.3", "10.1-GA", 20)):
        table = parser_table(version)
        assert (table.release, table.max_opset) == (release, max_opset)
        assert table.url.startswith("https://github.com/onnx/onnx-tensorrt/blob/")
    assert parser_table("8.5").narrows_int64 and not parser_table("10.3").narrows_int64
    assert any("Slice" == a["operator"] for a in parser_table("10.3").amendments)
    with pytest.raises(LintError, match="no onnx-tensorrt operator table for TensorRT 7.1; have 10.3, 8.5, 8.6"):
        parser_table("7.1")


def test_layer_norm_flagged_for_85_accepted_by_86_and_10():
    assert parser_table("8.5").operators["LayerNormalization"]["supported"] is False
    assert parser_table("8.6").operators["LayerNormalization"]["supported"] is True
    findings = lint_model(layer_norm(), JP5, "ln.onnx")
    assert len(findings) == 1
    f = findings[0]
    assert (f.rule, f.severity, f.graph, f.node, f.op, f.target) == ("operator", "error", "ln.onnx", "ln", "LayerNormalization", JP5)
    assert f.reference == "onnx-tensorrt 8.5-GA docs/operators.md: LayerNormalization N"
    assert "--target jetson-orin-nano-4gb-jp5" in f.fix
    assert lint_model(layer_norm(), JP60) == [] and lint_model(layer_norm(), TRT10) == []


def test_opset_above_the_parser_and_below_it():
    [above] = lint_model(layer_norm(opset=18), JP60)
    assert (above.rule, above.op) == ("opset", "opset 18") and "takes opset 17 at most" in above.message
    assert lint_model(layer_norm(opset=18), TRT10) == []
    relu = model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", ["batch", 3])], [vi("y", ["batch", 3])], opset=8)
    [below] = lint_model(relu, TRT10)
    assert below.rule == "opset" and "opset 9 and above" in below.message
    assert lint_model(relu, JP5) == []  # 8.x states no lower bound


def test_onnx_runtime_contrib_ops_are_flagged_everywhere():
    gelu = model([helper.make_node("Gelu", ["x"], ["y"], name="fused_gelu", domain="com.microsoft")],
                 [vi("x", ["batch", 8])], [vi("y", ["batch", 8])], extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    for target in (JP5, JP60, TRT10):
        [f] = lint_model(gelu, target)
        assert (f.rule, f.op, f.node) == ("domain", "com.microsoft.Gelu", "fused_gelu")
        assert "ONNX Runtime on CPU" in f.fix


def test_unsupported_and_unknown_ops():
    nodes = [helper.make_node("Unique", ["x"], ["u"], name="uniq"), helper.make_node("Frobnicate", ["x"], ["y"], name="frob")]
    findings = lint_model(model(nodes, [vi("x", ["batch"])], [vi("u", None), vi("y", None)]), TRT10)
    assert {(f.op, f.reference) for f in findings} == {
        ("Unique", "onnx-tensorrt 10.1-GA docs/operators.md: Unique N"),
        ("Frobnicate", "onnx-tensorrt 10.1-GA docs/operators.md: Frobnicate not listed")}


def test_slice_with_runtime_axes_flagged_until_103():
    init = [numpy_helper.from_array(np.array([0], np.int64), n) for n in ("starts", "ends")]
    nodes = [helper.make_node("Shape", ["x"], ["shape"], name="shape", start=0, end=1),
             helper.make_node("Slice", ["x", "starts", "ends", "shape"], ["y"], name="slice")]
    graph = model(nodes, [vi("x", ["batch", 4])], [vi("y", None)], init)
    [f] = lint_model(graph, JP5)
    assert (f.rule, f.node, f.op) == ("operator", "slice", "Slice") and "`axes` must be an initializer" in f.reference
    assert lint_model(graph, TRT10) == []  # onnx-tensorrt changelog, 10.3 GA: tensor axes for Slice


def test_resize_cubic_and_run_time_conv_weights():
    nodes = [helper.make_node("Relu", ["w0"], ["w"], name="relu_w"), helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Resize", ["c", "", "scales"], ["y"], name="resize", mode="cubic")]
    init = [numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w0"),
            numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    findings = lint_model(model(nodes, [vi("x", ["batch", 3, 8, 8])], [vi("y", None)], init), JP60)
    # The 8.5+ tables no longer require Conv weights to be initializers (8.4's did): only Resize is flagged.
    assert "restrictions" in parser_table("8.6").operators["Conv"] and not parser_table("8.6").operators["Conv"]["restrictions"]
    assert [(f.node, f.op) for f in findings] == [("resize", "Resize")] and "'cubic'" in findings[0].message


def test_types_narrowed_and_refused():
    nodes = [helper.make_node("Cast", ["ids"], ["f"], name="cast", to=F), helper.make_node("Add", ["f", "x"], ["y"], name="add"),
             helper.make_node("Cast", ["y"], ["d"], name="to_double", to=TensorProto.DOUBLE),
             helper.make_node("Mul", ["big_i", "big"], ["big2"], name="mul_big")]
    inputs = [vi("ids", ["batch", 4], TensorProto.INT64), vi("x", ["batch", 4]), vi("h", ["batch", 4], TensorProto.INT16)]
    init = [numpy_helper.from_array(np.array([2**40], np.int64), "big"), numpy_helper.from_array(np.array([1], np.int64), "big_i")]
    graph = model(nodes, inputs, [vi("d", ["batch", 4], TensorProto.DOUBLE), vi("big2", [1], TensorProto.INT64)], init)
    by_where = {(f.node, f.severity) for f in lint_model(graph, JP5)}
    assert by_where == {("ids", "warning"), ("h", "error"), ("d", "warning"), ("to_double", "warning"),
                        ("big2", "warning"), ("mul_big", "warning")}
    # TensorRT 10 binds INT64 natively: only the DOUBLE and INT16 findings stay.
    assert {(f.node, f.severity) for f in lint_model(graph, TRT10)} == {("h", "error"), ("d", "warning"), ("to_double", "warning")}


def test_slice_ends_of_int64_max_are_not_a_finding():
    init = [numpy_helper.from_array(np.array([1], np.int64), "starts"),
            numpy_helper.from_array(np.array([2**63 - 1], np.int64), "ends"),
            numpy_helper.from_array(np.array([1], np.int64), "axes")]
    graph = model([helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"])],
                  [vi("x", ["batch", 4])], [vi("y", ["batch", 3])], init)
    assert lint_model(graph, JP5) == []


def test_only_the_batch_axis_may_be_dynamic():
    graph = model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", ["batch", 3, "height", 64])], [vi("y", None)])
    [f] = lint_model(graph, TRT10)
    assert (f.rule, f.node) == ("dynamic-shape", "x") and "axis 2 is dynamic (height)" in f.message


# -- explicit INT8 (QDQ) ----------------------------------------------------------------------------
def qdq_conv(act_type=TensorProto.INT8, act_zero=0, weight_axis=0, weight_scales=4, act_scales=1, bias_int32=False,
             weight_op="Conv"):
    """x -> Q -> DQ -> Conv/MatMul(DQ(int8 weights)) -> y."""
    np_act = helper.tensor_dtype_to_np_dtype(act_type)
    w_shape = (4, 3, 1, 1) if weight_op == "Conv" else (3, 4)
    init = [numpy_helper.from_array(np.full(act_scales, 0.1, np.float32).reshape(() if act_scales == 1 else (act_scales,)), "s_x"),
            numpy_helper.from_array(np.array(act_zero, np_act), "z_x"),
            numpy_helper.from_array(np.ones(w_shape, np.int8), "w_q"),
            numpy_helper.from_array(np.full(weight_scales, 0.02, np.float32), "s_w"),
            numpy_helper.from_array(np.zeros(weight_scales, np.int8), "z_w")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s_x", "z_x"], ["x_q"], name="q_x"),
             helper.make_node("DequantizeLinear", ["x_q", "s_x", "z_x"], ["x_dq"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["w_q", "s_w", "z_w"], ["w"], name="dq_w", axis=weight_axis)]
    inputs = ["x_dq", "w"]
    if bias_int32:
        init += [numpy_helper.from_array(np.zeros(4, np.int32), "b_q"), numpy_helper.from_array(np.full(4, 0.002, np.float32), "s_b")]
        nodes.append(helper.make_node("DequantizeLinear", ["b_q", "s_b"], ["b"], name="dq_b", axis=0))
        inputs.append("b")
    nodes.append(helper.make_node(weight_op, inputs, ["y"], name="layer"))
    x_shape = ["batch", 3, 8, 8] if weight_op == "Conv" else ["batch", 5, 3]
    return model(nodes, [vi("x", x_shape)], [vi("y", None)], init)


def test_qdq_as_tensorrt_takes_it_is_clean():
    for target in (JP5, JP60, TRT10):
        assert lint_model(qdq_conv(), target) == []
        assert lint_model(qdq_conv(weight_op="MatMul", weight_axis=1), target) == []


@pytest.mark.parametrize("kwargs, node, words", [
    (dict(act_type=TensorProto.UINT8, act_zero=128), "q_x", "quantizes to UINT8"),
    (dict(act_zero=3), "q_x", "non-zero zero point"),
    (dict(act_scales=3), "q_x", "quantizes an activation per channel"),
    (dict(weight_axis=1), "dq_w", "TensorRT needs the output-channel axis 0"),
    (dict(weight_op="MatMul", weight_axis=0), "dq_w", "TensorRT needs the output-channel axis 1"),
    (dict(bias_int32=True), "dq_b", "reads a bias quantized to INT32"),
])
def test_qdq_rules(kwargs, node, words):
    findings = [f for f in lint_model(qdq_conv(**kwargs), JP5) if f.rule == "qdq"]
    assert findings and findings[0].node == node and words in findings[0].message, findings
    assert findings[0].reference.startswith("onnx-tensorrt 8.5-GA docs/operators.md: ")


def test_qdq_pairs_and_partial_quantization():
    init = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z"),
            numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["x_q"], name="q_alone"),
             helper.make_node("Cast", ["x_q"], ["x_f"], name="cast", to=F),
             helper.make_node("DequantizeLinear", ["x_i8", "s", "z"], ["x_dq"], name="dq_alone"),
             helper.make_node("Conv", ["x_dq", "w"], ["y"], name="half_conv")]
    graph = model(nodes, [vi("x", ["batch", 3, 8, 8]), vi("x_i8", ["batch", 3, 8, 8], TensorProto.INT8)],
                  [vi("y", None), vi("x_f", None)], init)
    got = {(f.node, f.severity) for f in lint_model(graph, TRT10) if f.rule == "qdq"}
    assert got == {("q_alone", "error"), ("dq_alone", "error"), ("half_conv", "warning")}


def test_scale_computed_at_run_time():
    graph = model([helper.make_node("QuantizeLinear", ["x", "s"], ["q"], name="q"),
                   helper.make_node("DequantizeLinear", ["q", "s"], ["y"], name="dq")],
                  [vi("x", ["batch", 4]), vi("s", [])], [vi("y", None)])
    assert {f.node for f in lint_model(graph, JP60) if "scale is not a constant" in f.message} == {"q", "dq"}


def test_findings_inside_subgraphs():
    then = helper.make_graph([helper.make_node("LayerNormalization", ["x", "g"], ["t"], name="ln_in_branch")], "then", [],
                             [vi("t", None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [vi("e", None)])
    graph = model([helper.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=other)],
                  [vi("c", [], TensorProto.BOOL), vi("x", ["batch", 8])], [vi("y", None)],
                  [numpy_helper.from_array(np.ones(8, np.float32), "g")])
    assert [(f.node, f.op) for f in lint_model(graph, JP5)] == [("ln_in_branch", "LayerNormalization")]


def test_summary_counts_repeated_findings():
    nodes = [helper.make_node("LayerNormalization", ["x", "g"], [f"y{i}"], name=f"ln{i}") for i in range(3)]
    graph = model(nodes, [vi("x", ["batch", 8])], [vi(f"y{i}", None) for i in range(3)],
                  [numpy_helper.from_array(np.ones(8, np.float32), "g")])
    [row] = summarize(lint_model(graph, JP5, "g.onnx"))
    assert (row["count"], row["node"]) == (3, "ln0")


@pytest.mark.slow
def test_lint_cli_exit_status_and_json(bundle_copy):
    """hifuse_tiny exported (opset 18) and quantized (ORT's default uint8 activations)."""
    repo = Path(__file__).resolve().parents[2]
    run = lambda *a: subprocess.run([sys.executable, "-m", "edgederm.cli", "lint", str(bundle_copy), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=300, cwd=repo)
    flagged = run("--target", JP5, "--json")
    assert flagged.returncode == 1, flagged.stderr
    findings = json.loads(flagged.stdout)
    fp32 = {(f["rule"], f["op"]) for f in findings if f["graph"] == "classifier.fp32.onnx"}
    assert fp32 == {("opset", "opset 18"), ("operator", "LayerNormalization")}
    assert all(f["target"] == JP5 and f["node"] and f["fix"] for f in findings)
    assert any(f["rule"] == "qdq" and "UINT8" in f["message"] for f in findings)
    clean = run("--target", TRT10, "--precision", "fp32")
    assert clean.returncode == 0 and "no findings for x86-trt10" in clean.stdout, clean.stdout
    unknown = run("--target", "orin")
    assert unknown.returncode == 2 and "invalid choice: 'orin'" in unknown.stderr


def test_quantize_without_zero_point_is_uint8():
    graph = model([helper.make_node("QuantizeLinear", ["x", "s"], ["q"], name="q"),
                   helper.make_node("DequantizeLinear", ["q", "s"], ["y"], name="dq")],
                  [vi("x", ["batch", 4])], [vi("y", None)], [numpy_helper.from_array(np.array(0.1, np.float32), "s")])
    [f] = lint_model(graph, TRT10)
    assert (f.node, f.rule) == ("q", "qdq") and "quantizes to UINT8" in f.message

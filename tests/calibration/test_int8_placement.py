"""Static INT8 placement for ONNX Runtime's CPU kernels, and the per-node profile.

One small conv network has every pattern the placement rules are about: Conv-ReLU,
a residual Add, a depthwise Conv with SiLU (EfficientNet), a squeeze-excitation gate
(Conv -> Sigmoid, a gate that stays float), Conv tokens into a LayerNorm, and a Linear
head. The tests check the graph ONNX Runtime actually runs (its optimised form): every
quantized Conv became a QLinearConv, no Conv runs in float on dequantized weights, the
float-only ops read float, and the outputs stay close to fp32.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from edgederm.calibration.graphs import (float_only_violations, gating_sigmoids, quantize_graph,  # noqa: E402
                                         unfused_convs)
from edgederm.calibration.profile import format_profiles, op_group, profile_graph  # noqa: E402


def conv_net():
    """Stem Conv-ReLU, a residual block (Conv-ReLU-Conv + Add, ReLU), a depthwise Conv with
    SiLU, a pointwise Conv, a squeeze-excitation gate (mean, Conv-ReLU, Conv-Sigmoid, Mul),
    a Conv to tokens, LayerNorm, mean, Linear head (Gemm). Built with onnx.helper (fast)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def conv(name, x, cin, cout, k=3, stride=1, groups=1):
        w = rng.normal(0, (2.0 / (cin // groups * k * k)) ** 0.5, (cout, cin // groups, k, k)).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}.w"),
                      numpy_helper.from_array(rng.normal(0, 0.1, cout).astype(np.float32), f"{name}.b")])
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], name=name, group=groups,
                                      strides=[stride, stride], pads=[k // 2] * 4))
        return name

    def op(kind, inputs, name, **attrs):
        nodes.append(helper.make_node(kind, inputs, [name], name=name, **attrs))
        return name

    x = op("Relu", [conv("stem", "x", 3, 16, stride=2)], "stem_relu")
    r = conv("res2", op("Relu", [conv("res1", x, 16, 16)], "res1_relu"), 16, 16)
    x = op("Relu", [op("Add", [x, r], "res_add")], "res_relu")
    d = conv("dw", x, 16, 16, groups=16)
    y = conv("pw", op("Mul", [d, op("Sigmoid", [d], "dw_sigmoid")], "dw_silu"), 16, 16, k=1)
    inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), "hw"))
    s = op("ReduceMean", [y, "hw"], "se_mean", keepdims=1)
    s = conv("se_expand", op("Relu", [conv("se_reduce", s, 16, 4, k=1)], "se_relu"), 4, 16, k=1)
    y = op("Mul", [y, op("Sigmoid", [s], "se_gate")], "se_scale")
    t = conv("to_tokens", y, 16, 16, k=1)
    inits.append(numpy_helper.from_array(np.array([0, 16, -1], np.int64), "flat"))
    t = op("Transpose", [op("Reshape", [t, "flat"], "flatten")], "tokens", perm=[0, 2, 1])
    inits += [numpy_helper.from_array(np.ones(16, np.float32), "ln.g"),
              numpy_helper.from_array(np.zeros(16, np.float32), "ln.b"),
              numpy_helper.from_array(np.array([1], np.int64), "token_axis"),
              numpy_helper.from_array(rng.normal(0, 0.3, (5, 16)).astype(np.float32), "head.w"),
              numpy_helper.from_array(rng.normal(0, 0.1, 5).astype(np.float32), "head.b")]
    t = op("LayerNormalization", [t, "ln.g", "ln.b"], "norm", axis=-1)
    t = op("ReduceMean", [t, "token_axis"], "pool", keepdims=0)
    op("Gemm", [t, "head.w", "head.b"], "y", transB=1)
    graph = helper.make_graph(nodes, "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def conv_graph(tmp_path_factory):
    folder = tmp_path_factory.mktemp("convnet")
    fp32 = folder / "fp32.onnx"
    onnx.save(conv_net(), str(fp32))
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.uniform(-1, 1, (8, 3, 32, 32)).astype(np.float32)} for _ in range(4)]
    int8 = folder / "int8.onnx"
    quantize_graph(fp32, int8, feeds)
    return fp32, int8, feeds, folder


def optimised(path, folder):
    """The graph ONNX Runtime runs, as the runtime's sessions build it (all optimisations)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(folder / f"{path.stem}.optimised.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath)


def outputs(path, feeds):
    from edgederm.runtime.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(path)
    return np.concatenate([backend.run(f)["y"] for f in feeds])


def test_quantized_convs_fuse_into_qlinearconv(conv_graph):
    fp32, int8, _, folder = conv_graph
    model = onnx.load(str(int8))
    assert unfused_convs(model) == []
    producers = {o: n for n in model.graph.node for o in n.output}

    def int8_weights(node):
        return producers.get(node.input[1]) is not None and producers[node.input[1]].op_type == "DequantizeLinear"

    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    quantized = [n for n in convs if int8_weights(n)]
    kept_float = [n for n in convs if not int8_weights(n)]
    # The SE expand Conv feeds a gate Sigmoid (float only): it has float weights and
    # cannot fuse; every other Conv is int8 (the SE reduce Conv before it included).
    assert [n.name for n in kept_float] == ["se_expand"] and len(quantized) == len(convs) - 1
    weights = {i.name: i for i in model.graph.initializer}
    for node in kept_float:  # float weights straight from initializers, no DequantizeLinear pass per run
        assert node.input[1] in weights and weights[node.input[1]].data_type == onnx.TensorProto.FLOAT
    assert unfused_convs(model) == []

    run = optimised(int8, folder)
    ops = [n.op_type for n in run.graph.node]
    assert ops.count("QLinearConv") == len(quantized)
    run_producers = {o: n for n in run.graph.node for o in n.output}
    for node in run.graph.node:  # nothing in the running graph computes in float on dequantized weights
        if node.op_type in ("Conv", "FusedConv", "NchwcConv"):
            assert all(run_producers.get(i) is None or run_producers[i].op_type != "DequantizeLinear"
                       for i in node.input[1:]), node.name
    assert "QGemm" in ops  # the Linear head
    assert ops.count("QLinearAdd") == 1  # the residual Add, between int8 Convs


def test_float_only_ops_read_float_and_silu_is_an_activation(conv_graph):
    _, int8, _, _ = conv_graph
    model = onnx.load(str(int8))
    assert float_only_violations(model) == []
    gating = gating_sigmoids(model)
    sigmoids = [n.name for n in model.graph.node if n.op_type == "Sigmoid"]
    assert len(sigmoids) == 2 and len(gating) == 1  # the SiLU's; the SE gate is not x * sigmoid(x)
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in node.input)


def test_int8_stays_close_to_fp32(conv_graph, record_property):
    fp32, int8, feeds, _ = conv_graph
    reference, quantized = outputs(fp32, feeds), outputs(int8, feeds)
    rel = float(np.linalg.norm(quantized - reference) / np.linalg.norm(reference))
    agree = float((quantized.argmax(1) == reference.argmax(1)).mean())
    record_property("figure:int8_convnet_relative_error", f"{rel:.4f}")
    record_property("figure:int8_convnet_argmax_agreement", f"{agree:.3f}")
    assert rel < 0.05, rel
    assert agree >= 0.9, agree


def test_profile_groups_and_counts_the_optimised_graph(conv_graph):
    fp32, int8, _, _ = conv_graph
    int8_profile = profile_graph(int8, batch=2, runs=2)
    fp32_profile = profile_graph(fp32, batch=2, runs=2)
    assert int8_profile.optimized_ops.get("QLinearConv", 0) + int8_profile.optimized_ops.get("QLinearConv (grouped)", 0) \
        == sum(n for op, n in int8_profile.source_ops.items() if op.startswith("Conv")) - 1
    assert int8_profile.optimized_ops.get("QLinearConv (grouped)") == 1  # the depthwise Conv, named apart
    assert "QLinearConv" in int8_profile.by_op and int8_profile.by_op["QLinearConv"] > 0
    assert int8_profile.by_group()["int8 compute"] > 0 and "int8 compute" not in fp32_profile.by_group()
    assert op_group("QLinearConv (grouped)") == "int8 compute" and op_group("DequantizeLinear") == "quantize"
    assert int8_profile.calls["QLinearConv"] >= 1 and int8_profile.total_ms > 0
    table = format_profiles({"fp32": fp32_profile, "int8": int8_profile})
    assert "QLinearConv" in table and "group: quantize" in table
    json.dumps(int8_profile.to_dict())


def test_profile_command_on_a_bundle(conv_graph, write_onnx_bundle, tmp_path, capsys):
    from edgederm.calibration.graphs import quantize_graph as qg
    from edgederm.cli import main

    # A one-stage bundle from the mini classifier layout ([batch, 3, 32, 32] -> logits).
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    d = rng.normal(size=(3, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["dermoscopy", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
         helper.make_node("Gemm", ["f", "d"], ["logits"], transB=1)], "mini",
        [helper.make_tensor_value_info("dermoscopy", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel()), helper.make_tensor("d", TensorProto.FLOAT, d.shape, d.ravel())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "fp32.onnx"))
    qg(tmp_path / "fp32.onnx", tmp_path / "int8.onnx",
       [{"dermoscopy": rng.uniform(0, 1, (4, 3, 32, 32)).astype(np.float32)}])
    bundle = write_onnx_bundle(tmp_path / "bundle", {"fp32": model, "int8": onnx.load(str(tmp_path / "int8.onnx"))},
                               ["a", "b", "c"], 32, {"temperature": 1.0, "review_threshold": 0.5, "review_classes": []})
    assert main(["profile", str(bundle), "--runs", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["classifier"]) == {"fp32", "int8"}
    assert report["classifier"]["int8"]["optimized_ops"].get("QLinearConv") == 1
    assert report["classifier"]["fp32"]["optimized_ops"].get("QLinearConv") is None
    assert main(["profile", str(bundle), "--precision", "fp16"]) != 0
    assert "no fp16 graphs; it holds fp32, int8. Fix:" in capsys.readouterr().err


def test_symmetric_int8_activations_fuse_without_folding_the_relu(conv_graph, tmp_path):
    from edgederm.calibration.graphs import QuantSettings

    fp32, _, feeds, folder = conv_graph
    out = tmp_path / "s8.onnx"
    quantize_graph(fp32, out, feeds, settings=QuantSettings(activation_type="int8"))
    model = onnx.load(str(out))
    assert unfused_convs(model) == [] and float_only_violations(model) == []
    producers = {o: n for n in model.graph.node for o in n.output}
    quantized = [n for n in model.graph.node if n.op_type == "Conv" and n.input[1] in producers]
    for node in model.graph.node:  # with a zero point of 0 a Relu cannot be folded: the Conv's own output is quantized
        if node.op_type == "Relu" and producers.get(node.input[0]) is not None:
            assert producers[node.input[0]].op_type != "Conv"
    # ONNX Runtime 1.32's CPU fuses the plain s8 Conv -> Q groups (stem, residual, SE reduce,
    # tokens); its s8 path leaves the depthwise Conv and the one after the SiLU unfused
    # (s8 activations are TensorRT's form; x86 CPUs get u8, see the test above).
    assert [n.op_type for n in optimised(out, tmp_path).graph.node].count("QLinearConv") >= len(quantized) - 2

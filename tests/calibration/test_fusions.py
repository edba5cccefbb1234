"""calibration/fusions.py: the erf-GELU rewrite keeps the function and only fuses what it should."""
from __future__ import annotations

import math

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgederm.calibration.fusions import fuse_erf_gelu  # noqa: E402

SQRT2 = math.sqrt(2.0)


def _const(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, np.float32), name)


def _graph(nodes: list, opset: int = 18, extra_outputs: tuple[str, ...] = ()) -> onnx.ModelProto:
    inits = [_const("sqrt2", SQRT2), _const("rsqrt2", 1 / SQRT2), _const("one", 1.0), _const("half", 0.5),
             _const("two", 2.0)]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", *extra_outputs)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 7])], outputs,
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _exact_gelu(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    return x.astype(np.float64) * 0.5 * (1.0 + erf(x.astype(np.float64) / SQRT2))


def _tail(a: str, b: str, order: str) -> list:
    """The product of x, 0.5 and the erf sum in the three association orders."""
    if order == "half_of_sum":  # the dynamo exporter's form
        return [helper.make_node("Mul", ["half", "s"], ["h"]), helper.make_node("Mul", [a, "h"], [b])]
    if order == "x_times_sum":
        return [helper.make_node("Mul", ["s", a], ["h"]), helper.make_node("Mul", ["h", "half"], [b])]
    return [helper.make_node("Mul", [a, "half"], ["h"]), helper.make_node("Mul", ["h", "s"], [b])]


@pytest.mark.parametrize("scale", ["div", "mul"])
@pytest.mark.parametrize("order", ["half_of_sum", "x_times_sum", "half_of_x"])
def test_every_form_fuses_to_one_exact_gelu(scale, order):
    first = (helper.make_node("Div", ["x", "sqrt2"], ["d"]) if scale == "div"
             else helper.make_node("Mul", ["x", "rsqrt2"], ["d"]))
    nodes = [first, helper.make_node("Erf", ["d"], ["e"]), helper.make_node("Add", ["e", "one"], ["s"]),
             *_tail("x", "y", order)]
    model = _graph(nodes)
    x = np.random.default_rng(0).normal(0, 2, (2, 5, 7)).astype(np.float32)
    before = _run(model, x)[0]
    assert fuse_erf_gelu(model) == 1
    assert [(n.op_type, n.domain) for n in model.graph.node] == [("Gelu", "com.microsoft")]
    assert not model.graph.initializer  # its constants went with it
    after = _run(model, x)[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after, _exact_gelu(x), rtol=1e-5, atol=1e-6)


def test_opset_20_uses_the_standard_gelu():
    nodes = [helper.make_node("Div", ["x", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["s"]), *_tail("x", "y", "half_of_sum")]
    model = _graph(nodes, opset=20)
    assert fuse_erf_gelu(model) == 1
    assert [(n.op_type, n.domain) for n in model.graph.node] == [("Gelu", "")]
    x = np.linspace(-4, 4, 70, dtype=np.float32).reshape(2, 5, 7)
    np.testing.assert_allclose(_run(model, x)[0], _exact_gelu(x), rtol=1e-5, atol=1e-6)


def test_lookalikes_and_shared_values_are_left_alone():
    x = np.random.default_rng(1).normal(size=(2, 5, 7)).astype(np.float32)
    # x / 2 instead of x / sqrt(2): a different function
    wrong = _graph([helper.make_node("Div", ["x", "two"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
                    helper.make_node("Add", ["e", "one"], ["s"]), *_tail("x", "y", "half_of_sum")])
    # the erf sum is also a graph output: fusing would lose it
    shared = _graph([helper.make_node("Div", ["x", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
                     helper.make_node("Add", ["e", "one"], ["s"]), *_tail("x", "y", "half_of_sum")],
                    extra_outputs=("s",))
    for model in (wrong, shared):
        before = [n.op_type for n in model.graph.node]
        reference = _run(model, x)
        assert fuse_erf_gelu(model) == 0
        assert [n.op_type for n in model.graph.node] == before
        for got, want in zip(_run(model, x), reference):
            np.testing.assert_array_equal(got, want)

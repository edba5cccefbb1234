"""Rewrite an exported graph into the forms a target's TensorRT parser takes.

Two rewrites, chosen from the target profile and its onnx-tensorrt operator table:

- **opset 18 -> 17** (TensorRT 8.5 / 8.6 parse up to opset 17). torch's dynamo exporter
  writes opset 18 natively; asked for 17 it falls back to ONNX's version converter,
  which fails on Reduce* nodes whose axes are an input ("No initializer or constant
  input to node found") and then returns the opset-18 graph unchanged with only a log
  line. So the export stays at 18 and this module converts the few op forms that
  differ: Reduce* axes move from an input (opset 18) back to an attribute (opset 17).
  An op form opset 17 cannot express (Pad with ``axes``, Split with ``num_outputs``,
  ops new in 18) is refused with the node's name instead of converted approximately.
- **LayerNormalization -> ReduceMean, Sub, Pow, Add, Sqrt, Div, Mul, Add** where the
  parser lacks the op (TensorRT 8.5). This is the form the TorchScript exporter wrote
  before opset 17, which TensorRT's builder recognises and fuses into one normalisation
  kernel; computed in the input's float type, with epsilon from the node.

Every rewritten graph is checked by ``onnx.checker`` at the new opset here and, in
``export_bundle``, by the usual ONNX Runtime vs torch parity check.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgederm.runtime.bundle import write_bytes_atomic
from edgederm.runtime.targets import TargetProfile

from .onnx import ExportError

STANDARD_DOMAINS = ("", "ai.onnx")
# Reduce ops whose axes became an input in opset 18 (ReduceSum did so in 13 and stays).
REDUCE_AXES_INPUT_AT_18 = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                           "ReduceMin", "ReduceProd", "ReduceSumSquare"}
NEW_IN_18 = {"BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "CenterCropPad", "Col2Im", "GroupNormalization",
             "Mish", "OptionalGetElement", "OptionalHasElement"}


@dataclass
class TargetForms:
    """What :func:`to_target_forms` changed, for the manifest and the export log."""

    target: str
    opset: int
    rewrites: dict[str, int] = field(default_factory=dict)

    def count(self, what: str, n: int = 1) -> None:
        if n:
            self.rewrites[what] = self.rewrites.get(what, 0) + n

    def to_dict(self) -> dict[str, object]:
        return {"target": self.target, "opset": self.opset, "rewrites": dict(self.rewrites)}


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), 0)


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                values[node.output[0]] = numpy_helper.to_array(value)
    return values


def _refuse(node: onnx.NodeProto, why: str, opset: int) -> ExportError:
    return ExportError(f"node {node.name or node.output[0]!r} ({node.op_type}) {why}; it cannot be written at opset {opset}. "
                       "Fix: change that layer in the model, or pick a target whose TensorRT parses opset 18 (TensorRT 10)")


def downgrade_18_to_17(model: onnx.ModelProto, forms: TargetForms) -> None:
    """Rewrite an opset-18 graph as opset 17, in place (the op forms listed in the module docstring)."""
    graph = model.graph
    constants = _constants(graph)
    for node in graph.node:
        if node.domain not in STANDARD_DOMAINS:
            continue
        if node.op_type in NEW_IN_18:
            raise _refuse(node, "is new in opset 18", 17)
        if node.op_type == "Pad" and len(node.input) > 3 and node.input[3]:
            raise _refuse(node, "pads only some axes (the axes input of opset 18)", 17)
        if node.op_type == "Split" and any(a.name == "num_outputs" for a in node.attribute):
            raise _refuse(node, "splits by num_outputs (opset 18)", 17)
        if node.op_type in ("Resize",) and any(a.name in ("antialias", "axes", "keep_aspect_ratio_policy") for a in node.attribute):
            raise _refuse(node, "uses Resize attributes of opset 18", 17)
        if node.op_type in ("ScatterND", "ScatterElements") and any(
                a.name == "reduction" and a.s in (b"max", b"min") for a in node.attribute):
            raise _refuse(node, "reduces by max/min (opset 18)", 17)
        if node.op_type in REDUCE_AXES_INPUT_AT_18:
            _reduce_axes_to_attribute(node, constants, forms)
    _drop_unused_initializers(graph)
    _set_default_opset(model, 17)


def _reduce_axes_to_attribute(node: onnx.NodeProto, constants: dict[str, np.ndarray], forms: TargetForms) -> None:
    has_axes = len(node.input) > 1 and bool(node.input[1])
    noop = [a for a in node.attribute if a.name == "noop_with_empty_axes"]
    if noop and noop[0].i and not has_axes:
        raise _refuse(node, "is an identity through noop_with_empty_axes (opset 18)", 17)
    for attr in noop:  # opset 17 has no such attribute; with axes given it changes nothing
        node.attribute.remove(attr)
    if has_axes:
        axes = constants.get(node.input[1])
        if axes is None:
            raise _refuse(node, "takes its axes from a tensor computed at run time", 17)
        del node.input[1:]
        node.attribute.append(helper.make_attribute("axes", [int(a) for a in axes.reshape(-1)]))
        forms.count(f"{node.op_type} axes input -> attribute")


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _set_default_opset(model: onnx.ModelProto, version: int) -> None:
    for entry in model.opset_import:
        if entry.domain in STANDARD_DOMAINS:
            entry.version = version


def decompose_layer_norm(model: onnx.ModelProto, forms: TargetForms) -> None:
    """Replace every LayerNormalization by its elementwise form, in place."""
    graph = model.graph
    value_types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    value_types.update({t.name: t.data_type for t in graph.initializer})
    out_nodes: list[onnx.NodeProto] = []
    new_initializers: list[onnx.TensorProto] = []
    used = {o for n in graph.node for o in n.input}
    for node in graph.node:
        if node.op_type != "LayerNormalization" or node.domain not in STANDARD_DOMAINS:
            out_nodes.append(node)
            continue
        if any(o and o in used for o in node.output[1:]):
            raise ExportError(f"LayerNormalization {node.name!r} uses its mean / inv-std outputs; only Y can be decomposed")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axis, eps = int(attrs.get("axis", -1)), float(attrs.get("epsilon", 1e-5))
        if axis >= 0:
            raise ExportError(f"LayerNormalization {node.name!r} normalises from axis {axis}; only negative axes "
                              "(counted from the last) can be decomposed without the input rank")
        dtype = value_types.get(node.input[0], onnx.TensorProto.FLOAT)
        np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
        p = (node.name or node.output[0]).replace("/", "_") + "_ln"
        axes = list(range(axis, 0))
        eps_name, two_name = f"{p}_eps", f"{p}_two"
        new_initializers += [numpy_helper.from_array(np.array(eps, dtype=np_dtype), eps_name),
                             numpy_helper.from_array(np.array(2.0, dtype=np_dtype), two_name)]
        x = node.input[0]
        out_nodes += [
            helper.make_node("ReduceMean", [x], [f"{p}_mean"], name=f"{p}_mean", axes=axes, keepdims=1),
            helper.make_node("Sub", [x, f"{p}_mean"], [f"{p}_d"], name=f"{p}_sub"),
            helper.make_node("Pow", [f"{p}_d", two_name], [f"{p}_sq"], name=f"{p}_pow"),
            helper.make_node("ReduceMean", [f"{p}_sq"], [f"{p}_var"], name=f"{p}_var", axes=axes, keepdims=1),
            helper.make_node("Add", [f"{p}_var", eps_name], [f"{p}_vareps"], name=f"{p}_addeps"),
            helper.make_node("Sqrt", [f"{p}_vareps"], [f"{p}_std"], name=f"{p}_sqrt"),
            helper.make_node("Div", [f"{p}_d", f"{p}_std"], [f"{p}_norm"], name=f"{p}_div"),
        ]
        scaled = node.output[0] if len(node.input) < 3 or not node.input[2] else f"{p}_scaled"
        out_nodes.append(helper.make_node("Mul", [f"{p}_norm", node.input[1]], [scaled], name=f"{p}_scale"))
        if scaled != node.output[0]:
            out_nodes.append(helper.make_node("Add", [scaled, node.input[2]], [node.output[0]], name=f"{p}_bias"))
        forms.count("LayerNormalization -> ReduceMean/Sub/Pow/Add/Sqrt/Div/Mul/Add")
    if forms.rewrites.get("LayerNormalization -> ReduceMean/Sub/Pow/Add/Sqrt/Div/Mul/Add"):
        if default_opset(model) >= 18:
            raise ExportError("decompose LayerNormalization after converting to opset 17 (its ReduceMean uses the axes attribute)")
        del graph.node[:]
        graph.node.extend(out_nodes)
        graph.initializer.extend(new_initializers)


def to_target_forms(model: onnx.ModelProto, target: TargetProfile) -> TargetForms:
    """Rewrite ``model`` in place for ``target`` (opset, LayerNorm) and check the result."""
    from .lint import parser_table

    table = parser_table(target.parser_table)
    forms = TargetForms(target.name, default_opset(model))
    if forms.opset > target.max_opset:
        if forms.opset != 18 or target.max_opset < 17:
            raise ExportError(f"the graph is opset {forms.opset}; converting to opset {target.max_opset} for {target.name} "
                              "is not supported (this exporter converts 18 -> 17)")
        downgrade_18_to_17(model, forms)
        forms.opset = 17
    if not table.operators.get("LayerNormalization", {}).get("supported"):
        decompose_layer_norm(model, forms)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # onnx raises several exception types; all mean the rewrite is wrong
        raise ExportError(f"graph rewritten for {target.name} does not check: {type(exc).__name__}: {exc}") from exc
    return forms


def rewrite_file_for_target(path: str | os.PathLike[str], target: TargetProfile) -> TargetForms:
    """:func:`to_target_forms` on the graph file at ``path``, replaced atomically when anything changed."""
    model = onnx.load(str(path))
    forms = to_target_forms(model, target)
    if forms.rewrites or forms.opset != default_opset(onnx.load(str(path), load_external_data=False)):
        write_bytes_atomic(path, model.SerializeToString())
    return forms

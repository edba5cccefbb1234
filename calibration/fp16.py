"""FP16 graphs with fp32 inputs/outputs and the numerically fragile ops kept in fp32.

Written against the ONNX IR directly (no onnxconverter-common), because the rules are
few and must be exact:

- Graph inputs and outputs keep their dtype (float32 in, float32 out), so a bundle's
  fp16 graph is a drop-in replacement for the fp32 one: Casts are inserted right
  after each float input and right before each float output.
- Ops in ``KEEP_FP32`` run in fp32 with Casts around them: normalisations
  (LayerNormalization, BatchNormalization, Instance/GroupNormalization), Softmax /
  LogSoftmax, and the reductions and powers that hand-written norms (channels-first
  LayerNorm: ReduceMean, Pow, Sqrt) and attention scores are made of. Their
  variance and exp sums overflow or lose all precision in fp16; their cost is small.
- Every other float tensor and initializer becomes fp16; ``Cast(to=FLOAT)`` inside
  the fp16 region becomes ``Cast(to=FLOAT16)``, ``Constant`` / ``ConstantOfShape``
  values follow their node's precision.
- Inputs that ONNX requires in fp32 whatever T is (Resize ``roi``/``scales``) are
  left alone.
- Initializers and constants are converted with clipping to the fp16 range (a
  weight above 65504 would otherwise become inf; the number clipped is logged), and
  non-zero values too small for fp16 (epsilons such as F.normalize's 1e-12) become
  the smallest fp16 subnormal instead of 0, so ``x / max(norm, eps)`` stays 0/eps = 0
  instead of 0/0 = NaN on an all-zero (padded) vector.
- One Cast per (tensor, target dtype), shared by all consumers.

Note: ONNX Runtime's CPU provider runs many fp16 ops through inserted casts and is
slow; fp16 graphs are for GPUs (ORT CUDA, TensorRT). Parity is still checked on CPU.
"""
from __future__ import annotations

import logging
import os
from typing import Iterable

import numpy as np

from .graphs import save_model

log = logging.getLogger(__name__)

KEEP_FP32 = frozenset({
    "LayerNormalization", "BatchNormalization", "InstanceNormalization", "GroupNormalization",
    "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp",
    "Pow", "Sqrt", "Reciprocal",
})
# Input slots that stay float32 whatever the node's precision.
FIXED_FP32_INPUTS = {"Resize": {1, 2}, "Upsample": {1}}
FP16_MAX = float(np.finfo(np.float16).max)
FP16_TINY = float(np.finfo(np.float16).smallest_subnormal)


def to_fp16(array: np.ndarray) -> np.ndarray:
    """float32 -> float16, clipped to the fp16 range, non-zero values kept non-zero."""
    out = np.clip(array, -FP16_MAX, FP16_MAX)
    small = (out != 0) & (np.abs(out) < FP16_TINY)
    if small.any():
        out = np.where(small, np.sign(out) * FP16_TINY, out)
    return out.astype(np.float16)


def convert_to_fp16(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                    keep_fp32_ops: Iterable[str] = KEEP_FP32, keep_fp32_nodes: Iterable[str] = ()) -> dict[str, int]:
    """Write an fp16 version of the ONNX graph ``src`` to ``dst``; returns counts of what changed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper, shape_inference

    model = onnx.load(str(src))
    graph = model.graph
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"node {node.name!r} ({node.op_type}) has a subgraph; fp16 conversion handles flat graphs only")
    inferred = shape_inference.infer_shapes(model)
    elem: dict[str, int] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.HasField("tensor_type"):
            elem[vi.name] = vi.type.tensor_type.elem_type
    for init in graph.initializer:
        elem[init.name] = init.data_type
    keep_ops, keep_names = set(keep_fp32_ops), set(keep_fp32_nodes)
    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16

    def is_fp32_node(node: onnx.NodeProto) -> bool:
        return node.op_type in keep_ops or node.name in keep_names

    def was_float(name: str) -> bool:
        return elem.get(name) == FLOAT

    # 1. Where each float tensor lives after conversion.
    home: dict[str, int] = {}
    for vi in graph.input:
        if was_float(vi.name):
            home[vi.name] = FLOAT
    init_consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            init_consumers.setdefault(name, []).append((node, i))
    counts = {"initializers_fp16": 0, "initializers_clipped": 0, "casts": 0, "fp32_nodes": 0}
    for init in graph.initializer:
        if init.data_type != FLOAT:
            continue
        wants_half = any(not is_fp32_node(n) and i not in FIXED_FP32_INPUTS.get(n.op_type, ())
                         for n, i in init_consumers.get(init.name, []))
        if wants_half:
            array = numpy_helper.to_array(init)
            clipped = int((np.abs(array) > FP16_MAX).sum())
            counts["initializers_clipped"] += clipped
            init.CopyFrom(numpy_helper.from_array(to_fp16(array), init.name))
            counts["initializers_fp16"] += 1
            home[init.name] = HALF
        else:
            home[init.name] = FLOAT
    if counts["initializers_clipped"]:
        log.warning("fp16: %d weight values exceed the fp16 range and were clipped to +-%g", counts["initializers_clipped"], FP16_MAX)

    # 2. Rewrite nodes in order, inserting Casts where a consumer wants another dtype.
    cast_cache: dict[tuple[str, int], str] = {}
    new_nodes: list[onnx.NodeProto] = []
    graph_outputs = {o.name for o in graph.output}

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in cast_cache:
            out = f"{name}__to_{'fp16' if to == HALF else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [name], [out], name=f"{out}__cast", to=to))
            counts["casts"] += 1
            cast_cache[key] = out
        return cast_cache[key]

    for node in graph.node:
        fp32_node = is_fp32_node(node)
        counts["fp32_nodes"] += int(fp32_node)
        target = FLOAT if fp32_node else HALF
        for i, name in enumerate(node.input):
            if not name or name not in home:
                continue
            want = FLOAT if i in FIXED_FP32_INPUTS.get(node.op_type, ()) else target
            if home[name] != want:
                node.input[i] = cast(name, want)
        if not fp32_node:
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
                    attr.i = HALF
                elif node.op_type in ("Constant", "ConstantOfShape") and attr.name == "value" and attr.t.data_type == FLOAT:
                    value = numpy_helper.to_array(attr.t)
                    attr.t.CopyFrom(numpy_helper.from_array(to_fp16(value), attr.t.name))
                elif node.op_type in ("EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike") \
                        and attr.name == "dtype" and attr.i == FLOAT:
                    attr.i = HALF
        new_nodes.append(node)
        for out in node.output:
            if was_float(out) or (node.op_type == "Cast" and not fp32_node and _cast_to(node) == HALF):
                home[out] = target
    # 3. Float outputs go back to fp32 under their original names.
    renames: dict[str, str] = {}
    for out in graph.output:
        if out.name in home and home[out.name] == HALF:
            renames[out.name] = f"{out.name}__fp16"
    if renames:
        for node in new_nodes:
            for j, name in enumerate(node.output):
                if name in renames:
                    node.output[j] = renames[name]
            for j, name in enumerate(node.input):
                if name in renames:
                    node.input[j] = renames[name]
        for original, renamed in renames.items():
            new_nodes.append(helper.make_node("Cast", [renamed], [original], name=f"{original}__to_fp32", to=FLOAT))
            counts["casts"] += 1
    assert graph_outputs == {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.value_info[:]  # stale dtypes; ORT and the checker re-infer
    model = shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    save_model(model, dst)
    return counts


def _cast_to(node) -> int:  # noqa: ANN001
    for attr in node.attribute:
        if attr.name == "to":
            return int(attr.i)
    return -1

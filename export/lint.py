"""``edgederm lint BUNDLE --target T``: will the target's TensorRT parser take every graph?

TensorRT cannot be installed where bundles are made, so its ONNX parser's rules are
checked here, from data: the operator table of the onnx-tensorrt release that matches
the target's TensorRT (``parser_tables/tensorrt-<major.minor>.json``, written from that
release's ``docs/operators.md`` by scripts/onnx_tensorrt_table.py and naming its commit).

Rules, each finding naming graph, node, op, target and the fix:

- ``opset``: the graph's default-domain opset is outside what the parser takes.
- ``domain``: a node outside the standard ONNX domain (ONNX Runtime's ``com.microsoft``
  contrib ops such as the fused Gelu and MatMulInteger of int8_dynamic graphs): the
  parser has no importer for it.
- ``operator``: an op the table marks unsupported or does not list, or a table
  restriction this module can check on the graph (constant axes, Resize modes,
  the first output only).
- ``type``: graph inputs, outputs and initializers of a type the parser refuses, INT64
  that TensorRT 8.x narrows to INT32 (I/O bindings become int32; values outside int32
  are clamped), DOUBLE that every release narrows to FLOAT.
- ``dynamic-shape``: only the batch axis may be symbolic; engines are built with one
  optimisation profile over the batch (export/tensorrt.py ``stage_profiles``).
- ``qdq``: explicit INT8 as TensorRT takes it: int8 (not uint8) with zero point 0,
  constant scales, per-tensor activations, weights per channel along the output-channel
  axis, every QuantizeLinear followed by DequantizeLinear, and both inputs of a Conv /
  MatMul / Gemm quantized (one quantized side leaves the layer in float).

Severity ``error``: the parser refuses the graph or the engine cannot be built as
quantized; ``warning``: it parses, with a narrowing the user should know of.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from edgederm.runtime.bundle import read_manifest
from edgederm.runtime.errors import EdgeDermError
from edgederm.runtime.targets import TargetProfile, load_target

TABLE_DIR = Path(__file__).resolve().parent / "parser_tables"
STANDARD_DOMAINS = ("", "ai.onnx")
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# Slice starts/ends of "to the end" are written as INT64 extremes; clamping them to int32 keeps their meaning.
CLAMP_SAFE_INPUTS = {("Slice", 1), ("Slice", 2)}
WEIGHT_OPS = {"Conv": 0, "ConvTranspose": 1, "MatMul": -1, "Gemm": None}  # op -> output-channel axis of its weight
# Taken with the limits the tables' notes state (INT32/INT64 narrowed or native, UINT8 at the graph's I/O).
LIMITED_TYPES = ("INT32", "INT64", "UINT8")
TYPE_NAMES = {v: k for k, v in onnx.TensorProto.DataType.items()}
TYPE_ALIASES = {"FP8": "FLOAT8E4M3FN", "INT4": "INT4"}


class LintError(EdgeDermError):
    """A graph or bundle cannot be linted (unreadable, or no table for the target's TensorRT)."""


@dataclass(frozen=True)
class Finding:
    rule: str  # opset | domain | operator | type | dynamic-shape | qdq
    severity: str  # error | warning
    target: str
    graph: str
    node: str
    op: str
    message: str
    fix: str
    reference: str = ""  # the operator-table entry or statement the finding rests on

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class ParserTable:
    """One onnx-tensorrt release's operator support, as transcribed from its docs/operators.md."""

    tensorrt: str
    release: str
    url: str
    min_opset: int
    max_opset: int
    data_types: tuple[str, ...]
    operators: dict[str, dict[str, Any]] = field(default_factory=dict)
    amendments: tuple[dict[str, Any], ...] = ()

    @property
    def narrows_int64(self) -> bool:
        """TensorRT < 9 casts INT64 down to INT32 (onnx-tensorrt Changelog, 9.0 EA)."""
        return "INT64" not in self.data_types

    def entry(self, op: str) -> str:
        row = self.operators.get(op)
        if row is None:
            return f"onnx-tensorrt {self.release} docs/operators.md: {op} not listed"
        text = f"onnx-tensorrt {self.release} docs/operators.md: {op} {'Y' if row.get('supported') else 'N'}"
        if row.get("restrictions"):
            text += f" ({row['restrictions']})"
        amended = [a["source"] for a in self.amendments if a.get("operator") == op]
        return text + (f"; amended: {amended[0]}" if amended else "")


def table_versions() -> list[str]:
    return sorted(p.stem.split("-", 1)[1] for p in TABLE_DIR.glob("tensorrt-*.json"))


@lru_cache(maxsize=None)
def parser_table(tensorrt: str) -> ParserTable:
    """The operator table for TensorRT ``tensorrt`` (major.minor)."""
    path = TABLE_DIR / f"tensorrt-{tensorrt}.json"
    if not path.is_file():
        raise LintError(f"no onnx-tensorrt operator table for TensorRT {tensorrt}; have {', '.join(table_versions())}. "
                        "Fix: point the target profile's onnx.parser_table at one of them")
    data = json.loads(path.read_text(encoding="utf-8"))
    return ParserTable(
        tensorrt=data["tensorrt"], release=data["source"]["release"], url=data["source"]["url"],
        min_opset=int(data["min_opset"]), max_opset=int(data["max_opset"]),
        data_types=tuple(TYPE_ALIASES.get(t, t) for t in data["data_types"]),
        operators=data["operators"], amendments=tuple(data.get("amendments", [])),
    )


# -- graph walking -------------------------------------------------------------------------------
@dataclass
class _Graph:
    """What the rules need from one (sub)graph: constants, producers, consumers."""

    graph: onnx.GraphProto
    constants: dict[str, onnx.TensorProto]
    producers: dict[str, onnx.NodeProto]
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]]

    @classmethod
    def of(cls, graph: onnx.GraphProto, outer: dict[str, onnx.TensorProto] | None = None) -> "_Graph":
        constants = dict(outer or {})
        constants.update({t.name: t for t in graph.initializer})
        producers: dict[str, onnx.NodeProto] = {}
        consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS:
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    constants[node.output[0]] = value
            for out in node.output:
                producers[out] = node
            for i, name in enumerate(node.input):
                consumers.setdefault(name, []).append((node, i))
        return cls(graph, constants, producers, consumers)

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def array(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _node_name(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}->{node.output[0] if node.output else '?'}"


# -- the linter ---------------------------------------------------------------------------------
class _Linter:
    def __init__(self, target: TargetProfile, graph_name: str) -> None:
        self.target = target
        self.table = parser_table(target.parser_table)
        self.graph_name = graph_name
        self.findings: list[Finding] = []

    def add(self, rule: str, severity: str, node: str, op: str, message: str, fix: str, reference: str = "") -> None:
        self.findings.append(Finding(rule, severity, self.target.name, self.graph_name, node, op, message, fix, reference))

    @property
    def trt(self) -> str:
        return f"TensorRT {self.table.tensorrt}"

    # model-level rules
    def opset(self, model: onnx.ModelProto) -> None:
        version = next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), None)
        if version is None:
            return
        ref = f"onnx-tensorrt {self.table.release} docs/operators.md: opset {self.table.min_opset} to {self.table.max_opset}"
        if version > self.table.max_opset:
            self.add("opset", "error", "(model)", f"opset {version}",
                     f"the graph is opset {version}; the {self.trt} parser takes opset {self.table.max_opset} at most",
                     f"re-export with `edgederm export ... --target {self.target.name}` (converts to opset "
                     f"{self.target.max_opset})", ref)
        elif version < self.table.min_opset:
            self.add("opset", "error", "(model)", f"opset {version}",
                     f"the graph is opset {version}; the {self.trt} parser takes opset {self.table.min_opset} and above",
                     "re-export with the current exporter (opset 18)", ref)

    def io_shapes(self, graph: onnx.GraphProto) -> None:
        constants = {t.name for t in graph.initializer}
        for value in graph.input:
            if value.name in constants:
                continue
            tensor = value.type.tensor_type
            if not tensor.HasField("shape"):
                self.add("dynamic-shape", "error", value.name, "(input)", f"input {value.name!r} has no known rank",
                         "export with example inputs of the shape the device feeds")
                continue
            for axis, dim in enumerate(tensor.shape.dim):
                if axis == 0:
                    continue
                if not dim.HasField("dim_value") or dim.dim_value <= 0:
                    self.add("dynamic-shape", "error", value.name, "(input)",
                             f"input {value.name!r} axis {axis} is dynamic ({dim.dim_param or '?'}); engines are built "
                             "with one optimisation profile over the batch axis only",
                             "export with a fixed size for every axis but the batch (the tile or window size)")

    def io_types(self, graph: onnx.GraphProto) -> None:
        constants = {t.name for t in graph.initializer}
        for kind, values in (("input", graph.input), ("output", graph.output)):
            for value in values:
                if value.name in constants:
                    continue
                self._type(TYPE_NAMES.get(value.type.tensor_type.elem_type, "UNDEFINED"), value.name, f"({kind})",
                           f"graph {kind} {value.name!r}", binding=True)

    def _type(self, dtype: str, where: str, op: str, what: str, binding: bool = False) -> None:
        ref = f"onnx-tensorrt {self.table.release} docs/operators.md: data types {', '.join(self.table.data_types)}"
        if dtype == "DOUBLE":
            self.add("type", "warning", where, op, f"{what} is DOUBLE; {self.trt} narrows it to FLOAT (clamped to +-FLT_MAX)",
                     "export in float32", ref)
        elif dtype == "INT64" and self.table.narrows_int64 and binding:
            self.add("type", "warning", where, op, f"{what} is INT64; {self.trt} binds it as INT32",
                     "feed and read it as int32 on the device (values must fit in int32)", ref)
        elif dtype not in (*self.table.data_types, *LIMITED_TYPES, "UNDEFINED"):
            self.add("type", "error", where, op, f"{what} is {dtype}, a type {self.trt} does not take",
                     "cast to float32 / int32 in the model before export", ref)

    def initializers(self, g: _Graph) -> None:
        for tensor in g.graph.initializer:
            dtype = TYPE_NAMES.get(tensor.data_type, "UNDEFINED")
            self._type(dtype, tensor.name, "(initializer)", f"initializer {tensor.name!r}")
            if dtype == "INT64" and self.table.narrows_int64:
                uses = g.consumers.get(tensor.name, [])
                if uses and all((n.op_type, i) in CLAMP_SAFE_INPUTS for n, i in uses):
                    continue
                values = numpy_helper.to_array(tensor)
                if values.size and (values.min() < INT32_MIN or values.max() > INT32_MAX):
                    node = uses[0][0] if uses else None
                    self.add("type", "warning", _node_name(node) if node else tensor.name, node.op_type if node else "",
                             f"INT64 initializer {tensor.name!r} holds values outside int32; {self.trt} clamps them to +-INT_MAX",
                             "keep integer constants within int32", self.table.entry(node.op_type) if node else "")

    # node-level rules
    def node(self, g: _Graph, node: onnx.NodeProto) -> None:
        name, op = _node_name(node), node.op_type
        if node.domain not in STANDARD_DOMAINS:
            self.add("domain", "error", name, f"{node.domain}.{op}",
                     f"{node.domain}.{op} is an ONNX Runtime (or custom) operator; the {self.trt} ONNX parser has no importer for it",
                     _domain_fix(node), f"onnx-tensorrt {self.table.release} docs/operators.md lists ONNX-domain operators only")
            return
        row = self.table.operators.get(op)
        if row is None or not row.get("supported"):
            self.add("operator", "error", name, op,
                     f"{op} is {'not listed' if row is None else 'marked unsupported'} in the {self.trt} parser's operator table",
                     _operator_fix(op, self.target), self.table.entry(op))
            return
        self._restrictions(g, node, name, row)
        if node.op_type == "Cast" and TYPE_NAMES.get(_attr(node, "to", 0)) == "DOUBLE":
            self._type("DOUBLE", name, op, f"Cast {name!r} output")

    def _restrictions(self, g: _Graph, node: onnx.NodeProto, name: str, row: dict[str, Any]) -> None:
        op, text = node.op_type, row.get("restrictions", "")
        ref = self.table.entry(op)
        axes_input = {"Slice": 3, "Squeeze": 1, "Unsqueeze": 1, "Pad": 3}.get(op)
        if axes_input is not None and "`axes` must be" in text and len(node.input) > axes_input \
                and node.input[axes_input] and not g.is_constant(node.input[axes_input]):
            self.add("operator", "error", name, op, f"{op} {name!r} takes its axes from a tensor computed at run time",
                     "make the axes a constant (fold shapes at export)", ref)
        if op == "Resize":
            mode = _attr(node, "mode", b"nearest")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            if mode not in ("nearest", "linear"):
                self.add("operator", "error", name, op, f"Resize {name!r} mode {mode!r}; the parser supports nearest and linear",
                         "use bilinear or nearest interpolation in the model", ref)
            if _attr(node, "antialias", 0):
                self.add("operator", "error", name, op, f"Resize {name!r} antialiases; the parser does not",
                         "interpolate without antialias", ref)
        if "Only the first output" in text and len([o for o in node.output if o]) > 1 \
                and any(g.consumers.get(o) for o in node.output[1:] if o):
            self.add("operator", "error", name, op, f"{op} {name!r} uses outputs beyond the first",
                     "use only the first output", ref)

    # explicit quantization
    def qdq(self, g: _Graph) -> None:
        for node in g.graph.node:
            if node.domain not in STANDARD_DOMAINS or node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                continue
            name, op = _node_name(node), node.op_type
            ref = self.table.entry(op)
            scale = g.array(node.input[1]) if len(node.input) > 1 else None
            if scale is None:
                self.add("qdq", "error", name, op, f"{op} {name!r} scale is not a constant",
                         "calibrate scales into initializers (edgederm quantize does)", ref)
            zero = g.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            qtype = _quantized_type(g, node, zero)
            if qtype is None:
                pass  # a DequantizeLinear of an activation: its QuantizeLinear carries the type
            elif qtype == "INT32" and op == "DequantizeLinear":
                self.add("qdq", "error", name, op, f"DequantizeLinear {name!r} reads a bias quantized to INT32; "
                         f"the {self.trt} parser's DequantizeLinear takes {', '.join(self.table.operators[op]['types'])}",
                         "keep biases float in graphs for TensorRT (ONNX Runtime quantization option QuantizeBias=False)",
                         ref)
            elif qtype != "INT8":
                self.add("qdq", "error", name, op, f"{op} {name!r} quantizes to {qtype}; TensorRT's explicit INT8 is signed int8",
                         "quantize with int8 symmetric activations: `edgederm quantize --activation-type int8`", ref)
            elif zero is not None and np.any(zero != 0):
                self.add("qdq", "error", name, op, f"{op} {name!r} has a non-zero zero point (asymmetric)",
                         "quantize symmetrically: `edgederm quantize --activation-type int8`", ref)
            weight = op == "DequantizeLinear" and g.is_constant(node.input[0])
            if scale is not None and scale.size > 1 and not weight:
                self.add("qdq", "error", name, op, f"{op} {name!r} quantizes an activation per channel",
                         "quantize activations per tensor", ref)
            if weight and scale is not None and scale.size > 1:
                self._weight_axis(g, node, name, ref)
            if op == "QuantizeLinear":
                bad = [n for n, _ in g.consumers.get(node.output[0], []) if n.op_type != "DequantizeLinear"]
                if bad:
                    self.add("qdq", "error", name, op, f"QuantizeLinear {name!r} feeds {bad[0].op_type} "
                             f"{_node_name(bad[0])!r}, not a DequantizeLinear", "pair every QuantizeLinear with a DequantizeLinear",
                             ref)
            elif not weight:
                producer = g.producers.get(node.input[0])
                if producer is None or producer.op_type != "QuantizeLinear":
                    self.add("qdq", "error", name, op, f"DequantizeLinear {name!r} reads {node.input[0]!r}, "
                             "which no QuantizeLinear produces", "pair every DequantizeLinear with a QuantizeLinear", ref)
        self._partial(g)

    def _weight_axis(self, g: _Graph, dq: onnx.NodeProto, name: str, ref: str) -> None:
        axis = int(_attr(dq, "axis", 1))
        rank = len(g.constants[dq.input[0]].dims)
        for user, index in g.consumers.get(dq.output[0], []):
            if user.op_type not in WEIGHT_OPS or index != 1:
                continue
            expected = WEIGHT_OPS[user.op_type]
            if user.op_type == "Gemm":
                expected = 0 if _attr(user, "transB", 0) else 1
            expected = expected % rank if expected is not None else None
            if expected is not None and axis % rank != expected:
                self.add("qdq", "error", name, "DequantizeLinear",
                         f"weight of {user.op_type} {_node_name(user)!r} is quantized per channel along axis {axis}; "
                         f"TensorRT needs the output-channel axis {expected}",
                         f"quantize {user.op_type} weights per channel along axis {expected}", ref)

    def _partial(self, g: _Graph) -> None:
        def quantized(name: str) -> bool:
            producer = g.producers.get(name)
            return producer is not None and producer.op_type == "DequantizeLinear"

        if not any(n.op_type == "DequantizeLinear" for n in g.graph.node):
            return
        for node in g.graph.node:
            if node.op_type in WEIGHT_OPS and node.domain in STANDARD_DOMAINS and len(node.input) > 1:
                sides = [quantized(node.input[0]), quantized(node.input[1])]
                if any(sides) and not all(sides):
                    side = "weights" if sides[1] else "input"
                    self.add("qdq", "warning", _node_name(node), node.op_type,
                             f"{node.op_type} {_node_name(node)!r} has only its {side} quantized; TensorRT runs it in float",
                             "put Q/DQ on both the input and the weights (or neither, to keep it float on purpose)",
                             self.table.entry("DequantizeLinear"))

    def walk(self, graph: onnx.GraphProto, outer: dict[str, onnx.TensorProto] | None = None, top: bool = True) -> None:
        g = _Graph.of(graph, outer)
        if top:
            self.io_shapes(graph)
            self.io_types(graph)
        self.initializers(g)
        for node in graph.node:
            self.node(g, node)
            for sub in _subgraphs(node):
                self.walk(sub, g.constants, top=False)
        self.qdq(g)


def _quantized_type(g: _Graph, node: onnx.NodeProto, zero: np.ndarray | None) -> str | None:
    """The integer type a Q/DQ node quantizes to; None where only its partner node says."""
    if node.op_type == "DequantizeLinear" and g.is_constant(node.input[0]):
        return TYPE_NAMES.get(g.constants[node.input[0]].data_type, "?")
    if zero is not None:
        return TYPE_NAMES.get(g.constants[node.input[2]].data_type, "?")
    if node.op_type == "QuantizeLinear":  # ONNX: without a zero point (or output_dtype) the output is uint8
        return TYPE_NAMES.get(int(_attr(node, "output_dtype", 0)) or onnx.TensorProto.UINT8, "?")
    return None


def _domain_fix(node: onnx.NodeProto) -> str:
    if node.op_type in ("MatMulInteger", "DynamicQuantizeLinear", "Gelu", "FusedMatMul", "QuickGelu", "BiasGelu",
                        "FastGelu", "SkipLayerNormalization", "QGemm", "QLinearConv", "QLinearMatMul"):
        return ("this graph is for ONNX Runtime on CPU (int8_dynamic or ORT-fused); TensorRT builds from the fp32, "
                "fp16 or int8 (QDQ, --activation-type int8) graphs")
    return "export without ONNX Runtime graph fusions, or register a TensorRT plugin of that name"


def _operator_fix(op: str, target: TargetProfile) -> str:
    if op == "LayerNormalization":
        return f"`edgederm export ... --target {target.name}` writes LayerNorm as ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add"
    if op in ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul"):
        return "use the int8 QDQ graph (`edgederm quantize --precision int8 --format qdq --activation-type int8`) for TensorRT"
    return "replace the op in the model with supported ones, or register a TensorRT plugin for it"


def lint_model(model: onnx.ModelProto | str | os.PathLike[str], target: str | TargetProfile,
               graph_name: str | None = None) -> list[Finding]:
    """Findings for one ONNX graph (a ModelProto or a file) against ``target``."""
    profile = load_target(target) if isinstance(target, str) else target
    if not isinstance(model, onnx.ModelProto):
        graph_name = graph_name or Path(model).name
        try:
            model = onnx.load(str(model), load_external_data=False)
        except Exception as exc:
            raise LintError(f"cannot read ONNX graph {graph_name!r} ({type(exc).__name__}: {str(exc)[:200]}); "
                            "an encrypted bundle is linted before `edgederm encrypt`") from exc
    linter = _Linter(profile, graph_name or model.graph.name or "graph")
    linter.opset(model)
    linter.walk(model.graph)
    return linter.findings


def lint_bundle(bundle: str | os.PathLike[str], target: str | TargetProfile,
                precisions: Iterable[str] | None = None) -> list[Finding]:
    """Findings for every graph of every stage (all precisions, or ``precisions``) of ``bundle``."""
    manifest = read_manifest(bundle)
    wanted = set(precisions) if precisions is not None else None
    findings: list[Finding] = []
    for stage in manifest.stages:
        for precision in stage.graphs:
            if wanted is None or precision in wanted:
                path = manifest.graph_path(stage, precision)
                findings += lint_model(path, target, graph_name=path.name)
    return findings


def summarize(findings: list[Finding]) -> list[dict[str, Any]]:
    """One row per (graph, rule, op, message-kind): repeated findings of one op in one graph counted, not listed."""
    rows: dict[tuple[str, ...], dict[str, Any]] = {}
    for f in findings:
        key = (f.graph, f.rule, f.op, f.severity, f.fix)
        row = rows.setdefault(key, {**f.to_dict(), "count": 0})
        row["count"] += 1
    return list(rows.values())

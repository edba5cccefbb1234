"""Per-node profile of a graph as the runtime runs it: where an INT8 graph spends its time.

``edgederm quantize BUNDLE --profile`` and :func:`profile_graph` run one graph with ONNX
Runtime's profiler, under the runtime's session options (all graph optimisations,
the runtime's thread count), and group the node times by operator. The optimised
graph is written too and its operators counted, so the report says what ONNX Runtime
made of the QDQ graph: which Q/DQ pairs were fused into ``QLinearConv`` / ``QGemm`` /
``QLinearMatMul`` / ``MatMulIntegerToFloat``, which stayed as separate
``QuantizeLinear`` / ``DequantizeLinear`` passes, and how many layout ``Transpose`` /
``ReorderInput`` / ``ReorderOutput`` nodes the NHWC and NCHWc transformers added.

Decisions:
- Profiling times every node, which slows small nodes more than large ones; figures
  are shares of the profiled run, meant for comparing operators and graphs, not as
  latencies (``edgederm bench`` measures those).
- Feeds are seeded uniform noise at the graph's own shapes (free dimensions: 1 or
  ``batch``): operator costs depend on shapes, not values.
- Groups: ``quantize`` (QuantizeLinear/DequantizeLinear/DynamicQuantizeLinear),
  ``int8 compute`` (the fused integer kernels), ``layout`` (transposes and NCHWc
  reorders) and ``float`` (everything else), so the overhead of a QDQ graph reads
  at a glance.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgederm.runtime.optional import optional_import

QUANTIZE_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
INT8_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "ConvInteger",
            "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearSigmoid",
            "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearLeakyRelu", "QLinearSoftmax", "QAttention")
LAYOUT_OPS = ("Transpose", "ReorderInput", "ReorderOutput")


def op_group(op: str) -> str:
    """``quantize`` | ``int8 compute`` | ``layout`` | ``float``."""
    op = op.split(" ")[0]
    if op in QUANTIZE_OPS:
        return "quantize"
    if op in INT8_OPS:
        return "int8 compute"
    if op in LAYOUT_OPS:
        return "layout"
    return "float"


@dataclass
class GraphProfile:
    """Node time per operator (profiled runs, summed) and the optimised graph's operators."""

    graph: str
    runs: int
    total_ms: float
    by_op: dict[str, float]  # operator -> ms per run
    calls: dict[str, int]  # operator -> nodes executed per run
    optimized_ops: dict[str, int]  # operator -> count in the optimised graph
    source_ops: dict[str, int] = field(default_factory=dict)  # operator -> count in the graph as stored

    def by_group(self) -> dict[str, float]:
        groups: dict[str, float] = {}
        for op, ms in self.by_op.items():
            groups[op_group(op)] = groups.get(op_group(op), 0.0) + ms
        return groups

    def to_dict(self) -> dict[str, Any]:
        return {"graph": self.graph, "runs": self.runs, "total_ms": round(self.total_ms, 3),
                "by_group_ms": {k: round(v, 3) for k, v in self.by_group().items()},
                "by_op_ms": {k: round(v, 3) for k, v in sorted(self.by_op.items(), key=lambda kv: -kv[1])},
                "calls": self.calls, "optimized_ops": self.optimized_ops, "source_ops": self.source_ops}


def _feeds(session: Any, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}
    feeds = {}
    for spec in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in spec.shape]
        if shape and not isinstance(spec.shape[0], int):
            shape[0] = batch
        dtype = types.get(spec.type, np.float32)
        values = rng.uniform(-1.0, 1.0, size=shape)
        feeds[spec.name] = (values > 0) if dtype is np.bool_ else values.astype(dtype)
    return feeds


def _op_kinds(path: str | os.PathLike[str]) -> dict[str, str]:
    """Node name -> operator, grouped convolutions (depthwise and the like) named apart:
    ONNX Runtime's int8 kernels for them are not its fast GEMM path."""
    onnx = optional_import("onnx", "counting a graph's operators")
    model = onnx.load(str(path), load_external_data=False)
    kinds = {}
    for node in model.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        kinds[node.name] = f"{node.op_type} (grouped)" if "Conv" in node.op_type and group > 1 else node.op_type
    return kinds


def profile_graph(graph: str | os.PathLike[str], *, batch: int = 1, runs: int = 5, threads: int | None = None,
                  feeds: dict[str, np.ndarray] | None = None, seed: int = 0) -> GraphProfile:
    """Profile ``graph`` (a path) under the runtime's CPU session options; ``runs`` timed runs after one warm-up."""
    ort = optional_import("onnxruntime", "profiling a graph")
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads or min(2, os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        optimized = Path(tmp) / "optimized.onnx"
        options.optimized_model_filepath = str(optimized)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        feed = feeds if feeds is not None else _feeds(session, batch, seed)
        session.run(None, feed)  # warm-up: first-run allocations and kernel set-up stay out of the figures
        for _ in range(runs):
            session.run(None, feed)
        trace = Path(session.end_profiling())
        events = json.loads(trace.read_text())
        kinds = _op_kinds(optimized)
    by_op: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    model_runs: list[float] = []
    for event in events:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            model_runs.append(event["dur"] / 1000.0)
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        node = str(event["name"])[:-len("_kernel_time")]
        op = kinds.get(node, event.get("args", {}).get("op_name", "?"))
        by_op[op] += event["dur"] / 1000.0
        calls[op] += 1
    timed = runs + 1
    # The warm-up run is in the trace too; drop its share by scaling to the timed runs' mean.
    scale = 1.0 / timed
    return GraphProfile(graph=Path(graph).name, runs=runs,
                        total_ms=float(np.median(model_runs[1:])) if len(model_runs) > 1 else sum(by_op.values()) * scale,
                        by_op={op: ms * scale for op, ms in by_op.items()},
                        calls={op: n // timed for op, n in calls.items()},
                        optimized_ops=dict(Counter(kinds.values())),
                        source_ops=dict(Counter(_op_kinds(graph).values())))


def format_profiles(profiles: dict[str, GraphProfile], top: int = 12) -> str:
    """A side-by-side table (ms per run) of the groups and the costliest operators of each profile."""
    names = list(profiles)
    ops: Counter[str] = Counter()
    for p in profiles.values():
        ops.update(p.by_op)
    width = max(12, *(len(n) for n in names))
    lines = [f"{'':<28}" + "".join(f"{n:>{width + 2}}" for n in names)]
    lines.append(f"{'run (median, ms)':<28}" + "".join(f"{p.total_ms:>{width + 2}.2f}" for p in profiles.values()))
    for group in ("int8 compute", "quantize", "layout", "float"):
        lines.append(f"{'group: ' + group:<28}" + "".join(f"{p.by_group().get(group, 0.0):>{width + 2}.2f}"
                                                          for p in profiles.values()))
    for op, _ in ops.most_common(top):
        cells = "".join(f"{p.by_op.get(op, 0.0):>{width - 6}.2f} ({p.calls.get(op, 0):>3})" for p in profiles.values())
        lines.append(f"{op:<28}" + cells)
    lines.append("optimised graph operators (count):")
    counted: Counter[str] = Counter()
    for p in profiles.values():
        counted.update(p.optimized_ops)
    for op, _ in counted.most_common(top):
        lines.append(f"  {op:<26}" + "".join(f"{p.optimized_ops.get(op, 0):>{width + 2}}" for p in profiles.values()))
    return "\n".join(lines)


def profile_bundle(bundle: str | os.PathLike[str], precisions: list[str] | None = None, *, batch: int | None = None,
                   runs: int = 5, threads: int | None = None) -> dict[str, dict[str, GraphProfile]]:
    """Profile every stage of ``bundle`` in each of ``precisions`` (default: all it holds).

    ``batch`` None: the tiled stage's batch (tiles or windows per run), 1 for other stages.
    Returns ``{stage: {precision: GraphProfile}}``.
    """
    from edgederm.runtime.bundle import read_manifest
    from edgederm.runtime.errors import InputError

    manifest = read_manifest(bundle)
    held = manifest.precisions()
    wanted = precisions or held
    missing = [p for p in wanted if p not in held]
    if missing:
        raise InputError(f"bundle {manifest.root} has no {', '.join(missing)} graphs; it holds {', '.join(held)}. "
                         f"Fix: pick from those, or run `edgederm quantize {manifest.root} --precision {missing[0]}`")
    tiled = manifest.tiled_stage
    out: dict[str, dict[str, GraphProfile]] = {}
    for stage in manifest.stages:
        size = batch or (manifest.tiling.batch_size if tiled is not None and stage.name == tiled.name else 1)
        out[stage.name] = {p: profile_graph(manifest.graph_path(stage, p), batch=size, runs=runs, threads=threads)
                           for p in wanted}
    return out

"""Per-node INT8 sensitivity, and the fallback that returns damaging nodes to float.

Method (decisions):
- The graph is quantized once. Returning a node to float is graph surgery on that
  QDQ graph, not a new calibration: the node's activation inputs are rewired from
  their DequantizeLinear to the float tensor the QuantizeLinear read, and its
  weight/bias inputs to the float initializers of the prepared fp32 graph (matched by
  node name: ``quantize_static`` keeps node names). Unused Q/DQ nodes are dropped.
  The calibrated ranges of every other tensor are unchanged, so what the search
  measured is exactly the graph that is written.
- Sensitivity of a node = the damage it does *alone*: relative output error
  ||y_int8 - y_fp32|| / ||y_fp32|| of the stage on the calibration batches when only
  that node is INT8 (all others float). A node whose error is spread over many
  layers is not singled out; an outlier-dominated layer is. Bounded in time
  (``max_seconds``): nodes not measured by then keep an unknown score and are
  ranked after the measured ones, in graph order.
- Fallback: nodes are returned to float in decreasing sensitivity, 1, 2, 3, 4, 6, 8,
  12, ... at a time (each step one evaluation of the caller's agreement function),
  until the agreement reaches the target; then the smallest count in the last
  interval that reaches it is found by bisection. If even an all-float stage misses
  the target, the search says so and returns what it reached.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .fidelity import relative_error
from .graphs import QUANTIZED_OPS, return_to_float

log = logging.getLogger(__name__)

# Calibration batches each node is measured on: one (8 rows). Every measurement runs the
# whole stage (a ViT-S window encoder: ~1 s of CPU per 8 windows), so within the time
# budget one batch ranks four times as many nodes as four batches did.
SENSITIVITY_BATCHES = 1


def quantized_nodes(model: Any, op_types: Sequence[str] = QUANTIZED_OPS) -> list[str]:
    """Names of the nodes that read at least one input through a DequantizeLinear, in graph order."""
    producers = {out: node for node in model.graph.node for out in node.output}
    names = []
    for node in model.graph.node:
        if node.op_type in op_types and any(
            producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in node.input
        ):
            names.append(node.name)
    return names


def only_quantized(qdq_model: Any, float_model: Any, node: str, all_nodes: Sequence[str]) -> Any:
    return return_to_float(qdq_model, float_model, [n for n in all_nodes if n != node])


def run_graph(model: Any, feeds: Sequence[dict[str, np.ndarray]], threads: int = 2) -> list[np.ndarray]:
    """First output of ``model`` (an in-memory ModelProto) on each feed, on ORT CPU."""
    from edgederm.runtime.backends.onnxruntime import cpu_session

    session = cpu_session(model, threads)
    name = session.get_outputs()[0].name
    return [session.run([name], feed)[0] for feed in feeds]


def node_sensitivity(qdq_model: Any, float_model: Any, feeds: Sequence[dict[str, np.ndarray]],
                     max_seconds: float = 60.0, say: Callable[[str], None] = lambda m: None) -> dict[str, float | None]:
    """Relative output error with only each node in INT8 (None = not measured within ``max_seconds``)."""
    nodes = quantized_nodes(qdq_model)
    reference = np.concatenate([o.ravel() for o in run_graph(float_model, feeds)])
    scores: dict[str, float | None] = {n: None for n in nodes}
    start = time.monotonic()
    for k, node in enumerate(nodes):
        if time.monotonic() - start > max_seconds:
            say(f"  sensitivity: time budget {max_seconds:.0f} s spent after {k}/{len(nodes)} nodes; the rest are ranked last")
            break
        single = only_quantized(qdq_model, float_model, node, nodes)
        out = np.concatenate([o.ravel() for o in run_graph(single, feeds)])
        scores[node] = relative_error(reference, out)
        if (k + 1) % 25 == 0:
            say(f"  sensitivity: {k + 1}/{len(nodes)} nodes")
    return scores


def rank(scores: dict[str, float | None]) -> list[str]:
    """Most damaging first; unmeasured nodes last, in graph order."""
    order = list(scores)
    return sorted(order, key=lambda n: (scores[n] is None, -(scores[n] or 0.0), order.index(n)))


@dataclass
class FallbackResult:
    excluded: list[Any]  # indices into the ranking until the caller names them
    agreement: float
    reached: bool
    target: float
    initial_agreement: float
    evaluations: list[tuple[int, float]] = field(default_factory=list)
    sensitivity: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self, top: int = 10) -> dict[str, Any]:
        ranked = rank(self.sensitivity)[:top]
        return {
            "target_agreement": self.target, "reached": self.reached, "agreement": self.agreement,
            "agreement_all_int8": self.initial_agreement, "nodes_to_exclude": list(self.excluded),
            "steps": [{"excluded": k, "agreement": a} for k, a in self.evaluations],
            "most_sensitive": [{"node": n, "relative_error": self.sensitivity[n]} for n in ranked],
        }


def _counts(total: int) -> list[int]:
    counts, k = [], 1
    while k < total:
        counts.append(k)
        k = k + 1 if k < 4 else int(k * 1.5)
    counts.append(total)
    return counts


def fallback(count: int, evaluate: Callable[[int], float], target: float,
             say: Callable[[str], None] = lambda m: None, measure: str = "agreement") -> FallbackResult:
    """Smallest k (of ``count`` ranked nodes) with ``evaluate(k) >= target``; ``evaluate(k)`` =
    agreement with the first k ranked nodes returned to float. Says so when none reaches it."""
    cache: dict[int, float] = {}

    def at(k: int) -> float:
        if k not in cache:
            cache[k] = evaluate(k)
            say(f"  fallback: {k} node(s) in float -> {measure} {cache[k]:.4f} (target {target:.4f})")
        return cache[k]

    def result(k: int, reached: bool) -> FallbackResult:
        return FallbackResult(list(range(k)), cache[k], reached, target, cache[0], sorted(cache.items()))

    if at(0) >= target:
        return result(0, True)
    previous = 0
    for k in _counts(count):
        if at(k) >= target:
            lo, hi = previous, k  # lo misses, hi reaches
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if at(mid) >= target:
                    hi = mid
                else:
                    lo = mid
            return result(hi, True)
        previous = k
    best = max(cache, key=lambda kk: (cache[kk], -kk))
    say(f"  fallback: target {measure} {target:.4f} NOT reached; best {cache[best]:.4f} with {best} node(s) in float")
    return result(best, False)

"""``quantize --gate``: accept a reduced-precision graph on clinical metrics, not agreement alone.

A gate is a comma list of terms ``METRIC>=CHANGE`` or ``METRIC<=CHANGE``, each bounding
the change of an evaluate metric (edgederm.evaluate.stats: ``sensitivity[melanoma]``,
``auroc``, ``ece``, ``malignant_sensitivity``, ...) against fp32 on the labelled
evaluation split: ``sensitivity[melanoma]>=-0.01`` allows melanoma sensitivity to
drop by at most 0.01, ``ece<=+0.01`` ECE to rise by at most 0.01.

Decisions:

* The reduced graph is measured as the device will run it: with its own refitted
  temperature and review thresholds (calibration/clinical.py), so ECE and the
  malignant operating point are judged after refitting, as deployed.
* Slack of a term: how far inside its bound the change is (negative: violated); the
  gate's slack is the smallest. The per-node fallback looks for the fewest float nodes
  with slack >= 0, by the same search as the agreement target (doubling, then
  bisection, as Polygraphy's ``debug precision`` does), over the nodes ranked by
  their output error.
* A metric undefined on the split (melanoma sensitivity without a melanoma) cannot
  gate: refused up front, with the split's class counts.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from edgederm.evaluate.stats import Cases, point_metrics
from edgederm.runtime.errors import InputError

_TERM = re.compile(r"^\s*([A-Za-z_]+(?:\[[^\]]+\])?)\s*(>=|<=)\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*$")
EXAMPLE = "sensitivity[melanoma]>=-0.01,auroc>=-0.005,ece<=+0.01"


@dataclass(frozen=True)
class GateTerm:
    metric: str
    op: str  # ">=" or "<="
    bound: float  # on the change against fp32

    def slack(self, change: float) -> float:
        return change - self.bound if self.op == ">=" else self.bound - change

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.bound:+g}"


def parse_gate(spec: str) -> list[GateTerm]:
    terms = []
    for part in [p for p in str(spec).split(",") if p.strip()]:
        match = _TERM.match(part)
        if not match:
            raise InputError(f"gate term {part.strip()!r} is not METRIC>=CHANGE or METRIC<=CHANGE; "
                             f"example: --gate \"{EXAMPLE}\"")
        terms.append(GateTerm(match.group(1), match.group(2), float(match.group(3))))
    if not terms:
        raise InputError(f"--gate {spec!r} has no terms; example: --gate \"{EXAMPLE}\"")
    return terms


def clinical_metrics(results: Sequence[Any], labels: Sequence[int], class_names: Sequence[str],
                     malignant: Sequence[str]) -> dict[str, float]:
    """Every evaluate metric of runtime Results against their labels."""
    names = list(class_names)
    rows = [{"label": names[int(y)], "predicted": r.label, "probabilities": r.probabilities,
             "needs_review": r.needs_review, "review_reasons": r.review_reasons} for r, y in zip(results, labels)]
    return point_metrics(Cases.from_records(rows, names, malignant))


def check_defined(terms: Sequence[GateTerm], reference: Mapping[str, float], labels: Sequence[int],
                  class_names: Sequence[str]) -> None:
    for term in terms:
        if term.metric not in reference:
            raise InputError(f"gate metric {term.metric!r} is not known; known: {', '.join(sorted(reference))}")
        if math.isnan(reference[term.metric]):
            counts = dict(zip(class_names, np.bincount(np.asarray(labels, np.int64), minlength=len(class_names)).tolist()))
            raise InputError(f"gate metric {term.metric!r} is undefined on the evaluation split (classes: {counts}); "
                             "Fix: --eval a labelled folder with every class the gate names")


def gate_table(terms: Sequence[GateTerm], reference: Mapping[str, float],
               metrics: Mapping[str, float]) -> tuple[float, list[dict[str, Any]]]:
    """(the gate's slack, one row per term: fp32 value, value, change, bound, passed)."""
    rows: list[dict[str, Any]] = []
    slacks: list[float] = []
    for term in terms:
        value = metrics.get(term.metric, math.nan)
        change = value - reference[term.metric]
        slack = term.slack(change) if not math.isnan(change) else -math.inf
        slacks.append(slack)
        rows.append({"term": str(term), "metric": term.metric, "fp32": reference[term.metric], "value": value,
                     "change": change, "slack": slack, "passed": slack >= 0})
    return min(slacks), rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [f"  {'gate term':<32} {'fp32':>8} {'value':>8} {'change':>9}  passed"]
    for r in rows:
        lines.append(f"  {r['term']:<32} {r['fp32']:8.4f} {r['value']:8.4f} {r['change']:+9.4f}  "
                     f"{'yes' if r['passed'] else 'NO'}")
    return lines

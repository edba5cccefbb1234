"""Metrics per subgroup (a metadata field, or skin tone) and the largest gap between groups.

Decisions:

* A numeric field with more than 8 distinct values is banded: ``age`` in the bands
  registries report (<30, 30-44, 45-59, 60-74, 75+), any other field in quartiles of
  the evaluated cases. Missing values are their own group (``missing``).
* Groups with fewer than ``min_cases`` cases (default 10) are listed but not compared:
  their intervals are too wide for a gap to mean anything.
* For each metric the gap is best minus worst group value among compared groups. It is
  flagged when it is at least ``min_gap`` (default 0.05) and the two groups' 95%
  intervals do not overlap; the field's largest flagged gap (else its largest gap) is
  the one the report leads with.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from edgederm.evaluate.stats import Cases, metrics_with_ci

#: Metrics compared between groups (the rest are in the per-group tables of the JSON).
COMPARED = ("accuracy", "balanced_accuracy", "malignant_sensitivity", "auroc", "ece", "review_rate")
#: Metrics where lower is better.
LOWER_IS_BETTER = frozenset({"ece", "brier", "review_rate"})
AGE_BANDS = ((30, "<30"), (45, "30-44"), (60, "45-59"), (75, "60-74"), (math.inf, "75+"))


def group_values(field: str, values: Sequence[Any]) -> list[str]:
    """The subgroup name of each case for ``field`` (module docstring)."""
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and not
               (isinstance(v, float) and math.isnan(v))]
    banded = len(numbers) == sum(v is not None for v in values) and len(set(numbers)) > 8
    if banded and field.lower() in ("age", "age_approx"):
        return [next(name for bound, name in AGE_BANDS if v < bound) if v is not None else "missing" for v in values]
    if banded:
        q = np.quantile(np.asarray(numbers, np.float64), [0.25, 0.5, 0.75])
        edges = [float(min(numbers)), *map(float, q), float(max(numbers))]

        def band(v: float) -> str:
            i = min(3, int(np.searchsorted(q, v, side="right")))
            return f"Q{i + 1} [{edges[i]:g}, {edges[i + 1]:g}]"

        return [band(v) if v is not None else "missing" for v in values]
    return ["missing" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in values]


def subgroup_metrics(cases: Cases, groups: Sequence[str], n_boot: int, seed: int, min_cases: int = 10,
                     min_gap: float = 0.05) -> dict[str, Any]:
    """Per group: cases and every metric with its CI; per compared metric: the gap."""
    names = sorted(set(groups), key=lambda g: (g == "missing", g))
    per_group: dict[str, Any] = {}
    arr = np.asarray(groups, dtype=object)
    for g in names:
        idx = np.flatnonzero(arr == g)
        per_group[g] = {"n": int(len(idx)), "compared": len(idx) >= min_cases,
                        "metrics": metrics_with_ci(cases.take(idx), n_boot, seed)}
    gaps: dict[str, Any] = {}
    for metric in COMPARED:
        rows = [(g, per_group[g]["metrics"].get(metric)) for g in names if per_group[g]["compared"]]
        rows = [(g, m) for g, m in rows if m is not None and m["value"] is not None]
        if len(rows) < 2:
            continue
        lower = metric in LOWER_IS_BETTER
        best = min(rows, key=lambda r: r[1]["value"]) if lower else max(rows, key=lambda r: r[1]["value"])
        worst = max(rows, key=lambda r: r[1]["value"]) if lower else min(rows, key=lambda r: r[1]["value"])
        gap = abs(best[1]["value"] - worst[1]["value"])
        b_lo, b_hi = best[1]["ci"]
        w_lo, w_hi = worst[1]["ci"]
        separated = None not in (b_lo, b_hi, w_lo, w_hi) and (w_hi < b_lo if not lower else w_lo > b_hi)
        gaps[metric] = {"best": best[0], "worst": worst[0], "best_value": best[1]["value"],
                        "worst_value": worst[1]["value"], "gap": gap, "flagged": bool(gap >= min_gap and separated)}
    largest = None
    if gaps:
        flagged = [m for m, g in gaps.items() if g["flagged"]]
        largest = max(flagged or list(gaps), key=lambda m: gaps[m]["gap"])
    return {"groups": per_group, "gaps": gaps, "largest_gap": largest,
            "flagged": bool(largest is not None and gaps[largest]["flagged"])}

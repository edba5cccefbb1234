"""``evaluate(bundle, data)``: every precision of a bundle on labelled data, summarised.

The result is one JSON-able dict (what ``evaluation.json`` holds): per precision the
metrics with their intervals, the confusion matrix, reliability bins, ROC points,
referral figures, segmentation figures and subgroups; then every metric side by side
across precisions with its change against fp32.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from edgederm.evaluate.case import SKIN_TONE
from edgederm.evaluate.runner import (
    EvaluateOptions,
    bundle_precisions,
    dataset_id,
    iter_rows,
    manifest_sha256,
    read_evaluation_data,
    run_precision,
)
from edgederm.evaluate.skin import METHOD as SKIN_METHOD
from edgederm.evaluate.stats import (
    ECE_BINS,
    Cases,
    metrics_with_ci,
    referral,
    reliability,
    roc_curves,
    segmentation_summary,
)
from edgederm.evaluate.subgroups import group_values, subgroup_metrics
from edgederm.metrics import confusion_matrix
from edgederm.runtime import load
from edgederm.runtime.errors import InputError


def malignant_classes(model: Any, requested: Sequence[str] | None) -> list[str]:
    """``requested``, else the bundle's ``clinical.malignant_classes``, else the known malignant names."""
    from edgederm.runtime.safety import default_malignant_classes

    names = list(requested) if requested else list(model.manifest.clinical.settings.get("malignant_classes") or
                                                  default_malignant_classes(model.class_names))
    unknown = [n for n in names if n not in model.class_names]
    if unknown:
        raise InputError(f"--malignant names {unknown}, which the model does not have; its classes: "
                         f"{model.class_names}")
    return names


def group_column(rows: Sequence[Mapping[str, Any]], field: str) -> list[str]:
    if field == SKIN_TONE:
        return [row.get(SKIN_TONE, {}).get("skin_tone") or "missing" for row in rows]
    return group_values(field, [row["metadata"].get(field) for row in rows])


def summarise(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str], malignant: Sequence[str], task: str,
              by: Sequence[str], n_boot: int, seed: int) -> dict[str, Any]:
    """Every number of one precision from its case rows."""
    ok, failed = iter_rows(rows)
    out: dict[str, Any] = {"cases": len(rows), "evaluated": len(ok),
                           "failed": [{"id": r["id"], "error": r["error"]} for r in failed]}
    if task == "segment":
        out["segmentation"] = segmentation_summary([r["segmentation"] for r in ok if "segmentation" in r], n_boot, seed)
        return out
    cases = Cases.from_records(ok, class_names, malignant)
    out["metrics"] = metrics_with_ci(cases, n_boot, seed)
    out["confusion_matrix"] = confusion_matrix(cases.labels, cases.predicted, len(class_names)).tolist()
    out["reliability"] = reliability(cases)
    out["roc"] = roc_curves(cases)
    out["referral"] = referral(cases)
    out["subgroups"] = {field: subgroup_metrics(cases, group_column(ok, field), n_boot, seed) for field in by}
    if SKIN_TONE in by:
        sources = [r.get(SKIN_TONE, {}).get("skin_tone_source") for r in ok]
        out["skin_tone_sources"] = {s or "missing": sources.count(s) for s in set(sources)}
    return out


def compare(per_precision: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{metric: {precision: {"value", "change"}}}``, change against fp32 (or the first precision)."""
    if not per_precision:
        return {}
    reference = "fp32" if "fp32" in per_precision else next(iter(per_precision))

    def scalars(summary: Mapping[str, Any]) -> dict[str, Any]:
        if "segmentation" in summary:
            return {k: v for k, v in summary["segmentation"].items() if isinstance(v, dict)}
        return dict(summary.get("metrics", {}))

    base = scalars(per_precision[reference])
    table: dict[str, dict[str, Any]] = {}
    for precision, summary in per_precision.items():
        for metric, entry in scalars(summary).items():
            ref = base.get(metric, {}).get("value")
            value = entry["value"]
            change = value - ref if value is not None and ref is not None else None
            table.setdefault(metric, {})[precision] = {"value": value, "ci": entry.get("ci"), "change": change}
    return {"reference": reference, "metrics": table}  # type: ignore[dict-item]


def evaluate(bundle: str | os.PathLike[str], data: str | os.PathLike[str], folder: str | os.PathLike[str],
             options: EvaluateOptions | None = None) -> dict[str, Any]:
    """Evaluate ``bundle`` on ``data`` (any layout the readers know); partial results in ``folder/cases``."""
    options = options or EvaluateOptions()
    bundle = str(bundle)
    probe = load(bundle, backend=options.backend, precision="fp32")
    available = bundle_precisions(probe)
    precisions = list(options.precisions or available)
    missing = [p for p in precisions if p not in available]
    if missing:
        raise InputError(f"bundle {bundle} has no {missing} graphs; it has {available}. Fix: --precision "
                         f"{','.join(available)} (or all), or add them with `edgederm quantize`")
    task = probe.task
    class_names = list(probe.class_names)
    malignant = malignant_classes(probe, options.malignant) if task != "segment" else []
    del probe
    dataset = read_evaluation_data(data, class_names, task, options.layout, options.limit)
    data_id = dataset_id(dataset)
    per_precision = {}
    for precision in precisions:
        rows = run_precision(bundle, precision, dataset, Path(folder), options, data_id)
        per_precision[precision] = summarise(rows, class_names, malignant, task, options.by, options.n_boot,
                                             options.seed)
    return {
        "bundle": {"path": str(Path(bundle).resolve()), "manifest_sha256": manifest_sha256(bundle), "task": task,
                   "class_names": class_names},
        "data": {"path": str(Path(data).resolve()), "layout": dataset.layout, "images": len(dataset),
                 "classes": dataset.class_counts() if task != "segment" else None},
        "method": {
            "bootstrap": {"replicates": options.n_boot, "seed": options.seed, "level": 0.95,
                          "kind": "percentile, cases resampled with replacement"},
            "ece_bins": ECE_BINS, "malignant_classes": malignant,
            "malignant_operating_point": "top class malignant, or referred with possible_malignancy "
                                         "(the bundle's P(malignant) threshold)",
            "skin_tone": SKIN_METHOD if SKIN_TONE in options.by else None,
            "by": list(options.by), "backend": options.backend,
        },
        "precisions": per_precision,
        "comparison": compare(per_precision),
    }

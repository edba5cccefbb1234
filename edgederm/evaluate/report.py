"""The evaluation report: ``evaluation.json`` (every number), PNG plots and one HTML page.

The page is self-contained: inline CSS, no script, the plots embedded as ``data:`` URIs
(the same PNGs are written beside it for documents that cite them). Plots are drawn
with matplotlib's Agg backend: reliability diagram, one-vs-rest ROC per class,
confusion matrix, coverage-risk curve per precision, and a forest plot per subgroup
field. Every file is written atomically.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from edgederm.runtime.bundle import write_bytes_atomic, write_json_atomic

#: Metrics shown in the precision table, in this order (the JSON has them all).
HEADLINE = ("accuracy", "balanced_accuracy", "auroc", "malignant_sensitivity", "malignant_specificity", "ece",
            "brier", "review_rate")
CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
.worse{color:#b00020}.better{color:#006b3c}.flag{background:#fde7e9;font-weight:600}
.note{color:#555;font-size:.9em}img{max-width:100%;border:1px solid #eee;margin:.4em 0}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plots figure{margin:0;flex:1 1 420px}
"""


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value))


def _ci(entry: Mapping[str, Any] | None) -> str:
    if not entry:
        return "n/a"
    lo, hi = (entry.get("ci") or [None, None])[:2]
    ci = f" ({_fmt(lo)}-{_fmt(hi)})" if lo is not None and hi is not None else ""
    return _fmt(entry.get("value")) + ci


class _Plots:
    """PNG files beside the page; each also kept as a data URI for the page."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.uris: dict[str, str] = {}

    def add(self, name: str, draw: Callable[[Any], None], size: tuple[float, float] = (5.2, 4.2)) -> str:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=size, dpi=100)
        try:
            draw(fig)
            fig.tight_layout()
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png")
        finally:
            plt.close(fig)
        data = buffer.getvalue()
        write_bytes_atomic(self.folder / f"{name}.png", data)
        self.uris[name] = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        return name

    def img(self, name: str, alt: str) -> str:
        return f'<figure><img src="{self.uris[name]}" alt="{html.escape(alt)}"><figcaption class="note">{name}.png</figcaption></figure>'


def _reliability(summaries: Mapping[str, Any]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
        for precision, s in summaries.items():
            bins = [b for b in s["reliability"] if b["n"]]
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-",
                    label=f"{precision} (ECE {_fmt(s['metrics']['ece']['value'])})")
        ax.set_xlabel("confidence (top calibrated probability)")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        ax.set_title("Reliability diagram")
    return draw


def _roc(summary: Mapping[str, Any], precision: str) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        for name, curve in summary["roc"].items():
            auc = summary["metrics"].get(f"auroc[{name}]", {}).get("value")
            ax.step(curve["fpr"], curve["tpr"], where="post", label=f"{name} (AUROC {_fmt(auc)})")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.legend(fontsize=8, loc="lower right")
        ax.set_title(f"ROC, one vs rest ({precision})")
    return draw


def _confusion(summary: Mapping[str, Any], names: list[str], precision: str) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        import numpy as np

        cm = np.asarray(summary["confusion_matrix"])
        ax = fig.add_subplot(1, 1, 1)
        ax.imshow(cm, cmap="Blues")
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"Confusion matrix ({precision})")
    return draw


def _coverage(summaries: Mapping[str, Any]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        for precision, s in summaries.items():
            curve = s["referral"]["coverage_risk"]
            ax.plot(curve["coverage"], curve["risk"], label=precision)
            accepted = s["referral"]["accepted"]
            if accepted["n"] and accepted["accuracy"] is not None:
                ax.plot([accepted["n"] / s["evaluated"]], [1 - accepted["accuracy"]], "x", ms=9,
                        label=f"{precision}: cases not referred")
        ax.set_xlabel("coverage (most confident cases kept)")
        ax.set_ylabel("risk (error rate among kept)")
        ax.set_xlim(0, 1)
        ax.legend(fontsize=8)
        ax.set_title("Coverage-risk")
    return draw


def _forest(subgroup: Mapping[str, Any], field: str, metric: str) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        groups = [(g, e) for g, e in subgroup["groups"].items() if e["metrics"].get(metric, {}).get("value") is not None]
        for y, (g, e) in enumerate(groups):
            m = e["metrics"][metric]
            lo, hi = m["ci"]
            colour = "#b00020" if subgroup["gaps"].get(metric, {}).get("worst") == g else "#1f77b4"
            if lo is not None and hi is not None:
                ax.plot([lo, hi], [y, y], "-", color=colour)
            ax.plot([m["value"]], [y], "s", color=colour)
        ax.set_yticks(range(len(groups)), [f"{g} (n={e['n']})" for g, e in groups])
        ax.invert_yaxis()
        ax.set_xlabel(f"{metric} (95% CI)")
        ax.set_title(f"{metric} by {field}")
    return draw


def write_report(evaluation: Mapping[str, Any], folder: str | os.PathLike[str]) -> Path:
    """Write evaluation.json, the PNGs and report.html into ``folder``; the page's path."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "evaluation.json", evaluation)
    plots = _Plots(out)
    summaries = evaluation["precisions"]
    names = evaluation["bundle"]["class_names"]
    classified = {p: s for p, s in summaries.items() if "metrics" in s}
    parts = [f"<h1>Clinical evaluation of {html.escape(Path(evaluation['bundle']['path']).name)}</h1>",
             _overview(evaluation)]
    if classified:
        parts.append(_findings(evaluation, classified))
        parts.append(_precision_table(evaluation))
        parts.append(_per_class_table(classified, names))
        reference = evaluation["comparison"]["reference"]
        figures = [plots.add("reliability", _reliability(classified)), plots.add("coverage_risk", _coverage(classified))]
        figures += [plots.add(f"roc_{p}", _roc(s, p)) for p, s in classified.items()]
        figures += [plots.add(f"confusion_{p}", _confusion(s, names, p)) for p, s in classified.items()]
        parts.append("<h2>Plots</h2><div class='plots'>" + "".join(plots.img(f, f) for f in figures) + "</div>")
        parts.append(_referral(classified))
        parts.append(_subgroups(classified[reference] if reference in classified else next(iter(classified.values())),
                                evaluation, plots))
    else:
        parts.append(_segmentation(evaluation))
    parts.append(_methods(evaluation))
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>EdgeDerm evaluation</title>"
            f"<style>{CSS}</style></head><body>" + "\n".join(parts) + "</body></html>")
    write_bytes_atomic(out / "report.html", page.encode("utf-8"))
    return out / "report.html"


def _overview(ev: Mapping[str, Any]) -> str:
    data = ev["data"]
    failed = {p: len(s["failed"]) for p, s in ev["precisions"].items() if s["failed"]}
    classes = ", ".join(f"{k} {v}" for k, v in (data.get("classes") or {}).items())
    return (f"<p>Bundle <code>{html.escape(ev['bundle']['path'])}</code> (manifest sha256 "
            f"<code>{ev['bundle']['manifest_sha256'][:16]}</code>, task {ev['bundle']['task']}) on "
            f"<code>{html.escape(data['path'])}</code> ({data['layout']} layout, {data['images']} images"
            f"{'; ' + html.escape(classes) if classes else ''}); precisions {', '.join(ev['precisions'])}, run "
            f"through the EdgeDerm runtime on the {html.escape(ev['method']['backend'])} backend. "
            + (f"<b>Cases the runtime refused:</b> {failed}." if failed else "") + "</p>")


def _findings(ev: Mapping[str, Any], summaries: Mapping[str, Any]) -> str:
    """What a reader must not miss: flagged subgroup gaps, and headline metrics that moved against fp32."""
    items = []
    for precision, summary in summaries.items():
        for field, sub in (summary.get("subgroups") or {}).items():
            if sub["flagged"]:
                gap = sub["gaps"][sub["largest_gap"]]
                items.append(f"<li class='flag'>{precision}: {html.escape(field)}: {sub['largest_gap']} "
                             f"{_fmt(gap['worst_value'])} in {html.escape(gap['worst'])} vs {_fmt(gap['best_value'])} in "
                             f"{html.escape(gap['best'])} (gap {_fmt(gap['gap'])}, intervals apart)</li>")
    comparison = ev["comparison"]
    for metric in HEADLINE:
        for precision, entry in comparison["metrics"].get(metric, {}).items():
            change = entry.get("change")
            if precision != comparison["reference"] and change is not None and abs(change) >= 0.01:
                items.append(f"<li>{precision}: {metric} {change:+.4f} against {comparison['reference']}</li>")
    body = "".join(items) or "<li>No flagged subgroup gap; no headline metric moved by 0.01 or more against fp32.</li>"
    return f"<h2>Findings</h2><ul>{body}</ul>"


def _precision_table(ev: Mapping[str, Any]) -> str:
    comp = ev["comparison"]
    precisions = list(ev["precisions"])
    ref = comp["reference"]
    head = "".join(f"<th>{p}</th>" + (f"<th>change vs {ref}</th>" if p != ref else "") for p in precisions)
    rows = []
    for metric in HEADLINE:
        entry = comp["metrics"].get(metric)
        if not entry:
            continue
        cells = []
        for p in precisions:
            e = entry.get(p, {})
            cells.append(f"<td>{_ci(e)}</td>")
            if p != ref:
                change = e.get("change")
                lower = metric in ("ece", "brier", "review_rate")
                cls = "" if change is None or abs(change) < 5e-5 else ("worse" if (change > 0) == lower else "better")
                cells.append(f"<td class='{cls}'>{'n/a' if change is None else f'{change:+.4f}'}</td>")
        rows.append(f"<tr><td>{metric}</td>{''.join(cells)}</tr>")
    return (f"<h2>Every precision side by side</h2><p class='note'>Value (95% bootstrap CI); change against {ref}. "
            f"All per-class metrics are in evaluation.json.</p><table><tr><th>metric</th>{head}</tr>"
            + "".join(rows) + "</table>")


def _per_class_table(summaries: Mapping[str, Any], names: list[str]) -> str:
    out = ["<h2>Per class</h2>"]
    for p, s in summaries.items():
        rows = []
        for c in names:
            cells = "".join(f"<td>{_ci(s['metrics'].get(f'{m}[{c}]'))}</td>"
                            for m in ("sensitivity", "specificity", "ppv", "npv", "f1", "auroc"))
            rows.append(f"<tr><td>{html.escape(c)}</td>{cells}</tr>")
        out.append(f"<h3>{p}</h3><table><tr><th>class</th><th>sensitivity</th><th>specificity</th><th>PPV</th>"
                   f"<th>NPV</th><th>F1</th><th>AUROC</th></tr>{''.join(rows)}</table>")
    return "".join(out)


def _referral(summaries: Mapping[str, Any]) -> str:
    rows = []
    for p, s in summaries.items():
        r = s["referral"]
        reasons = ", ".join(f"{html.escape(k)} {v:.1%}" for k, v in r["rate"].items()) or "none"
        rows.append(f"<tr><td>{p}</td><td>{_fmt(r['any'])}</td><td>{reasons}</td>"
                    f"<td>{r['accepted']['n']}: {_fmt(r['accepted']['accuracy'])} / "
                    f"{_fmt(r['accepted']['malignant_sensitivity'])}</td>"
                    f"<td>{r['referred']['n']}: {_fmt(r['referred']['accuracy'])} / "
                    f"{_fmt(r['referred']['malignant_sensitivity'])}</td></tr>")
    return ("<h2>Referral (needs_review)</h2><table><tr><th>precision</th><th>referred</th><th>rate per reason</th>"
            "<th>accepted: n: accuracy / malignant sensitivity</th><th>referred: n: accuracy / malignant "
            "sensitivity</th></tr>" + "".join(rows) + "</table>")


def _subgroups(summary: Mapping[str, Any], ev: Mapping[str, Any], plots: _Plots) -> str:
    if not summary.get("subgroups"):
        return ""
    out = [f"<h2>Subgroups ({ev['comparison']['reference']})</h2>"]
    for field, sub in summary["subgroups"].items():
        largest = sub["largest_gap"]
        if largest:
            gap = sub["gaps"][largest]
            verdict = ("<p class='flag'>Largest gap, flagged" if sub["flagged"] else "<p>Largest gap (not flagged: "
                       "intervals overlap or under 0.05)")
            out.append(f"<h3>{html.escape(field)}</h3>{verdict}: {largest} {_fmt(gap['best_value'])} in "
                       f"{html.escape(gap['best'])} vs {_fmt(gap['worst_value'])} in {html.escape(gap['worst'])} "
                       f"(gap {_fmt(gap['gap'])}).</p>")
            out.append("<div class='plots'>" + plots.img(plots.add(f"forest_{_safe(field)}", _forest(sub, field, largest),
                                                                   (5.2, 1.2 + 0.35 * len(sub["groups"]))),
                                                         f"forest plot {field}") + "</div>")
        else:
            out.append(f"<h3>{html.escape(field)}</h3><p>Fewer than two groups large enough to compare.</p>")
        metrics = [m for m in ("accuracy", "balanced_accuracy", "malignant_sensitivity", "auroc", "ece", "review_rate")]
        head = "".join(f"<th{' class=flag' if sub['gaps'].get(m, {}).get('flagged') else ''}>{m}</th>" for m in metrics)
        rows = "".join(f"<tr><td>{html.escape(g)}</td><td>{e['n']}</td>"
                       + "".join(f"<td>{_ci(e['metrics'].get(m))}</td>" for m in metrics) + "</tr>"
                       for g, e in sub["groups"].items())
        out.append(f"<table><tr><th>group</th><th>n</th>{head}</tr>{rows}</table>")
    if summary.get("skin_tone_sources"):
        out.append(f"<p class='note'>Skin tone sources: {html.escape(json.dumps(summary['skin_tone_sources']))}</p>")
    return "".join(out)


def _segmentation(ev: Mapping[str, Any]) -> str:
    rows = []
    for p, s in ev["precisions"].items():
        seg = s["segmentation"]
        change = ev["comparison"]["metrics"]
        cells = "".join(f"<td>{_ci(seg[m])}</td><td>{_fmt(change.get(m, {}).get(p, {}).get('change'), 4)}</td>"
                        for m in ("dice", "iou", "hd95"))
        rows.append(f"<tr><td>{p}</td><td>{seg['images']}</td>{cells}<td>{seg['hd95_undefined_images']}</td></tr>")
    return ("<h2>Segmentation (mean per image, 95% CI)</h2><table><tr><th>precision</th><th>images</th><th>Dice</th>"
            "<th>change</th><th>IoU</th><th>change</th><th>HD95 (px)</th><th>change</th><th>HD95 undefined</th></tr>"
            + "".join(rows) + "</table>")


def _methods(ev: Mapping[str, Any]) -> str:
    m = ev["method"]
    b = m["bootstrap"]
    items = [f"Confidence intervals: {b['kind']}, {b['replicates']} replicates, seed {b['seed']}, level {b['level']}.",
             f"ECE: {m['ece_bins']} equal-width confidence bins (Guo et al. 2017); Brier: multi-class, sum over classes.",
             f"Malignant classes: {', '.join(m['malignant_classes']) or 'none'}; operating point: "
             f"{m['malignant_operating_point']}.",
             "Subgroup gaps: best minus worst group among groups of at least 10 cases; flagged when at least 0.05 "
             "and the two 95% intervals do not overlap."]
    if m.get("skin_tone"):
        items.append(m["skin_tone"])
    return "<h2>Method</h2><ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>"


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)

"""Clinical evaluation of a bundle on labelled data, through the runtime a device runs.

``evaluate(bundle, data, folder, EvaluateOptions(...))`` returns every number (per
precision: per-class sensitivity, specificity, PPV, NPV, F1, AUROC with bootstrap
intervals; ECE, reliability and Brier; referral; segmentation; subgroups with the
largest gap flagged; each metric's change against fp32); ``write_report`` turns it
into evaluation.json, PNG plots and one self-contained HTML page. No torch.
"""
from edgederm.evaluate.evaluation import evaluate
from edgederm.evaluate.report import write_report
from edgederm.evaluate.runner import EvaluateOptions

__all__ = ["evaluate", "EvaluateOptions", "write_report"]

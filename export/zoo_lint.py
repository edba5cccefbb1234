"""The parser lint over the model zoo: every stage of every model against every target.

Each stage is exported once at the exporter's opset (18, random seeded weights: the
lint reads the graph's structure, not its values), then linted as exported and after
:func:`~edgederm.export.target_forms.to_target_forms` for each target (what
``edgederm export --target`` writes). scripts/lint_zoo.py turns the rows into
docs/lint.md; the tests compare them with the findings expected from the tables.
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import onnx

from edgederm.runtime.targets import load_target

from .lint import Finding, lint_model
from .target_forms import to_target_forms


@dataclass
class ZooLintRow:
    model: str
    stage: str
    target: str
    exported: list[Finding]  # the graph as the exporter writes it
    with_target: list[Finding]  # after `export --target`'s rewrites
    rewrites: dict[str, int]

    @staticmethod
    def counts(findings: Iterable[Finding]) -> dict[tuple[str, str], int]:
        return dict(Counter((f.rule, f.op) for f in findings))


def export_zoo_graphs(names: Iterable[str], out_dir: Path, say: Callable[[str], None] = lambda m: None
                      ) -> list[tuple[str, str, Path]]:
    """(model, stage, graph file) for every stage of ``names``, exported at the default opset."""
    import torch

    from edgederm.models import create_model
    from edgederm.models.base import EdgeDermModel

    from .onnx import export_stage_onnx

    graphs = []
    for name in names:
        torch.manual_seed(0)
        model = create_model(name).eval()
        assert isinstance(model, EdgeDermModel)
        for stage in model.export_stages():
            path = out_dir / f"{name}.{stage.name}.onnx"
            if not path.is_file():
                say(f"exporting {name} / {stage.name}")
                export_stage_onnx(stage, path)
            graphs.append((name, stage.name, path))
    return graphs


def lint_graphs(graphs: list[tuple[str, str, Path]], targets: Iterable[str]) -> list[ZooLintRow]:
    rows = []
    for name, stage, path in graphs:
        exported = onnx.load(str(path))
        for target in targets:
            profile = load_target(target)
            adapted = copy.deepcopy(exported)
            forms = to_target_forms(adapted, profile)
            rows.append(ZooLintRow(name, stage, target, lint_model(exported, profile, path.name),
                                   lint_model(adapted, profile, path.name), forms.rewrites))
    return rows

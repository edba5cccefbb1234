"""Facts about registered models for ``edgederm models``: parameters, GMACs, stages."""
from __future__ import annotations

from typing import Any

import torch

from .registry import create_model, list_models, model_entry


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gmacs(model: torch.nn.Module) -> float:
    """Multiply-accumulates of one forward pass on the model's own input (batch 1), in G."""
    from torch.utils.flop_counter import FlopCounterMode

    stages = model.export_stages(batch=1)  # type: ignore[operator]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        for stage in stages:
            stage.module.eval()(*stage.inputs.values())
    return counter.get_total_flops() / 2e9


def model_table(pattern: str = "*", paper_size: bool | None = None, macs: bool = True) -> list[dict[str, Any]]:
    rows = []
    for name in list_models(pattern, paper_size=paper_size):
        model = create_model(name).eval()
        rows.append({
            "name": name,
            "family": model_entry(name).family,
            "task": model.task,
            "modalities": "+".join(model.modalities),
            "params_m": round(count_parameters(model) / 1e6, 2),
            "input": "x".join(str(s) for s in model.input_size),
            "gmacs": round(count_gmacs(model), 3) if macs else "",
            "stages": ",".join(s.name for s in model.export_stages(batch=1)),
        })
    return rows

"""What every EdgeDerm model declares, so export and runtime need no per-model code.

A model says its task, the modalities it takes, its input size and class names, and
the graphs it exports (:meth:`EdgeDermModel.export_stages`). The default is one
stage, ``classifier``: dermoscopy (N x 3 x H x W) -> logits (N x K), batch dynamic.
Hierarchical models (RemixFormer++) override it with several stages.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn


@dataclass
class ExportStage:
    """One graph of a model: the module to export and how to call it."""

    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    # Input name -> axes that are dynamic (always the batch axis 0 here).
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    # Inputs the runtime feeds from the image (pixels) vs from metadata etc.
    image_inputs: list[str] = field(default_factory=list)
    # Where the runtime takes each input from: "dermoscopy" (preprocessed image or
    # tiles), "dermoscopy_windows" (the window grid of a hierarchical model),
    # "clinical", "metadata" (schema-encoded vector), or "<stage>.<output>" (an
    # earlier stage's output). Defaults: image inputs from "dermoscopy", others by name.
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.dynamic_axes:
            self.dynamic_axes = {k: {0: "batch"} for k in self.inputs}
        for name in self.inputs:
            self.sources.setdefault(name, "dermoscopy" if name in self.image_inputs else name)


class EdgeDermModel(nn.Module):
    task: str = "classify"  # "classify" | "segment"
    modalities: tuple[str, ...] = ("dermoscopy",)
    # A schema dict (edgederm.runtime.metadata) for models that take metadata.
    metadata_schema: dict | None = None

    def __init__(self, num_classes: int, img_size: int, class_names: Sequence[str] | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.img_size = img_size
        names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
        if len(names) != num_classes:
            raise ValueError(f"{len(names)} class names given for {num_classes} classes")
        self.class_names = names

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.img_size, self.img_size)

    def sample_input(self, batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, 3, self.img_size, self.img_size)

    def example_inputs(self, batch: int = 2) -> dict[str, torch.Tensor]:
        """Keyword inputs of ``forward`` (the whole model), for tests and training."""
        inputs = {"dermoscopy": self.sample_input(batch)}
        if "metadata" in self.modalities:
            inputs["metadata"] = torch.rand(batch, self.metadata_dim)
        return inputs

    @property
    def metadata_dim(self) -> int:
        schema = getattr(self, "metadata_schema", None)
        if schema is None:
            return 0
        from edgederm.runtime.metadata import load_schema

        return load_schema(schema).dim

    def export_stages(self, batch: int = 2) -> list[ExportStage]:
        output = "mask_logits" if self.task == "segment" else "logits"
        name = "segmenter" if self.task == "segment" else "classifier"
        return [ExportStage(name, self, self.example_inputs(batch), [output], image_inputs=["dermoscopy"])]

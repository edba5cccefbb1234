"""Tiny models shared by the tests.

TinyNet, a classifier for trainer tests: three strided convolutions with GroupNorm.

GroupNorm instead of BatchNorm so that data-parallel ranks, each seeing half the
batch, compute exactly what one process computes on the whole batch; and small
enough that a few epochs on 2 CPU cores take seconds.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from edgederm.models.base import EdgeDermModel


class TinyNet(nn.Module):
    task = "classify"
    modalities = ("dermoscopy",)
    model_name = None  # not in the registry: built through train(model_factory=...)

    def __init__(self, num_classes: int = 3, class_names: Sequence[str] | None = None, width: int = 12,
                 img_size: int = 32) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
        self.input_size = (img_size, img_size)
        self.model_kwargs = {"num_classes": num_classes, "class_names": self.class_names, "width": width, "img_size": img_size}
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in (width, 2 * width, 2 * width):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(1, c_out), nn.GELU()]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, dermoscopy: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(dermoscopy).mean(dim=(2, 3)))


def tiny_net(**kwargs: object) -> TinyNet:
    return TinyNet(**kwargs)  # type: ignore[arg-type]


class TinySegNet(nn.Module):
    """Two 3x3 convolutions to 2 classes (background, lesion) at full resolution."""

    task = "segment"
    modalities = ("dermoscopy",)
    model_name = None

    def __init__(self, num_classes: int = 2, class_names: Sequence[str] | None = None, width: int = 8,
                 img_size: int = 32) -> None:
        super().__init__()
        self.class_names = list(class_names) if class_names is not None else ["background", "lesion"]
        self.input_size = (img_size, img_size)
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.GroupNorm(1, width), nn.GELU(),
                                  nn.Conv2d(width, num_classes, 3, padding=1))

    def forward(self, dermoscopy: torch.Tensor) -> torch.Tensor:
        return self.body(dermoscopy)


def tiny_seg_net(**kwargs: object) -> TinySegNet:
    return TinySegNet(**kwargs)  # type: ignore[arg-type]


class ConvSegmenter(EdgeDermModel):
    """Two convolutions, seeded weights; ``kernel`` 1 = pointwise, 3 = receptive radius 2."""

    task = "segment"

    def __init__(self, kernel: int = 3, hidden: int = 8, img_size: int = 64, seed: int = 0) -> None:
        super().__init__(2, img_size, ["background", "lesion"])
        generator = torch.Generator().manual_seed(seed)
        self.c1 = nn.Conv2d(3, hidden, kernel, padding=kernel // 2)
        self.c2 = nn.Conv2d(hidden, 2, kernel, padding=kernel // 2)
        with torch.no_grad():
            for conv in (self.c1, self.c2):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.4)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.1)

    def forward(self, dermoscopy: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.c1(dermoscopy)))

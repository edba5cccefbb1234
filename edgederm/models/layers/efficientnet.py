"""EfficientNetV2 backbone (Tan & Le, "EfficientNetV2: Smaller Models and Faster
Training", ICML 2021): stem, Fused-MBConv early stages, MBConv + SE later stages,
1x1 head conv. Used by TransXV2S-Net's first branch.

Reference for weights: **torchvision** ``efficientnet_v2_s`` (not timm's
``tf_efficientnetv2_s``): torchvision pads symmetrically (k // 2), so the graph has
no dynamic "same" padding, and its layout is the paper's Table 4. BatchNorm eps is
1e-3 and the activation SiLU, as in torchvision. The SE squeeze width is
``max(1, block_input_channels // 4)`` (torchvision's rule: SE ratio 0.25 of the
block's *input* channels, not of the expanded width).

Our parameter names say what a thing is (``stem``, ``stages.i.j.expand``,
``depthwise``, ``se.reduce``, ``project``, ``head``); :meth:`EfficientNetV2.
torchvision_key_map` maps torchvision's ``features.s.b.block.i`` names onto them for
:func:`edgederm.models.pretrained.load_mapped` (strict both ways; the classifier is
dropped). ``stage_outputs`` exposes every stage's feature map so a model can tap
an intermediate stage (TransXV2S-Net taps stage 4).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .regularization import DropPath

BN_EPS = 1e-3  # torchvision / TF EfficientNet value


@dataclass(frozen=True)
class StageConfig:
    """One stage: block type, expansion ratio, kernel, stride, output channels, depth."""

    block: str  # "fused" (Fused-MBConv) | "mbconv" (MBConv with SE)
    expand: int
    kernel: int
    stride: int
    channels: int
    depth: int


# EfficientNetV2-S, the paper's Table 4 (= torchvision efficientnet_v2_s): stages 1-6.
EFFICIENTNETV2_S: tuple[StageConfig, ...] = (
    StageConfig("fused", 1, 3, 1, 24, 2),
    StageConfig("fused", 4, 3, 2, 48, 4),
    StageConfig("fused", 4, 3, 2, 64, 4),
    StageConfig("mbconv", 4, 3, 2, 128, 6),
    StageConfig("mbconv", 6, 3, 1, 160, 9),
    StageConfig("mbconv", 6, 3, 2, 256, 15),
)


def conv_bn_act(in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                act: bool = True) -> nn.Sequential:
    """Conv (no bias, symmetric k//2 padding) -> BN(eps 1e-3) -> optional SiLU.

    A Sequential so the keys are ``.0.weight`` / ``.1.running_mean``, like torchvision's
    Conv2dNormActivation.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels, eps=BN_EPS),
    ]
    if act:
        layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class SqueezeExciteSiLU(nn.Module):
    """EfficientNet SE: mean pool -> 1x1 reduce -> SiLU -> 1x1 expand -> sigmoid gate.

    (layers.attention.SqueezeExcite uses ReLU and sizes the bottleneck from its own
    channels; EfficientNet needs SiLU and a bottleneck sized from the block input.)
    """

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.expand(self.act(self.reduce(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class FusedMBConv(nn.Module):
    """k x k conv (expand, strided) -> 1x1 project; with expand 1 a single k x k conv."""

    def __init__(self, in_channels: int, out_channels: int, expand: int, kernel: int, stride: int,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.residual = stride == 1 and in_channels == out_channels
        hidden = in_channels * expand
        if expand == 1:
            self.conv = conv_bn_act(in_channels, out_channels, kernel, stride)
            self.expand = self.project = None
        else:
            self.conv = None
            self.expand = conv_bn_act(in_channels, hidden, kernel, stride)
            self.project = conv_bn_act(hidden, out_channels, 1, act=False)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            y = self.conv(x)
        else:
            y = self.project(self.expand(x))  # type: ignore[misc]
        return x + self.drop_path(y) if self.residual else y


class MBConv(nn.Module):
    """1x1 expand -> depthwise k x k (strided) -> SE -> 1x1 project, residual if shapes match."""

    def __init__(self, in_channels: int, out_channels: int, expand: int, kernel: int, stride: int,
                 drop_path: float = 0.0, se_ratio: float = 0.25) -> None:
        super().__init__()
        self.residual = stride == 1 and in_channels == out_channels
        hidden = in_channels * expand
        self.expand = conv_bn_act(in_channels, hidden, 1)
        self.depthwise = conv_bn_act(hidden, hidden, kernel, stride, groups=hidden)
        self.se = SqueezeExciteSiLU(hidden, max(1, int(in_channels * se_ratio)))
        self.project = conv_bn_act(hidden, out_channels, 1, act=False)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + self.drop_path(y) if self.residual else y


class EfficientNetV2(nn.Module):
    """Stem (stride 2) -> stages 1..6 -> 1x1 head conv; no pooling, no classifier.

    ``stages`` holds stages 1..6 (``stages[3]`` is the paper's stage 4). The default
    configuration is EfficientNetV2-S: 20.18 M parameters (torchvision's 21.46 M minus
    its 1.28 M classifier).
    """

    def __init__(self, stages: Sequence[StageConfig | Sequence] = EFFICIENTNETV2_S, stem_channels: int = 24,
                 head_channels: int | None = 1280, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        # plain tuples (block, expand, kernel, stride, channels, depth) are accepted so a
        # configuration can live in JSON (checkpoint model_kwargs)
        self.configs = tuple(c if isinstance(c, StageConfig) else StageConfig(*c) for c in stages)
        self.stem = conv_bn_act(3, stem_channels, 3, 2)
        total = sum(c.depth for c in self.configs)
        index = 0
        in_channels = stem_channels
        self.stages = nn.ModuleList()
        self.out_channels: list[int] = []
        for config in self.configs:
            blocks = []
            for j in range(config.depth):
                # torchvision's linear stochastic-depth schedule over all blocks
                rate = drop_path_rate * index / total
                block_cls: Callable[..., nn.Module] = FusedMBConv if config.block == "fused" else MBConv
                blocks.append(block_cls(in_channels, config.channels, config.expand, config.kernel,
                                        config.stride if j == 0 else 1, rate))
                in_channels = config.channels
                index += 1
            self.stages.append(nn.Sequential(*blocks))
            self.out_channels.append(in_channels)
        self.head = conv_bn_act(in_channels, head_channels, 1) if head_channels else None
        self.num_features = head_channels or in_channels
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's EfficientNet init (kaiming fan_out for convs, BN to 1/0)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def stage_strides(self) -> list[int]:
        """Cumulative stride after each stage (stem included): [2, 4, 8, 16, 16, 32] for V2-S."""
        stride, out = 2, []
        for config in self.configs:
            stride *= config.stride
            out.append(stride)
        return out

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps after stages 1..6 (before the head conv)."""
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Final feature map (after the head conv when there is one)."""
        x = self.stage_outputs(x)[-1]
        return self.head(x) if self.head is not None else x

    def torchvision_key_map(self) -> Callable[[str], str | None]:
        """torchvision ``efficientnet_v2_*`` key -> ours (classifier dropped)."""
        kinds = [c.block for c in self.configs]
        expands = [c.expand for c in self.configs]
        last = len(self.configs) + 1  # features index of the head conv
        block_re = re.compile(r"features\.(\d+)\.(\d+)\.block\.(\d+)\.(.+)")

        def key_map(key: str) -> str | None:
            if key.startswith("classifier."):
                return None
            if key.startswith("features.0."):
                return "stem." + key[len("features.0."):]
            if key.startswith(f"features.{last}."):
                return "head." + key[len(f"features.{last}."):]
            match = block_re.fullmatch(key)
            if match is None:
                return key  # unknown: load_mapped reports it
            stage, block, part, rest = int(match[1]) - 1, match[2], int(match[3]), match[4]
            if kinds[stage] == "fused":
                names = ["conv"] if expands[stage] == 1 else ["expand", "project"]
            else:
                names = ["expand", "depthwise", "se", "project"]
                rest = rest.replace("fc1.", "reduce.").replace("fc2.", "expand.") if names[part] == "se" else rest
            return f"stages.{stage}.{block}.{names[part]}.{rest}"

        return key_map

"""Xception backbone (Chollet, "Xception: Deep Learning with Depthwise Separable
Convolutions", CVPR 2017): entry flow, middle flow, exit flow of separable convs.
Used by TransXV2S-Net's second branch.

Layout and numerics follow the original Keras/Cadene port that timm ships as
``legacy_xception`` (timm's older name ``xception``): stem convs without padding
(3x3 stride 2, then 3x3), entry blocks 128/256/728 with a strided max-pool and a
1x1 strided shortcut, 8 middle blocks of three separable convs at 728, exit block
728 -> 1024 (the channel grows on the *last* separable conv), then separable convs to
1536 and 2048. Separable conv = depthwise 3x3 then pointwise 1x1, both without
bias, BatchNorm after the pointwise (eps 1e-5). 20.81 M parameters without the
classifier (timm's 22.86 M minus the 2.05 M fc).

Our names say where a thing is (``stem``, ``blocks.i.separables.j.depthwise``,
``blocks.i.norms.j``, ``blocks.i.shortcut``, ``exit_convs``); :func:`timm_xception_key_map`
maps timm's ``block{n}.rep.{i}`` names onto them for
:func:`edgederm.models.pretrained.load_mapped`. ``blocks`` is a ModuleList so a model
can insert a module after every block (TransXV2S-Net's DCGA).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn


class SeparableConv2d(nn.Module):
    """Depthwise k x k -> pointwise 1x1, no bias (the BN that follows has one)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, kernel, 1, kernel // 2, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


@dataclass(frozen=True)
class BlockConfig:
    in_channels: int
    out_channels: int
    reps: int
    stride: int
    start_with_relu: bool = True
    grow_first: bool = True


def xception_blocks(widths: Sequence[int] = (64, 128, 256, 728, 1024), middle_blocks: int = 8,
                    middle_reps: int = 3) -> tuple[BlockConfig, ...]:
    """Block configs: 3 entry blocks, ``middle_blocks`` middle blocks, 1 exit block.

    ``widths`` = (stem output, entry 1, entry 2, entry 3 / middle, exit block output).
    """
    stem, e1, e2, mid, exit_ = widths
    return (
        BlockConfig(stem, e1, 2, 2, start_with_relu=False),
        BlockConfig(e1, e2, 2, 2),
        BlockConfig(e2, mid, 2, 2),
        *[BlockConfig(mid, mid, middle_reps, 1) for _ in range(middle_blocks)],
        BlockConfig(mid, exit_, 2, 2, grow_first=False),
    )


class XceptionBlock(nn.Module):
    """[ReLU] -> (separable conv -> BN) x reps with ReLUs between -> [max-pool], + shortcut."""

    def __init__(self, config: BlockConfig) -> None:
        super().__init__()
        c = config
        self.start_with_relu = c.start_with_relu
        self.separables = nn.ModuleList()
        self.norms = nn.ModuleList()
        for i in range(c.reps):
            if c.grow_first:
                in_ch, out_ch = (c.in_channels if i == 0 else c.out_channels), c.out_channels
            else:
                in_ch, out_ch = c.in_channels, (c.in_channels if i < c.reps - 1 else c.out_channels)
            self.separables.append(SeparableConv2d(in_ch, out_ch))
            self.norms.append(nn.BatchNorm2d(out_ch))
        self.pool = nn.MaxPool2d(3, c.stride, 1) if c.stride != 1 else None
        if c.stride != 1 or c.in_channels != c.out_channels:
            self.shortcut: nn.Module | None = nn.Sequential(
                nn.Conv2d(c.in_channels, c.out_channels, 1, c.stride, bias=False), nn.BatchNorm2d(c.out_channels))
        else:
            self.shortcut = None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for i, (separable, norm) in enumerate(zip(self.separables, self.norms)):
            if i > 0 or self.start_with_relu:
                y = self.act(y)
            y = norm(separable(y))
        if self.pool is not None:
            y = self.pool(y)
        return y + (x if self.shortcut is None else self.shortcut(x))


class Xception(nn.Module):
    """Stem -> ``blocks`` (entry, middle, exit) -> separable 1536 -> 2048; no pooling/classifier."""

    def __init__(self, widths: Sequence[int] = (64, 128, 256, 728, 1024), middle_blocks: int = 8,
                 exit_widths: Sequence[int] = (1536, 2048), stem_channels: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_channels, 3, 2, 0, bias=False), nn.BatchNorm2d(stem_channels), nn.ReLU(),
            nn.Conv2d(stem_channels, widths[0], 3, 1, 0, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(),
        )
        self.configs = xception_blocks(widths, middle_blocks)
        self.blocks = nn.ModuleList(XceptionBlock(c) for c in self.configs)
        self.block_channels = [c.out_channels for c in self.configs]
        layers: list[nn.Module] = []
        in_ch = widths[-1]
        for out_ch in exit_widths:
            layers += [SeparableConv2d(in_ch, out_ch), nn.BatchNorm2d(out_ch), nn.ReLU()]
            in_ch = out_ch
        self.exit_convs = nn.Sequential(*layers)
        self.num_features = in_ch

    def block_resolutions(self, img_size: int) -> list[int]:
        """Side length after each block for a square ``img_size`` input (static arithmetic)."""
        side = (img_size - 3) // 2 + 1  # 3x3 stride 2, no padding
        side = side - 2  # 3x3 stride 1, no padding
        if side < 1:
            raise ValueError(f"input {img_size} px is too small for the Xception stem; use at least 7 px")
        out = []
        for c in self.configs:
            if c.stride != 1:
                side = (side + 2 - 3) // c.stride + 1  # max-pool 3, padding 1
            out.append(side)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.exit_convs(x)


def timm_xception_key_map(model: Xception, prefix: str = ""):
    """timm ``legacy_xception`` key -> ours (``fc`` dropped). ``prefix`` is prepended."""
    stem = {"conv1.": "stem.0.", "bn1.": "stem.1.", "conv2.": "stem.3.", "bn2.": "stem.4."}
    exit_ = {}
    for i in range(len(model.exit_convs) // 3):
        exit_[f"conv{3 + i}.conv1."] = f"exit_convs.{3 * i}.depthwise."
        exit_[f"conv{3 + i}.pointwise."] = f"exit_convs.{3 * i}.pointwise."
        exit_[f"bn{3 + i}."] = f"exit_convs.{3 * i + 1}."
    # Position of each separable conv / BN inside timm's ``rep`` Sequential:
    # [ReLU,] Sep, BN, ReLU, Sep, BN, ... (block 1 has no leading ReLU).
    rep_index: dict[tuple[int, int], str] = {}
    for b, config in enumerate(model.configs):
        offset = 1 if config.start_with_relu else 0
        for j in range(config.reps):
            rep_index[(b, offset + 3 * j)] = f"separables.{j}"
            rep_index[(b, offset + 3 * j + 1)] = f"norms.{j}"
    block_re = re.compile(r"block(\d+)\.(skip|skipbn|rep\.(\d+))\.(.+)")

    def key_map(key: str) -> str | None:
        if key.startswith("fc."):
            return None
        for old, new in {**stem, **exit_}.items():
            if key.startswith(old):
                return prefix + new + key[len(old):]
        match = block_re.fullmatch(key)
        if match is None:
            return prefix + key  # unknown: load_mapped reports it
        b, part, rest = int(match[1]) - 1, match[2], match[4]
        if part == "skip":
            return f"{prefix}blocks.{b}.shortcut.0.{rest}"
        if part == "skipbn":
            return f"{prefix}blocks.{b}.shortcut.1.{rest}"
        target = rep_index.get((b, int(match[3])))
        if target is None:
            return prefix + key
        rest = rest.replace("conv1.", "depthwise.")
        return f"{prefix}blocks.{b}.{target}.{rest}"

    return key_map

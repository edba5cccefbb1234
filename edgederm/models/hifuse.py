"""HiFuse: local (conv) + global (Swin) branches with hierarchical feature fusion.

Huo et al., "HiFuse: Hierarchical multi-scale feature fusion network for medical
image classification", Biomedical Signal Processing and Control 87 (2024); official
code github huoxiangzuo/HiFuse (main_model.py). Decisions (docs/models.md, section 5):
- global branch: Swin, patch 4, window attention block = attention -> Linear + GELU
  with one residual (``SwinBlock(mlp="linear_gelu")``); local branch: ConvNeXt-like
  blocks depthwise 3x3 -> LayerNorm -> Linear -> GELU with a residual;
- HFF block per stage: spatial attention (7x7) on the local feature, channel
  attention (reduction 16, the official value; an article's reconstruction uses 4) on the
  global feature, fusion with the previous HFF output, IRMLP with a shortcut;
- IRMLP's first conv is depthwise as the paper describes (``dense_irmlp=False``);
  ``dense_irmlp=True`` reproduces the official code, whose helper ignores ``group``
  (Tiny: 119.7 M parameters dense vs 56.3 M depthwise);
- the input size is a constructor argument (224 in the paper) because Swin masks are
  buffers built for a fixed resolution; the SDK's ``hifuse_tiny`` uses 128 / window 8.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import EdgeDermModel
from .layers import ChannelAttention, ConvNormAct, DropPath, LayerNorm2d, PatchEmbed, PatchMerging, SpatialAttention, SwinStage
from .layers.vit import init_linear
from .registry import register_model


class LocalBlock(nn.Module):
    """Depthwise 3x3 -> LayerNorm -> Linear -> GELU, with a residual."""

    def __init__(self, dim: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.act(self.pwconv(self.norm(y))).permute(0, 3, 1, 2)
        return x + self.drop_path(y)


class IRMLP(nn.Module):
    """Inverted residual MLP: 3x3 conv (+residual) -> BN -> 1x1 expand x4 -> GELU -> 1x1."""

    def __init__(self, in_dim: int, out_dim: int, dense: bool = False, expansion: int = 4) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(in_dim, in_dim, 3, groups=1 if dense else in_dim, norm=False, act=None)
        self.conv2 = ConvNormAct(in_dim, in_dim * expansion, 1, norm=False, act=None)
        self.conv3 = ConvNormAct(in_dim * expansion, out_dim, 1, norm=True, act=None)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.act(self.conv1(x)) + x)
        return self.conv3(self.act(self.conv2(x)))


class HFFBlock(nn.Module):
    """Hierarchical feature fusion of one stage (local l, global g, previous fusion f)."""

    def __init__(self, dim: int, reduction: int = 16, first: bool = False, dense_irmlp: bool = False, drop_path: float = 0.0) -> None:
        super().__init__()
        self.first = first
        self.project_local = ConvNormAct(dim, dim, 1, act=None)
        self.project_global = ConvNormAct(dim, dim, 1, act=None)
        self.spatial = SpatialAttention(7)
        self.channel = ChannelAttention(dim, reduction)
        if first:
            self.norm_merge = LayerNorm2d(2 * dim)
            self.merge = ConvNormAct(2 * dim, dim, 1, act=None)
        else:
            # The previous fusion has half the channels at twice the resolution.
            self.previous = nn.Sequential(ConvNormAct(dim // 2, dim, 1), nn.AvgPool2d(2, 2))
            self.norm_merge = LayerNorm2d(3 * dim)
            self.merge = ConvNormAct(3 * dim, dim, 1, act=None)
        self.act = nn.GELU()
        self.norm_out = LayerNorm2d(3 * dim)
        self.irmlp = IRMLP(3 * dim, dim, dense=dense_irmlp)
        self.drop_path = DropPath(drop_path)

    def forward(self, local: torch.Tensor, global_: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        parts = [self.project_local(local), self.project_global(global_)]
        if self.first:
            shortcut: torch.Tensor | float = 0.0
        else:
            assert previous is not None
            prev = self.previous(previous)
            shortcut = prev
            parts.insert(0, prev)
        merged = self.act(self.merge(self.norm_merge(torch.cat(parts, dim=1))))
        fused = torch.cat([self.channel(global_), self.spatial(local), merged], dim=1)
        return shortcut + self.drop_path(self.irmlp(self.norm_out(fused)))


class HiFuse(EdgeDermModel):
    def __init__(
        self,
        num_classes: int = 3,
        img_size: int = 224,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 2, 2),
        heads: Sequence[int] = (3, 6, 12, 24),
        window: int = 7,
        hff_reduction: int = 16,
        dense_irmlp: bool = False,
        drop_path_rate: float = 0.0,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(num_classes, img_size, class_names)
        if img_size % 32:
            raise ValueError(f"img_size {img_size} must be a multiple of 32 (patch 4, three 2x merges)")
        dims = [embed_dim * 2**i for i in range(4)]
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        # Global branch (Swin).
        self.patch_embed = PatchEmbed(4, 3, embed_dim)
        self.global_stages = nn.ModuleList()
        self.global_merges = nn.ModuleList()
        # Local branch (conv).
        self.local_downsample = nn.ModuleList()
        self.local_stages = nn.ModuleList()
        self.fusions = nn.ModuleList()
        start = 0
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            side = img_size // 4 // 2**i
            if i > 0:
                self.global_merges.append(PatchMerging(dims[i - 1], (side * 2, side * 2)))
                self.local_downsample.append(nn.Sequential(LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, 2)))
            else:
                self.global_merges.append(nn.Identity())
                self.local_downsample.append(nn.Sequential(nn.Conv2d(3, dim, 4, 4), LayerNorm2d(dim)))
            stage_rates = rates[start:start + depth]
            start += depth
            self.global_stages.append(SwinStage(dim, (side, side), depth, heads[i], window, drop_path=stage_rates, mlp="linear_gelu"))
            self.local_stages.append(nn.Sequential(*[LocalBlock(dim, r) for r in stage_rates]))
            self.fusions.append(HFFBlock(dim, hff_reduction, first=(i == 0), dense_irmlp=dense_irmlp))
        self.sides = [img_size // 4 // 2**i for i in range(4)]
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)
        self.apply(init_linear)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x)
        local = x
        fused: torch.Tensor | None = None
        for i in range(4):
            tokens = self.global_stages[i](self.global_merges[i](tokens))
            local = self.local_stages[i](self.local_downsample[i](local))
            side = self.sides[i]
            global_map = tokens.transpose(1, 2).reshape(-1, tokens.shape[-1], side, side)
            fused = self.fusions[i](local, global_map, fused)
        assert fused is not None
        return self.norm(fused.mean(dim=(2, 3)))

    def forward(self, dermoscopy: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(dermoscopy))


@register_model("hifuse")
def hifuse_tiny(**kwargs: object) -> HiFuse:
    """SDK test/quickstart size (~3 M parameters): 128 px, embed 24, depth 1 per stage."""
    cfg: dict = dict(img_size=128, embed_dim=24, depths=(1, 1, 1, 1), heads=(1, 2, 4, 8), window=8)
    return HiFuse(**{**cfg, **kwargs})


@register_model("hifuse", paper_size=True)
def hifuse_t(**kwargs: object) -> HiFuse:
    """HiFuse-Tiny (paper): depths 2/2/2/2, 224 px; 56.3 M params depthwise IRMLP."""
    return HiFuse(**{**dict(depths=(2, 2, 2, 2)), **kwargs})  # type: ignore[arg-type]


@register_model("hifuse", paper_size=True)
def hifuse_s(**kwargs: object) -> HiFuse:
    """HiFuse-Small (paper): depths 2/2/6/2, 224 px."""
    return HiFuse(**{**dict(depths=(2, 2, 6, 2)), **kwargs})  # type: ignore[arg-type]


@register_model("hifuse", paper_size=True)
def hifuse_b(**kwargs: object) -> HiFuse:
    """HiFuse-Base (paper): depths 2/2/18/2, 224 px."""
    return HiFuse(**{**dict(depths=(2, 2, 18, 2)), **kwargs})  # type: ignore[arg-type]

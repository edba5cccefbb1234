"""TransXV2S-Net: EfficientNetV2-S + Swin and Xception + Dual-Contextual Graph Attention.

Saeed et al., "TransXV2S-Net", Knowledge-Based Systems (2026). No official code; the
circulating reconstruction has a 313 M-parameter Xception exit flow and fusion
weights it never uses (docs/models.md, section 2). This build lands at
61.6 M parameters at 224 px / 8 classes (paper: 60.69 M). Decisions where the
paper is silent (every number is a constructor argument):

Branch 1 - EfficientNetV2-S + Swin stage
- EfficientNetV2-S is the standard network (paper Table 4 = torchvision
  ``efficientnet_v2_s``; 20.18 M without classifier) and loads torchvision weights
  through an explicit strict key map (:meth:`TransXV2SNet.load_efficientnet`).
- The Swin stage is **appended** as a side branch on the output of EfficientNetV2-S
  **stage 4** (the first MBConv stage: 128 channels at H/16, 14 x 14 at 224 px). It
  replaces nothing: stages 5-6 and the 1x1 head conv continue from stage 4 as in the
  plain network (so pretrained weights stay valid) and give ``f_eff``. The Swin side
  branch is a token projection 128 -> 384 + LayerNorm, then 6 Swin blocks at 14 x 14
  (dim 384, 12 heads, window 7, regular/shifted alternating with the shifted-window
  attention mask as a buffer; Swin-T's own H/16 stage configuration), LayerNorm and
  average pooling -> ``f_swin``. At H/32 (7 x 7) a window 7 would cover the whole
  map and shifting would be a no-op; at H/16 the shift is real.
Branch 2 - Xception + DCGA
- Xception is the original layout (timm ``legacy_xception``; 20.81 M without
  classifier), weights load through a strict key map (:meth:`TransXV2SNet.load_xception`).
- One DCGA module sits on the output of **each of the 12 Xception blocks** (3 entry,
  8 middle, 1 exit; "separable blocks carry the module"); it keeps the shape, so the
  Xception flow continues through it. Node width C' = C / ``dcga_reduction`` (2).
  ``f_xcept`` = average-pooled Xception exit feature (2048); ``f_dcgan`` = mean of the
  refined key nodes of the last DCGA module (512).
- DCGA, per module (x: B x C x H x W, HW nodes):
  context collector: two 1x1 convs, ``embed`` (C -> C') and ``mask`` (C -> 1); the
  mask softmax over positions pools a context vector whose sigmoid is the channel
  attention; the mask's sigmoid is the spatial attention; N = embed * both (HW x C').
  graph stage: s = softmax(tanh(N W)); top-k nodes (k = 64, clamped to HW, a Python
  int from the static input size); N_k = gather(N) * (HW s_k) (the score gate keeps
  W trainable through the non-differentiable top-k; HW rescales it to mean 1);
  G = N_k N^T / sqrt(C'); graph conv 1 aggregates from all nodes,
  H1 = N_k + ReLU(W1 softmax(G) N); graph conv 2 runs on the key-node graph
  (the k x k columns of G), H2 = H1 + ReLU(W2 softmax(G_kk) H1).
  context distributor: every position reads the key nodes through softmax_k(G^T),
  a 1x1 conv + BN back to C, sigmoid gate: y = x + x * sigmoid(.).
  The ranking uses the logits N W (tanh and softmax are monotonic, so the top-k set
  is the same, but a saturated tanh would create ties that ONNX Runtime and torch may
  break differently).
Fusion and head
- Each feature is projected by a Linear to ``fusion_dim`` (256), then
  F = theta (alpha f_eff + beta f_swin) + eta (gamma f_xcept + delta f_dcgan) with six
  learnable scalars (init theta = eta = 1, alpha..delta = 0.5), dropout 0.2, Linear.
- Preprocessing (Gray World SD colour normalisation, hair removal, centre crop) is
  the runtime's job (runtime/), never part of the graph.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .base import EdgeDermModel
from .layers import SwinStage
from .layers.efficientnet import EFFICIENTNETV2_S, EfficientNetV2, StageConfig
from .layers.xception import Xception, timm_xception_key_map
from .layers.vit import init_linear
from .pretrained import load_mapped
from .registry import register_model


class DualContextualGraphAttention(nn.Module):
    """DCGA on a fixed-size feature map: collect context, reason on top-k nodes, distribute."""

    def __init__(self, channels: int, resolution: tuple[int, int], reduction: int = 2, top_k: int = 64) -> None:
        super().__init__()
        height, width = resolution
        self.resolution = resolution
        self.hidden = max(1, channels // reduction)
        self.num_nodes = height * width
        # Python int from static shapes: no data-dependent k in the graph.
        self.top_k = min(top_k, self.num_nodes)
        # context collector
        self.embed = nn.Conv2d(channels, self.hidden, 1)
        self.mask = nn.Conv2d(channels, 1, 1)
        # graph stage
        self.score = nn.Linear(self.hidden, 1)
        self.graph_conv1 = nn.Linear(self.hidden, self.hidden)
        self.graph_conv2 = nn.Linear(self.hidden, self.hidden)
        # context distributor
        self.distribute = nn.Sequential(nn.Conv2d(self.hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def collect(self, x: torch.Tensor) -> torch.Tensor:
        """Context collector: (B, C, H, W) -> nodes (B, HW, C')."""
        embedded = self.embed(x).flatten(2)  # B, C', HW
        logits = self.mask(x).flatten(2)  # B, 1, HW
        context = embedded @ logits.softmax(dim=-1).transpose(1, 2)  # B, C', 1
        nodes = embedded * torch.sigmoid(context) * torch.sigmoid(logits)
        return nodes.transpose(1, 2)

    def select(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k node indices (B, k) and the softmax(tanh) scores of all nodes (B, HW)."""
        logits = self.score(nodes)[..., 0]
        scores = torch.tanh(logits).softmax(dim=-1)
        index = torch.topk(logits, self.top_k, dim=-1).indices
        return index, scores

    def graph_stage(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """nodes (B, HW, C') -> (distributed context (B, HW, C'), graph feature (B, C'), index (B, k))."""
        index, scores = self.select(nodes)
        hidden = nodes.shape[-1]
        gathered = torch.gather(nodes, 1, index.unsqueeze(-1).expand(-1, -1, hidden))
        gate = torch.gather(scores, 1, index) * self.num_nodes
        key = gathered * gate.unsqueeze(-1)  # B, k, C'
        relation = key @ nodes.transpose(1, 2) / math.sqrt(hidden)  # G: B, k, HW
        h1 = key + F.relu(self.graph_conv1(relation.softmax(dim=-1) @ nodes))
        key_relation = torch.gather(relation, 2, index.unsqueeze(1).expand(-1, self.top_k, -1))  # B, k, k
        h2 = h1 + F.relu(self.graph_conv2(key_relation.softmax(dim=-1) @ h1))
        distributed = relation.transpose(1, 2).softmax(dim=-1) @ h2  # B, HW, C'
        return distributed, h2.mean(dim=1), index

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> (refined map, same shape; graph feature (B, C'))."""
        height, width = self.resolution
        distributed, graph_feature, _ = self.graph_stage(self.collect(x))
        context = distributed.transpose(1, 2).reshape(-1, self.hidden, height, width)
        return x + x * torch.sigmoid(self.distribute(context)), graph_feature


class EfficientSwinBranch(nn.Module):
    """EfficientNetV2 with a Swin side branch on the output of stage ``swin_tap_stage``."""

    def __init__(self, img_size: int, stages: Sequence, stem_channels: int, head_channels: int,
                 swin_tap_stage: int, swin_dim: int, swin_depth: int, swin_heads: int, swin_window: int,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.efficientnet = EfficientNetV2(stages, stem_channels, head_channels, drop_path_rate)
        self.tap = swin_tap_stage - 1  # index into efficientnet.stages
        side = img_size
        for _ in range(int(math.log2(self.efficientnet.stage_strides()[self.tap]))):
            side = (side - 1) // 2 + 1  # k//2-padded stride-2 conv: ceil(side / 2)
        self.swin_resolution = (side, side)
        self.swin_embed = nn.Linear(self.efficientnet.out_channels[self.tap], swin_dim)
        self.swin_embed_norm = nn.LayerNorm(swin_dim)
        self.swin = SwinStage(swin_dim, self.swin_resolution, swin_depth, swin_heads, swin_window,
                              drop_path=drop_path_rate)
        self.swin_norm = nn.LayerNorm(swin_dim)
        self.eff_features = self.efficientnet.num_features
        self.swin_features = swin_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (f_eff (B, head channels), f_swin (B, swin_dim))."""
        net = self.efficientnet
        x = net.stem(x)
        tapped = x
        for i, stage in enumerate(net.stages):
            x = stage(x)
            if i == self.tap:
                tapped = x
        if net.head is not None:
            x = net.head(x)
        tokens = self.swin_embed_norm(self.swin_embed(tapped.flatten(2).transpose(1, 2)))
        tokens = self.swin_norm(self.swin(tokens))
        return x.mean(dim=(2, 3)), tokens.mean(dim=1)


class XceptionDCGABranch(nn.Module):
    """Xception with a DCGA module after each of the blocks listed in ``dcga_blocks``."""

    def __init__(self, img_size: int, widths: Sequence[int], middle_blocks: int, exit_widths: Sequence[int],
                 stem_channels: int, dcga: bool = True, dcga_reduction: int = 2, dcga_top_k: int = 64,
                 dcga_blocks: Sequence[int] | None = None) -> None:
        super().__init__()
        self.xception = Xception(widths, middle_blocks, exit_widths, stem_channels)
        sides = self.xception.block_resolutions(img_size)
        count = len(self.xception.blocks)
        chosen = set(range(count) if dcga_blocks is None else dcga_blocks) if dcga else set()
        if chosen and max(chosen) >= count:
            raise ValueError(f"dcga_blocks {sorted(chosen)} name blocks beyond the {count} Xception blocks (0..{count - 1})")
        self.dcga = nn.ModuleList(
            DualContextualGraphAttention(ch, (side, side), dcga_reduction, dcga_top_k) if i in chosen else nn.Identity()
            for i, (ch, side) in enumerate(zip(self.xception.block_channels, sides))
        )
        self.last_dcga = max(chosen) if chosen else None
        self.xcept_features = self.xception.num_features
        # Without DCGA the graph feature is absent; the fusion then uses zeros of width 1.
        self.graph_features = self.dcga[self.last_dcga].hidden if chosen else 1  # type: ignore[union-attr]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (f_xcept (B, 2048), f_dcgan (B, C') of the last DCGA module)."""
        net = self.xception
        x = net.stem(x)
        graph_feature = None
        for i, (block, dcga) in enumerate(zip(net.blocks, self.dcga)):
            x = block(x)
            if isinstance(dcga, DualContextualGraphAttention):
                x, feature = dcga(x)
                if i == self.last_dcga:
                    graph_feature = feature
        x = net.exit_convs(x)
        pooled = x.mean(dim=(2, 3))
        if graph_feature is None:
            graph_feature = pooled[:, :1] * 0.0
        return pooled, graph_feature


class TransXV2SNet(EdgeDermModel):
    task = "classify"
    modalities = ("dermoscopy",)

    def __init__(
        self,
        num_classes: int = 8,
        img_size: int = 224,
        efficientnet_stages: Sequence[StageConfig | Sequence] = EFFICIENTNETV2_S,
        efficientnet_stem: int = 24,
        efficientnet_head: int = 1280,
        swin_tap_stage: int = 4,
        swin_dim: int = 384,
        swin_depth: int = 6,
        swin_heads: int = 12,
        swin_window: int = 7,
        xception_widths: Sequence[int] = (64, 128, 256, 728, 1024),
        xception_middle_blocks: int = 8,
        xception_exit_widths: Sequence[int] = (1536, 2048),
        xception_stem: int = 32,
        dcga: bool = True,
        dcga_reduction: int = 2,
        dcga_top_k: int = 64,
        dcga_blocks: Sequence[int] | None = None,
        fusion_dim: int = 256,
        drop_rate: float = 0.2,
        drop_path_rate: float = 0.0,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(num_classes, img_size, class_names)
        if not 1 <= swin_tap_stage <= len(efficientnet_stages):
            raise ValueError(f"swin_tap_stage {swin_tap_stage} is not an EfficientNet stage (1..{len(efficientnet_stages)})")
        self.efficient_swin = EfficientSwinBranch(
            img_size, efficientnet_stages, efficientnet_stem, efficientnet_head, swin_tap_stage,
            swin_dim, swin_depth, swin_heads, swin_window, drop_path_rate)
        self.xception_dcga = XceptionDCGABranch(
            img_size, xception_widths, xception_middle_blocks, xception_exit_widths, xception_stem,
            dcga, dcga_reduction, dcga_top_k, dcga_blocks)
        self.project_eff = nn.Linear(self.efficient_swin.eff_features, fusion_dim)
        self.project_swin = nn.Linear(self.efficient_swin.swin_features, fusion_dim)
        self.project_xcept = nn.Linear(self.xception_dcga.xcept_features, fusion_dim)
        self.project_dcgan = nn.Linear(self.xception_dcga.graph_features, fusion_dim)
        # F = theta (alpha f_eff + beta f_swin) + eta (gamma f_xcept + delta f_dcgan)
        self.theta = nn.Parameter(torch.tensor(1.0))
        self.eta = nn.Parameter(torch.tensor(1.0))
        self.alpha = nn.Parameter(torch.tensor(0.5))
        self.beta = nn.Parameter(torch.tensor(0.5))
        self.gamma = nn.Parameter(torch.tensor(0.5))
        self.delta = nn.Parameter(torch.tensor(0.5))
        self.dropout = nn.Dropout(drop_rate)
        self.head = nn.Linear(fusion_dim, num_classes)
        for module in (self.project_eff, self.project_swin, self.project_xcept, self.project_dcgan, self.head):
            init_linear(module)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        f_eff, f_swin = self.efficient_swin(x)
        f_xcept, f_dcgan = self.xception_dcga(x)
        branch1 = self.alpha * self.project_eff(f_eff) + self.beta * self.project_swin(f_swin)
        branch2 = self.gamma * self.project_xcept(f_xcept) + self.delta * self.project_dcgan(f_dcgan)
        return self.theta * branch1 + self.eta * branch2

    def forward(self, dermoscopy: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.forward_features(dermoscopy)))

    def parameter_breakdown(self) -> dict[str, int]:
        """Parameters per part (what the 60.69 M of the paper is made of)."""
        def count(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        branch1, branch2 = self.efficient_swin, self.xception_dcga
        fusion = [self.project_eff, self.project_swin, self.project_xcept, self.project_dcgan]
        return {
            "efficientnetv2": count(branch1.efficientnet),
            "swin_stage": count(branch1) - count(branch1.efficientnet),
            "xception": count(branch2.xception),
            "dcga": count(branch2.dcga),
            "fusion": sum(count(m) for m in fusion) + 6,
            "classifier": count(self.head),
            "total": count(self),
        }

    def load_efficientnet(self, source: str | Mapping[str, torch.Tensor]) -> list[str]:
        """Load torchvision ``efficientnet_v2_s`` weights (strict; classifier dropped)."""
        net = self.efficient_swin.efficientnet
        return load_mapped(net, source, net.torchvision_key_map())

    def load_xception(self, source: str | Mapping[str, torch.Tensor]) -> list[str]:
        """Load timm ``legacy_xception`` weights (strict; fc dropped)."""
        net = self.xception_dcga.xception
        return load_mapped(net, source, timm_xception_key_map(net))


@register_model("transxv2s")
def transxv2s_tiny(**kwargs: object) -> TransXV2SNet:
    """SDK test/quickstart size (0.87 M parameters): 96 px, narrow widths, 1-2 blocks per stage."""
    cfg: dict = dict(
        img_size=96,
        efficientnet_stages=(("fused", 1, 3, 1, 16, 1), ("fused", 4, 3, 2, 24, 1), ("fused", 4, 3, 2, 32, 1),
                             ("mbconv", 4, 3, 2, 48, 2), ("mbconv", 4, 3, 1, 64, 1), ("mbconv", 4, 3, 2, 96, 1)),
        efficientnet_stem=16, efficientnet_head=256,
        # stage 4 is at 6 x 6 for 96 px: window 3 gives 4 windows and a real shift of 1
        swin_dim=64, swin_depth=2, swin_heads=2, swin_window=3,
        xception_widths=(32, 48, 64, 128, 192), xception_middle_blocks=2, xception_exit_widths=(256, 384),
        xception_stem=16, fusion_dim=64,
    )
    return TransXV2SNet(**{**cfg, **kwargs})


@register_model("transxv2s", paper_size=True)
def transxv2s_net(**kwargs: object) -> TransXV2SNet:
    """TransXV2S-Net (paper): 224 px, 8 classes (ISIC 2019); 61.6 M params (paper 60.69 M)."""
    return TransXV2SNet(**kwargs)  # type: ignore[arg-type]

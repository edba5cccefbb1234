"""CFFormer: a CNN encoder and a Swin-V2 encoder that exchange channels at every stage.

Li et al., "CFFormer: Cross CNN-Transformer channel attention and spatial feature
fusion for improved segmentation of low quality medical images", Expert Systems with
Applications (2025). Facts and decisions (docs/models.md, section 3):

- Dual encoder. CNN: ResNet-34 (torchvision names, :class:`ResNetEncoder`), stem
  conv at H/2 (kept as the first skip), stages 64/128/256/512 at H/4..H/32.
  Transformer: Swin Transformer V2 (cosine attention, continuous position bias,
  res-post-norm, post-norm patch merging, no key bias), window 8, as torchvision's
  ``swin_v2_t/s/b``: variant s = Swin-V2-T (depths 2/2/6/2), b = Swin-V2-S
  (2/2/18/2), l = Swin-V2-B (embed 128). Neither encoder keeps its classifier head
  or final norm, which the segmenter never uses.
- At 224 px the stage maps (56/28/14/7) are not all multiples of the window 8; as in
  torchvision's Swin (which the paper's models are built from) they are zero-padded
  to one (``SwinBlock(pad_to_window=True)``), with static sizes so ONNX sees a Pad.
- CFCA (cross feature channel attention) after stage i of both encoders: a
  squeeze-excitation vector of each encoder whose hidden width is the other
  encoder's channel count, e_c (C_cnn) and e_t (C_trans); Q = e_c e_t^T (outer
  product, N x C_cnn x C_trans, a bmm). softmax over the C_trans axis (dim 2)
  projects the transformer map into the CNN's channels; softmax over the C_cnn axis
  (dim 1) projects the CNN map into the transformer's channels. Each encoder adds the
  projection of the other to its own map, and those residual sums are the input of
  the NEXT stage of both encoders (and of the XFF of this stage).
- XFF (cross spatial feature fusion): conv3x3(cat[C + conv3x3(T), T + conv5x5(C)]),
  plain biased convs, no norm. Channel alignment: conv3x3 maps T to C_cnn channels,
  conv5x5 maps C to C_trans channels, and the fused output has the transformer's
  width (96/192/384/768 for s/b), which sets the decoder widths.
- Decoder (U-Net): skips [stem 64 @ H/2, XFF 96 @ H/4, 192, 384, 768 @ H/32]; each
  up block is conv3x3-BN-ReLU (in -> in), conv3x3-BN-ReLU (in -> out) and a 2x2
  stride-2 ConvTranspose, and its output is concatenated with the next skip (skip
  first). The last up block returns to full resolution; the head is conv3x3-BN-ReLU
  x2 and a 1x1 conv to K classes. Convs followed by BatchNorm have no bias (it is
  redundant; the paper is silent), which costs < 0.1 % of the parameters.
- Loss: 0.5 cross-entropy + 0.5 soft Dice (:func:`dice_ce_loss`). The Dice is taken
  over softmax probabilities against the one-hot mask, summed over batch and pixels
  per class, averaged over all classes including background, smoothing 1e-5 (the
  paper gives only the 0.5/0.5 weighting).
- Training recipe of the paper (not encoded here): AdamW wd 3e-5, poly lr 3e-4
  power 0.9, input 224.
- Reference sizes at 224 (docs/models.md): b 119.7 M parameters / 29.1 GMACs, s 98.3 M,
  l 184.8 M. This build: b 119.66 M / 29.07 GMACs, s 98.28 M, l 184.81 M (the
  encoders' unused classifier heads and final Swin norm are not built).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .base import EdgeDermModel
from .layers import ConvNormAct, PatchEmbed, PatchMerging, SqueezeExcite, SwinStage
from .layers.resnet import ResNetEncoder
from .layers.vit import init_linear
from .registry import register_model


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, ce_weight: float = 0.5,
                 dice_weight: float = 0.5, smooth: float = 1e-5) -> torch.Tensor:
    """``ce_weight`` * cross-entropy + ``dice_weight`` * (1 - mean-over-classes soft Dice).

    ``logits`` N x K x H x W, ``target`` N x H x W int64 class indices. Per class k:
    Dice_k = (2 sum(p_k g_k) + smooth) / (sum(p_k) + sum(g_k) + smooth), sums over the
    batch and all pixels, p = softmax(logits), g = one-hot(target).
    """
    if target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"target mask has shape {tuple(target.shape)}, expected N x H x W = "
            f"{(logits.shape[0], *logits.shape[2:])} to match logits {tuple(logits.shape)}"
        )
    ce = F.cross_entropy(logits, target)
    probs = logits.softmax(dim=1)
    one_hot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    intersection = (probs * one_hot).sum(dims)
    total = probs.sum(dims) + one_hot.sum(dims)
    dice = (2 * intersection + smooth) / (total + smooth)
    return ce_weight * ce + dice_weight * (1 - dice.mean())


class SwinV2Encoder(nn.Module):
    """Swin Transformer V2 features at H/4..H/32 (torchvision ``swin_v2_*`` layout).

    Used stage by stage by :class:`CFFormer` (which rewrites each stage's output);
    ``forward`` runs it standalone and returns the four maps (N x C_i x H_i x W_i).
    """

    def __init__(self, img_size: int, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 heads: Sequence[int] = (3, 6, 12, 24), window: int = 8, drop_path_rate: float = 0.0,
                 pad_to_window: bool = True) -> None:
        super().__init__()
        self.dims = [embed_dim * 2**i for i in range(4)]
        self.sides = [img_size // 4 // 2**i for i in range(4)]
        total = sum(depths)  # linearly increasing stochastic depth; plain Python so meta-device builds work
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.patch_embed = PatchEmbed(4, 3, embed_dim)
        self.merges = nn.ModuleList(
            PatchMerging(self.dims[i - 1], (self.sides[i - 1],) * 2, post_norm=True) for i in range(1, 4)
        )
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.stages.append(SwinStage(
                self.dims[i], (self.sides[i],) * 2, depth, heads[i], window, drop_path=rates[start:start + depth],
                post_norm=True, cosine_attention=True, pad_to_window=pad_to_window,
            ))
        self.apply(init_linear)

    def stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``index`` on a map (N x C x H x W): image for 0, previous stage's map after."""
        tokens = self.patch_embed(x) if index == 0 else self.merges[index - 1](x.flatten(2).transpose(1, 2))
        tokens = self.stages[index](tokens)
        side = self.sides[index]
        return tokens.transpose(1, 2).reshape(-1, self.dims[index], side, side)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i in range(4):
            x = self.stage(i, x)
            feats.append(x)
        return feats


def swin_v2_key_map(key: str) -> str | None:
    """torchvision ``swin_v2_*`` state dict -> :class:`SwinV2Encoder`.

    features.0 = patch embed (conv, permute, norm); features.1/3/5/7 = stages;
    features.2/4/6 = patch merging; classifier norm and head are dropped, and so are
    the position buffers (recomputed in ``__init__``; a test checks they agree).
    """
    parts = key.split(".")
    if parts[0] in ("norm", "head") or parts[-1] in ("relative_coords_table", "relative_position_index"):
        return None
    if parts[0] != "features":
        return key
    index, rest = int(parts[1]), parts[2:]
    if index == 0:
        return ".".join([{"0": "patch_embed.proj", "2": "patch_embed.norm"}[rest[0]], *rest[1:]])
    if index % 2 == 0:
        return ".".join(["merges", str(index // 2 - 1), *rest])
    block, name = rest[0], rest[1:]
    if name[0] == "mlp":  # torchvision MLP: Linear, GELU, Dropout, Linear, Dropout
        name = ["mlp", {"0": "0", "3": "2"}[name[1]], *name[2:]]
    return ".".join(["stages", str(index // 2), "blocks", block, *name])


class CFCA(nn.Module):
    """Cross feature channel attention between a CNN map and a transformer map.

    Returns (cnn + T projected to C_cnn channels, trans + C projected to C_trans
    channels), both at the input resolution.
    """

    def __init__(self, cnn_channels: int, trans_channels: int) -> None:
        super().__init__()
        self.cnn_channels, self.trans_channels = cnn_channels, trans_channels
        # Each squeeze-excitation is excited through the other encoder's width.
        self.cnn_excite = SqueezeExcite(cnn_channels, hidden_channels=trans_channels)
        self.trans_excite = SqueezeExcite(trans_channels, hidden_channels=cnn_channels)

    def affinity(self, cnn: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
        """Q = e_c e_t^T, N x C_cnn x C_trans."""
        e_cnn = self.cnn_excite.excitation(cnn).reshape(-1, self.cnn_channels, 1)
        e_trans = self.trans_excite.excitation(trans).reshape(-1, 1, self.trans_channels)
        return torch.bmm(e_cnn, e_trans)

    def forward(self, cnn: torch.Tensor, trans: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = cnn.shape[-2:]
        q = self.affinity(cnn, trans)
        trans_to_cnn = q.softmax(dim=2)  # each CNN channel: convex mix of transformer channels
        cnn_to_trans = q.softmax(dim=1)  # each transformer channel: convex mix of CNN channels
        from_trans = torch.bmm(trans_to_cnn, trans.flatten(2))
        from_cnn = torch.bmm(cnn_to_trans.transpose(1, 2), cnn.flatten(2))
        cnn = cnn + from_trans.reshape(-1, self.cnn_channels, height, width)
        trans = trans + from_cnn.reshape(-1, self.trans_channels, height, width)
        return cnn, trans


class XFF(nn.Module):
    """Cross spatial feature fusion: conv3x3(cat[C + conv3x3(T), T + conv5x5(C)])."""

    def __init__(self, cnn_channels: int, trans_channels: int, out_channels: int) -> None:
        super().__init__()
        self.trans_to_cnn = nn.Conv2d(trans_channels, cnn_channels, 3, padding=1)
        self.cnn_to_trans = nn.Conv2d(cnn_channels, trans_channels, 5, padding=2)
        self.fuse = nn.Conv2d(cnn_channels + trans_channels, out_channels, 3, padding=1)

    def forward(self, cnn: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
        cnn_branch = cnn + self.trans_to_cnn(trans)
        trans_branch = trans + self.cnn_to_trans(cnn)
        return self.fuse(torch.cat([cnn_branch, trans_branch], dim=1))


class UpBlock(nn.Sequential):
    """conv3x3-BN-ReLU (in -> in), conv3x3-BN-ReLU (in -> out), ConvTranspose 2x2 stride 2."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            ConvNormAct(in_channels, in_channels, 3),
            ConvNormAct(in_channels, out_channels, 3),
            nn.ConvTranspose2d(out_channels, out_channels, 2, 2),
        )


class UNetDecoder(nn.Module):
    """Five skips (widths w0 @ H/2 .. w4 @ H/32) -> w0 channels at full resolution."""

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        w = list(widths)
        # blocks[i] consumes the map at the resolution of skip i (deepest first in forward).
        blocks = [UpBlock(2 * w[0], w[0])] + [UpBlock(2 * w[i], w[i - 1]) for i in range(1, 4)] + [UpBlock(w[4], w[3])]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.blocks[4](skips[4])
        for i in (3, 2, 1, 0):
            x = self.blocks[i](torch.cat([skips[i], x], dim=1))
        return x


class CFFormer(EdgeDermModel):
    task = "segment"
    modalities = ("dermoscopy",)

    def __init__(
        self,
        num_classes: int = 2,
        img_size: int = 224,
        cnn_depth: int = 34,
        cnn_widths: Sequence[int] = (64, 128, 256, 512),
        cnn_blocks: Sequence[int] | None = None,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 18, 2),
        heads: Sequence[int] = (3, 6, 12, 24),
        window: int = 8,
        drop_path_rate: float = 0.0,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(num_classes, img_size, class_names)
        if img_size % 32:
            raise ValueError(
                f"img_size {img_size} is not a multiple of 32 (patch 4 and three 2x merges); "
                f"use {max(32, img_size // 32 * 32)} or {img_size // 32 * 32 + 32}"
            )
        self.cnn = ResNetEncoder(cnn_depth, cnn_widths, cnn_blocks)
        self.transformer = SwinV2Encoder(img_size, embed_dim, depths, heads, window, drop_path_rate)
        cnn_channels, trans_channels = self.cnn.out_channels, self.transformer.dims
        self.cfca = nn.ModuleList(CFCA(c, t) for c, t in zip(cnn_channels, trans_channels))
        self.xff = nn.ModuleList(XFF(c, t, t) for c, t in zip(cnn_channels, trans_channels))
        stem = cnn_widths[0]
        self.decoder = UNetDecoder([stem, *trans_channels])
        self.head = nn.Sequential(ConvNormAct(stem, stem, 3), ConvNormAct(stem, stem, 3), nn.Conv2d(stem, num_classes, 1))
        for m in [*self.xff.modules(), *self.decoder.modules(), *self.head.modules()]:
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five decoder skips: CNN stem (H/2) and the XFF outputs (H/4..H/32)."""
        cnn_net = self.cnn
        stem = cnn_net.relu(cnn_net.bn1(cnn_net.conv1(x)))
        skips = [stem]
        cnn, trans = cnn_net.maxpool(stem), x
        for i in range(4):
            cnn = cnn_net.stages[i](cnn)
            trans = self.transformer.stage(i, trans)
            cnn, trans = self.cfca[i](cnn, trans)  # the residual sums feed both next stages
            skips.append(self.xff[i](cnn, trans))
        return skips

    def forward(self, dermoscopy: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encode(dermoscopy)))

    def training_loss(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """0.5 CE + 0.5 Dice against an N x H x W int64 mask."""
        return dice_ce_loss(self(**inputs), labels)


@register_model("cfformer")
def cfformer_tiny(**kwargs: object) -> CFFormer:
    """SDK test/quickstart size (~2 M parameters): 64 px, narrow ResNet + Swin-V2, window 4."""
    cfg: dict = dict(img_size=64, cnn_widths=(8, 16, 32, 64), cnn_blocks=(1, 1, 1, 1), embed_dim=16,
                     depths=(2, 2, 2, 2), heads=(1, 2, 4, 8), window=4)
    return CFFormer(**{**cfg, **kwargs})


@register_model("cfformer", paper_size=True)
def cfformer_s(**kwargs: object) -> CFFormer:
    """CFFormer-s (paper): ResNet-34 + Swin-V2-T (depths 2/2/6/2), 224 px."""
    return CFFormer(**{**dict(depths=(2, 2, 6, 2)), **kwargs})  # type: ignore[arg-type]


@register_model("cfformer", paper_size=True)
def cfformer_b(**kwargs: object) -> CFFormer:
    """CFFormer-b (paper): ResNet-34 + Swin-V2-S (depths 2/2/18/2), 224 px."""
    return CFFormer(**{**dict(depths=(2, 2, 18, 2)), **kwargs})  # type: ignore[arg-type]


@register_model("cfformer", paper_size=True)
def cfformer_l(**kwargs: object) -> CFFormer:
    """CFFormer-l (paper): ResNet-34 + Swin-V2-B (embed 128, heads 4/8/16/32), 224 px."""
    cfg: dict = dict(embed_dim=128, depths=(2, 2, 18, 2), heads=(4, 8, 16, 32))
    return CFFormer(**{**cfg, **kwargs})

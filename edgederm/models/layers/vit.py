"""ViT building blocks (Dosovitskiy et al., ICLR 2021), written once for the zoo.

Names follow the standard ViT layout (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
``norm``) so that ViT-S/16 checkpoints, including self-supervised ones, load through
an explicit, strict key map (:func:`vit_key_map`, :func:`load_vit`). Decisions:
- LayerNorm eps 1e-6, GELU (erf), qkv with bias: the ViT-S/16 reference choices, so
  features match a reference implementation to float precision;
- attention is written as matmul + softmax (no fused kernel) so the same code is
  exported to ONNX and quantised (QDQ on the MatMul inputs);
- a checkpoint trained at another resolution has its position embedding resampled
  explicitly (:func:`resample_pos_embed`: bicubic, antialiased, prefix tokens kept),
  never silently; the encoder's own grid is fixed in ``__init__``.
:class:`CrossAttention` takes an optional key mask applied with ``where`` (not an
additive mask), so masked keys cannot leak NaN/inf and their values do not matter.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from .regularization import DropPath

# Logit given to a masked key: exp(-1e4 - logit) underflows to exactly 0 in float32,
# and the value still fits float16 (unlike finfo.min) for half-precision engines.
MASKED_LOGIT = -1.0e4


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention over (B, T, C) tokens."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, channels = x.shape[1], x.shape[2]
        qkv = self.qkv(x).reshape(-1, tokens, 3, self.heads, channels // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(-1, tokens, channels))


class CrossAttention(nn.Module):
    """Queries from one token set attend to another: (B, Tq, C) x (B, Tk, C) -> (B, Tq, C).

    ``key_mask`` (B, Tk) bool: False keys get :data:`MASKED_LOGIT` via ``where``. At
    least one key per row must stay unmasked (callers keep a learnt null key).
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        tq, tk, channels = query.shape[1], context.shape[1], query.shape[2]
        head_dim = channels // self.heads
        q = self.q(query).reshape(-1, tq, self.heads, head_dim).transpose(1, 2)
        kv = self.kv(context).reshape(-1, tk, 2, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ kv[0].transpose(-2, -1)  # B, h, Tq, Tk
        if key_mask is not None:
            attn = torch.where(key_mask[:, None, None, :], attn, torch.full_like(attn, MASKED_LOGIT))
        out = attn.softmax(dim=-1) @ kv[1]
        return self.proj(out.transpose(1, 2).reshape(-1, tq, channels))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViTPatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, H/p * W/p, C), no norm (the ViT layout)."""

    def __init__(self, patch: int = 16, in_channels: int = 3, dim: int = 384) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT encoder without head: (B, 3, S, S) -> normalised tokens (B, 1 + (S/p)^2, C).

    Token 0 is the CLS token; the rest are the patch tokens in row-major order.
    ``img_size`` is fixed at construction (position embeddings are a Parameter of
    that size); ViT-S/16 is ``dim=384, depth=12, heads=6``.
    """

    def __init__(self, img_size: int = 224, patch: int = 16, dim: int = 384, depth: int = 12, heads: int = 6,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if img_size % patch:
            raise ValueError(f"ViT input {img_size} is not a multiple of patch {patch}; use {img_size // patch * patch or patch}")
        self.img_size, self.patch, self.dim = img_size, patch, dim
        self.grid = img_size // patch
        self.patch_embed = ViTPatchEmbed(patch, 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio, qkv_bias, rates[i]) for i in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def init_linear(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) weights and zero bias for Linear layers, the ViT/Swin
    convention; use with ``module.apply``. Other modules are left as they are."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def resample_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], prefix_tokens: int = 1) -> torch.Tensor:
    """(1, prefix + h*w, C) -> (1, prefix + grid[0]*grid[1], C); prefix tokens untouched.

    The patch part is treated as an h x w image (square in every ViT-S/16 checkpoint)
    and resized bicubically (align_corners=False, antialiased so that shrinking does
    not alias) - the convention of the reference ViT code, so a checkpoint resampled
    here and there gives the same numbers.
    """
    prefix, patches = pos_embed[:, :prefix_tokens], pos_embed[:, prefix_tokens:]
    old = math.isqrt(patches.shape[1])
    if old * old != patches.shape[1]:
        raise ValueError(f"position embedding has {patches.shape[1]} patch tokens, not a square grid")
    if (old, old) == tuple(grid):
        return pos_embed
    image = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    image = F.interpolate(image, size=tuple(grid), mode="bicubic", align_corners=False, antialias=True)
    patches = image.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


def vit_key_map(key: str) -> str | None:
    """Standard ViT checkpoint key -> :class:`VisionTransformer` key (same names; head dropped)."""
    if key.startswith(("head.", "fc_norm.", "head_drop.")):
        return None
    return key


def load_vit(encoder: VisionTransformer, source: str | Path | Mapping[str, torch.Tensor]) -> list[str]:
    """Load a ViT checkpoint (e.g. ViT-S/16 at 224) into ``encoder`` strictly.

    A position embedding of another grid (224 checkpoint, 256 windows) is resampled
    with :func:`resample_pos_embed` before the strict load. Returns the dropped keys.
    """
    from edgederm.models.pretrained import load_mapped, read_state_dict

    state = read_state_dict(source)
    if "pos_embed" in state and state["pos_embed"].shape != encoder.pos_embed.shape:
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], (encoder.grid, encoder.grid))
    return load_mapped(encoder, state, vit_key_map)

"""Swin-style (shifted) window attention, written once for the whole zoo.

Used by HiFuse's global branch, CFFormer's Swin-V2 encoder and TransXV2S-Net's Swin
stage. Export decisions (docs/models.md, "Export-hostile patterns"):
- every spatial size is a Python int fixed in ``__init__`` (the model's input size),
  so window partitioning is a static reshape and no shape arithmetic reaches ONNX;
- the shifted-window attention mask and the relative-position index are buffers
  computed in ``__init__`` (no ScatterND in the graph);
- the batch axis is always written as -1 in reshapes, so graphs keep a dynamic batch.
Swin V2 options (``cosine_attention``, continuous position bias, post-norm) follow
Liu et al., "Swin Transformer V2" (CVPR 2022).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .regularization import DropPath


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, window*window, C)."""
    _, height, width, channels = x.shape
    x = x.reshape(-1, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """(B * nW, window*window, C) -> (B, H, W, C)."""
    channels = windows.shape[-1]
    x = windows.reshape(-1, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """Additive mask (nW, N, N): -100 between tokens that came from different regions."""
    regions = torch.zeros(1, height, width, 1)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in bounds:
        for cols in bounds:
            regions[:, rows, cols, :] = label
            label += 1
    windows = window_partition(regions, window).squeeze(-1)  # nW, N
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))


def _relative_position_index(window: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    flat = coords.flatten(1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a relative position bias.

    ``cosine_attention=True`` gives Swin V2: cosine similarity scaled by a learnt,
    clamped logit scale, and a log-spaced continuous position bias from a small MLP.
    """

    def __init__(
        self,
        dim: int,
        window: int,
        heads: int,
        qkv_bias: bool = True,
        cosine_attention: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        key_bias: bool | None = None,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.dim, self.window, self.heads = dim, window, heads
        self.cosine_attention = cosine_attention
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.register_buffer("relative_position_index", _relative_position_index(window).flatten(), persistent=False)
        # Swin V2 has no key bias (official code, torchvision, timm): the key third of
        # qkv.bias is multiplied by a zero buffer, so names stay torchvision's.
        self.key_bias = (not cosine_attention) if key_bias is None else key_bias
        if qkv_bias and not self.key_bias:
            keep = torch.ones(3 * dim)
            keep[dim:2 * dim] = 0.0
            self.register_buffer("qkv_bias_keep", keep, persistent=False)
        table_size = (2 * window - 1) ** 2
        if cosine_attention:
            self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(heads, 1, 1)))
            self.cpb_mlp = nn.Sequential(nn.Linear(2, 512), nn.ReLU(inplace=True), nn.Linear(512, heads, bias=False))
            rel = torch.arange(-(window - 1), window, dtype=torch.float32)
            table = torch.stack(torch.meshgrid(rel, rel, indexing="ij"), dim=-1)  # 2w-1, 2w-1, 2
            table = table / max(window - 1, 1) * 8
            table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
            self.register_buffer("relative_coords_table", table.reshape(-1, 2), persistent=False)
        else:
            self.relative_position_bias_table = nn.Parameter(torch.zeros(table_size, heads))
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def position_bias(self) -> torch.Tensor:
        """(heads, N, N) bias added to the attention logits."""
        n = self.window * self.window
        if self.cosine_attention:
            table = 16 * torch.sigmoid(self.cpb_mlp(self.relative_coords_table))
        else:
            table = self.relative_position_bias_table
        bias = table[self.relative_position_index].reshape(n, n, self.heads)
        return bias.permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        tokens, channels = x.shape[1], x.shape[2]
        head_dim = channels // self.heads
        if self.qkv.bias is not None and not self.key_bias:
            qkv = F.linear(x, self.qkv.weight, self.qkv.bias * self.qkv_bias_keep)
        else:
            qkv = self.qkv(x)
        qkv = qkv.reshape(-1, tokens, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.cosine_attention:
            scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * scale
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn + self.position_bias().unsqueeze(0)
        if mask is not None:
            windows = mask.shape[0]
            attn = attn.reshape(-1, windows, self.heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.reshape(-1, self.heads, tokens, tokens)
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(-1, tokens, channels)
        return self.proj_drop(self.proj(out))


class SwinBlock(nn.Module):
    """(Shifted) window attention block on (B, H*W, C) tokens at a fixed resolution.

    ``mlp="mlp"``: the standard two-layer MLP (Swin V1/V2). ``mlp="linear_gelu"``:
    HiFuse's global block (attention -> Linear -> GELU, one residual).
    ``post_norm=True`` is Swin V2's res-post-norm.
    ``pad_to_window=True`` follows torchvision's Swin: a feature map that is not a
    multiple of the window is zero-padded (bottom/right) to one instead of refused,
    the window is never shrunk, and there is no shift when one window covers the
    padded map. Padding is static (sizes fixed in ``__init__``), so it exports as Pad.
    """

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        heads: int,
        window: int = 7,
        shift: bool = False,
        mlp_ratio: float = 4.0,
        mlp: str = "mlp",
        post_norm: bool = False,
        cosine_attention: bool = False,
        drop_path: float = 0.0,
        pad_to_window: bool = False,
    ) -> None:
        super().__init__()
        height, width = resolution
        if pad_to_window:
            padded = (-(-height // window) * window, -(-width // window) * window)
        else:
            # Swin's rule: a window never exceeds the feature map, and then no shift.
            window = min(window, height, width)
            padded = (height, width)
        if padded[0] % window or padded[1] % window:
            raise ValueError(
                f"feature map {height}x{width} is not a multiple of window {window}; "
                f"choose an input size whose stage resolutions are multiples of the window"
            )
        self.resolution, self.window, self.padded = (height, width), window, padded
        self.shift = window // 2 if shift and window < min(padded) else 0
        self.post_norm = post_norm
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads, cosine_attention=cosine_attention)
        self.drop_path = DropPath(drop_path)
        if mlp == "mlp":
            hidden = int(dim * mlp_ratio)
            self.norm2: nn.Module | None = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        elif mlp == "linear_gelu":
            self.norm2 = None
            self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        else:
            raise ValueError(f"mlp must be 'mlp' or 'linear_gelu', got {mlp!r}")
        if self.shift:
            self.register_buffer("attn_mask", shifted_window_mask(*padded, window, self.shift), persistent=False)
        else:
            self.attn_mask = None

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.resolution
        padded_h, padded_w = self.padded
        x = x.reshape(-1, height, width, x.shape[-1])
        if (padded_h, padded_w) != (height, width):
            x = F.pad(x, (0, 0, 0, padded_w - width, 0, padded_h - height))
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = self.attn(window_partition(x, self.window), self.attn_mask)
        x = window_reverse(windows, self.window, padded_h, padded_w)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        if (padded_h, padded_w) != (height, width):
            x = x[:, :height, :width, :]
        return x.reshape(-1, height * width, x.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm2 is None:  # HiFuse: one residual around attention + Linear/GELU
            return x + self.drop_path(self.mlp(self._attention(self.norm1(x))))
        if self.post_norm:
            x = x + self.drop_path(self.norm1(self._attention(x)))
            return x + self.drop_path(self.norm2(self.mlp(x)))
        x = x + self.drop_path(self._attention(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: (B, 3, H, W) -> (B, H/p * W/p, C), normalised."""

    def __init__(self, patch: int = 4, in_channels: int = 3, dim: int = 96, norm: bool = True) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, patch)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat -> LayerNorm -> Linear(4C -> 2C); halves H and W.

    ``post_norm=True`` (Swin V2) normalises after the reduction instead of before.
    The weights do not depend on the resolution: ``forward(x, resolution)`` runs the
    same merge at another one (RemixFormer++'s local encoder, on crops).
    """

    def __init__(self, dim: int, resolution: tuple[int, int], post_norm: bool = False, out_dim: int | None = None) -> None:
        super().__init__()
        self.resolution = resolution
        self.post_norm = post_norm
        out_dim = out_dim or 2 * dim
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim if post_norm else 4 * dim)

    def forward(self, x: torch.Tensor, resolution: tuple[int, int] | None = None) -> torch.Tensor:
        height, width = resolution or self.resolution
        channels = x.shape[-1]
        # (B, H/2, 2, W/2, 2, C) -> (B, H/2, W/2, 2(col), 2(row), C): the x0,x1,x2,x3 order of Swin
        x = x.reshape(-1, height // 2, 2, width // 2, 2, channels).permute(0, 1, 3, 4, 2, 5)
        x = x.reshape(-1, (height // 2) * (width // 2), 4 * channels)
        if self.post_norm:
            return self.norm(self.reduction(x))
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """``depth`` Swin blocks alternating regular and shifted windows at one resolution."""

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        depth: int,
        heads: int,
        window: int = 7,
        drop_path: float | list[float] = 0.0,
        **block_kwargs: object,
    ) -> None:
        super().__init__()
        rates = drop_path if isinstance(drop_path, list) else [drop_path] * depth
        self.resolution = resolution
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, heads, window, shift=bool(i % 2), drop_path=rates[i], **block_kwargs)  # type: ignore[arg-type]
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

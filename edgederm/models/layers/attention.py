"""Channel and spatial attention gates (CBAM-style), squeeze-and-excitation."""
from __future__ import annotations

import torch
from torch import nn

from .conv import ConvNormAct


class SqueezeExcite(nn.Module):
    """Global average pool -> bottleneck MLP -> sigmoid channel gate."""

    def __init__(self, channels: int, reduction: int = 16, out_channels: int | None = None,
                 hidden_channels: int | None = None) -> None:
        super().__init__()
        # hidden_channels overrides the reduction (CFFormer's CFCA uses the other encoder's width).
        hidden = hidden_channels or max(1, channels // reduction)
        self.fc = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels or channels, 1),
        )

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """The gate vector (N x C_out x 1 x 1) without applying it."""
        return torch.sigmoid(self.fc(x.mean(dim=(2, 3), keepdim=True)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.excitation(x)


class ChannelAttention(nn.Module):
    """Shared bottleneck over max- and average-pooled descriptors, summed, sigmoid."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        max_pooled = x.amax(dim=(2, 3), keepdim=True)
        avg_pooled = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.mlp(max_pooled) + self.mlp(avg_pooled))


class SpatialAttention(nn.Module):
    """Channel max and mean -> k x k conv -> sigmoid spatial gate."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = ConvNormAct(2, 1, kernel_size, norm=True, act=None, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))

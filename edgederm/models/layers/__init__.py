"""Building blocks shared by the model zoo (written once, reused by every family)."""
from .attention import ChannelAttention, SpatialAttention, SqueezeExcite
from .conv import ConvNormAct, LayerNorm2d
from .regularization import DropPath
from .window_attention import (
    PatchEmbed,
    PatchMerging,
    SwinBlock,
    SwinStage,
    WindowAttention,
    shifted_window_mask,
    window_partition,
    window_reverse,
)

__all__ = [
    "ChannelAttention", "SpatialAttention", "SqueezeExcite", "ConvNormAct", "LayerNorm2d",
    "DropPath", "PatchEmbed", "PatchMerging", "SwinBlock", "SwinStage", "WindowAttention",
    "shifted_window_mask", "window_partition", "window_reverse",
]

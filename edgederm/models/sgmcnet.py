"""SGMC-Net: image + metadata classifier with multidimensional collaborative fusion.

Li, Li, Zuo, Chen, Chen, Lv, "Self-contrastive Feature Guidance Based
Multidimensional Collaborative Network of metadata and image features for skin
disease classification", Pattern Recognition 156 (2024) 110742. No official code is
public; this is built from the paper's description (docs/models.md, section 4):

- backbone: ResNet-18/50 (:class:`~.layers.resnet.ResNetEncoder`, torchvision names,
  so torchvision weights load strictly with :meth:`SGMCNet.load_backbone`);
- FS block: the metadata vector is embedded once by an MLP (Linear-ReLU-Linear-ReLU,
  no BatchNorm so batch 1 trains) and that embedding feeds every CSF module;
- one CSF module after each of the four stages, its output replacing the stage
  output before the next stage:
  CF block: channel gate sigmoid(MLP(m)) from the metadata embedding alone;
  SF block: image logit map (channel max and mean -> 7x7 conv) and a metadata logit
  map (MLP -> H*W, reshaped), combined as sigmoid(gamma * image + omega * metadata)
  with learnable scalars gamma, omega (both start at 1); H x W of each stage are
  static ints computed from ``img_size`` in ``__init__`` (export-friendly);
  FR block: a 1x1 conv over [CF output, SF output] gives two logits per position,
  softmax over the two, and the blend w_cf * CF + w_sf * SF;
  decision where the paper is silent: the blend is added to the stage output
  (``csf_residual=True``) so that torchvision-pretrained features keep their scale
  at initialisation (every gate starts near 0.5);
- classifier: global average pool of the last CSF output -> dropout -> Linear;
- self-contrastive feature guidance (training only, :meth:`SGMCNet.training_loss`):
  the "views" of supervised contrastive learning (Khosla et al., NeurIPS 2020) are
  not augmentations but depths: for each guided shallow stage, the pooled feature is
  projected (MLP, C_i -> C_i -> C_4) to the deep feature's width and the SupCon loss
  runs over the 2N set [projected shallow; pooled deep], positives = same label
  (the same image's other view always included). The deep feature is detached by
  default (``detach_deep=True``): it guides, the shallow stages are optimised.
  L_con is the mean over guided stages (default all three shallow ones);
  total = CE + delta * L_con with ``delta`` (default 0.1) and temperature
  (default 0.07, SupCon's) constructor arguments, since the record gives neither;
- the projection heads live in ``feature_guidance``, outside ``network``, the
  module that ``export_stages`` exports: they are trained but never exported.

Metadata comes encoded by a schema (``edgederm/runtime/schemas``): PAD-UFES-20 for the
paper variants (102-dim here vs the paper's 81: this SDK adds a missing slot per
field, see the schema's description), ``synthetic`` for ``sgmcnet_tiny``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .base import EdgeDermModel, ExportStage
from .layers.resnet import ResNetEncoder
from .registry import register_model

PAD_UFES_20_CLASSES = ("ACK", "BCC", "MEL", "NEV", "SCC", "SEK")


def stage_sides(img_size: int, stages: int = 4) -> list[int]:
    """Spatial side of each ResNet stage output: conv1, max-pool and each later stage
    halve with ceil (padding 3/1/1), so sizes need not be multiples of 32."""
    side = math.ceil(math.ceil(img_size / 2) / 2)
    sides = [side]
    for _ in range(stages - 1):
        side = math.ceil(side / 2)
        sides.append(side)
    return sides


class MetadataEmbedding(nn.Module):
    """FS block: encoded metadata (N x D) -> embedding (N x E), shared by every CSF."""

    def __init__(self, in_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, embed_dim), nn.ReLU(inplace=True),
            nn.Linear(embed_dim, embed_dim), nn.ReLU(inplace=True),
        )

    def forward(self, metadata: torch.Tensor) -> torch.Tensor:
        return self.mlp(metadata)


class ChannelFusion(nn.Module):
    """CF block: x * sigmoid(MLP(m)) per channel."""

    def __init__(self, channels: int, embed_dim: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(8, channels // reduction)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        weights = torch.sigmoid(self.mlp(embedding))
        return x * weights[:, :, None, None]


class SpatialFusion(nn.Module):
    """SF block: x * sigmoid(gamma * image map + omega * metadata map)."""

    def __init__(self, embed_dim: int, side: int, kernel_size: int = 7) -> None:
        super().__init__()
        self.side = side  # static: the metadata map is reshaped to side x side
        self.image_conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)
        self.metadata_mlp = nn.Sequential(
            nn.Linear(embed_dim, embed_dim), nn.ReLU(inplace=True), nn.Linear(embed_dim, side * side),
        )
        self.gamma = nn.Parameter(torch.ones(1))
        self.omega = nn.Parameter(torch.ones(1))

    def spatial_map(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """The gate (N x 1 x H x W) without applying it."""
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        image_map = self.image_conv(pooled)
        metadata_map = self.metadata_mlp(embedding).reshape(-1, 1, self.side, self.side)
        return torch.sigmoid(self.gamma * image_map + self.omega * metadata_map)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return x * self.spatial_map(x, embedding)


class FeatureRectification(nn.Module):
    """FR block: per-position softmax over two logits, blend of the CF and SF outputs."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.score = nn.Conv2d(2 * channels, 2, 1)

    def blend_weights(self, channel_fused: torch.Tensor, spatial_fused: torch.Tensor) -> torch.Tensor:
        """N x 2 x H x W, summing to 1 over axis 1 (weight of CF, weight of SF)."""
        return torch.softmax(self.score(torch.cat([channel_fused, spatial_fused], dim=1)), dim=1)

    def forward(self, channel_fused: torch.Tensor, spatial_fused: torch.Tensor) -> torch.Tensor:
        weights = self.blend_weights(channel_fused, spatial_fused)
        return weights[:, 0:1] * channel_fused + weights[:, 1:2] * spatial_fused


class CSFModule(nn.Module):
    """Collaborative spatial-channel fusion of one stage: CF, SF, FR (+ residual)."""

    def __init__(self, channels: int, embed_dim: int, side: int, reduction: int = 16,
                 spatial_kernel: int = 7, residual: bool = True) -> None:
        super().__init__()
        self.channel_fusion = ChannelFusion(channels, embed_dim, reduction)
        self.spatial_fusion = SpatialFusion(embed_dim, side, spatial_kernel)
        self.rectification = FeatureRectification(channels)
        self.residual = residual

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        fused = self.rectification(self.channel_fusion(x, embedding), self.spatial_fusion(x, embedding))
        return x + fused if self.residual else fused


class SGMCNetwork(nn.Module):
    """The deployable part: backbone + FS + four CSF modules + classifier head."""

    def __init__(self, num_classes: int, img_size: int, metadata_dim: int, depth: int,
                 widths: Sequence[int], blocks: Sequence[int] | None, embed_dim: int,
                 csf_reduction: int, spatial_kernel: int, csf_residual: bool, drop_rate: float) -> None:
        super().__init__()
        self.backbone = ResNetEncoder(depth, widths, blocks)
        self.sides = stage_sides(img_size)
        self.metadata_embedding = MetadataEmbedding(metadata_dim, embed_dim)
        self.fusions = nn.ModuleList([
            CSFModule(c, embed_dim, s, csf_reduction, spatial_kernel, csf_residual)
            for c, s in zip(self.backbone.out_channels, self.sides)
        ])
        self.dropout = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.backbone.out_channels[-1], num_classes)

    def forward_features(self, dermoscopy: torch.Tensor, metadata: torch.Tensor) -> list[torch.Tensor]:
        """The four fused stage features (after each CSF module)."""
        embedding = self.metadata_embedding(metadata)
        x = self.backbone.stem(dermoscopy)
        features = []
        for stage, fusion in zip(self.backbone.stages, self.fusions):
            x = fusion(stage(x), embedding)
            features.append(x)
        return features

    def classify(self, deep: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(deep.mean(dim=(2, 3))))

    def forward(self, dermoscopy: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        return self.classify(self.forward_features(dermoscopy, metadata)[-1])


def supervised_contrastive_loss(shallow: torch.Tensor, deep: torch.Tensor, labels: torch.Tensor,
                                temperature: float = 0.07) -> torch.Tensor:
    """SupCon (Khosla et al. 2020) with two views per sample: shallow and deep (N x d each).

    Over the 2N L2-normalised embeddings, anchor i's positives are the other
    embeddings with i's label (its own other view always among them), and
    L = -mean_i mean_{p in P(i)} log(exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t)).
    """
    z = F.normalize(torch.cat([shallow, deep], dim=0), dim=1)
    both = torch.cat([labels, labels], dim=0)
    logits = z @ z.t() / temperature
    not_self = ~torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    # Self-similarity is excluded from the denominator by masking it to -inf.
    log_prob = logits - torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)
    positives = (both[:, None] == both[None, :]) & not_self
    mean_log_prob = (log_prob * positives).sum(dim=1) / positives.sum(dim=1)
    return -mean_log_prob.mean()


class ProjectionHead(nn.Module):
    """Pooled shallow feature (C_i) -> MLP -> the deep feature's width (C_4)."""

    def __init__(self, in_channels: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_channels, in_channels), nn.ReLU(inplace=True), nn.Linear(in_channels, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.mean(dim=(2, 3)))


class SelfContrastiveGuidance(nn.Module):
    """Training-only: projection heads of the guided shallow stages and the L_con."""

    def __init__(self, channels: Sequence[int], guided_stages: Sequence[int], temperature: float, detach_deep: bool) -> None:
        super().__init__()
        if any(not 0 <= i < len(channels) - 1 for i in guided_stages):
            raise ValueError(f"guided_stages {tuple(guided_stages)} must be shallow stages 0..{len(channels) - 2}")
        self.guided_stages = tuple(guided_stages)
        self.temperature = temperature
        self.detach_deep = detach_deep
        self.projections = nn.ModuleList([ProjectionHead(channels[i], channels[-1]) for i in self.guided_stages])

    def forward(self, features: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        deep = features[-1].mean(dim=(2, 3))
        if self.detach_deep:
            deep = deep.detach()
        losses = [
            supervised_contrastive_loss(head(features[i]), deep, labels, self.temperature)
            for i, head in zip(self.guided_stages, self.projections)
        ]
        return torch.stack(losses).mean()


class SGMCNet(EdgeDermModel):
    modalities = ("dermoscopy", "metadata")

    def __init__(
        self,
        num_classes: int = 6,
        img_size: int = 224,
        depth: int = 50,
        widths: Sequence[int] = (64, 128, 256, 512),
        blocks: Sequence[int] | None = None,
        metadata_schema: str | Mapping[str, Any] = "pad_ufes_20",
        embed_dim: int = 128,
        csf_reduction: int = 16,
        spatial_kernel: int = 7,
        csf_residual: bool = True,
        drop_rate: float = 0.0,
        delta: float = 0.1,
        temperature: float = 0.07,
        guided_stages: Sequence[int] = (0, 1, 2),
        detach_deep: bool = True,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(num_classes, img_size, class_names)
        from edgederm.runtime.metadata import load_schema

        schema = load_schema(metadata_schema)
        # A dict, so export puts the exact encoding into the bundle's manifest.
        self.metadata_schema = schema.to_dict()
        self.delta = delta
        self.network = SGMCNetwork(
            num_classes, img_size, schema.dim, depth, widths, blocks, embed_dim,
            csf_reduction, spatial_kernel, csf_residual, drop_rate,
        )
        self.feature_guidance = SelfContrastiveGuidance(
            self.network.backbone.out_channels, guided_stages, temperature, detach_deep,
        )

    def forward(self, dermoscopy: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        return self.network(dermoscopy, metadata)

    def contrastive_loss(self, features: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return self.feature_guidance(features, labels)

    def training_loss(self, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """CE on the logits + delta * L_con (self-contrastive feature guidance)."""
        features = self.network.forward_features(inputs["dermoscopy"], inputs["metadata"])
        logits = self.network.classify(features[-1])
        return F.cross_entropy(logits, labels) + self.delta * self.contrastive_loss(features, labels)

    def export_stages(self, batch: int = 2) -> list[ExportStage]:
        # Export ``network`` (not self) so the projection heads are not in the graph.
        return [ExportStage("classifier", self.network, self.example_inputs(batch), ["logits"],
                            image_inputs=["dermoscopy"])]

    def load_backbone(self, source: str | Path | Mapping[str, torch.Tensor]) -> list[str]:
        """Load torchvision/timm ResNet weights into the backbone (strict key map)."""
        from .pretrained import load_resnet

        return load_resnet(self.network.backbone, source)


def _paper(depth: int, kwargs: dict) -> SGMCNet:
    cfg: dict = dict(depth=depth, img_size=224, num_classes=6, metadata_schema="pad_ufes_20")
    if "num_classes" not in kwargs:
        cfg["class_names"] = PAD_UFES_20_CLASSES
    return SGMCNet(**{**cfg, **kwargs})


@register_model("sgmcnet")
def sgmcnet_tiny(**kwargs: object) -> SGMCNet:
    """SDK test/quickstart size (~0.8 M params): ResNet-18 layout at widths 16-128, 96 px, synthetic schema."""
    cfg: dict = dict(depth=18, widths=(16, 32, 64, 128), img_size=96, num_classes=3,
                     metadata_schema="synthetic", embed_dim=32)
    return SGMCNet(**{**cfg, **kwargs})


@register_model("sgmcnet", paper_size=True)
def sgmcnet_18(**kwargs: object) -> SGMCNet:
    """SGMC-18 (paper): ResNet-18, 224 px, PAD-UFES-20 metadata, 6 classes."""
    return _paper(18, dict(kwargs))


@register_model("sgmcnet", paper_size=True)
def sgmcnet_50(**kwargs: object) -> SGMCNet:
    """SGMC-50 (paper): ResNet-50, 224 px, PAD-UFES-20 metadata, 6 classes (acc 83.3, BACC 75.1)."""
    return _paper(50, dict(kwargs))

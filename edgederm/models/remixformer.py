"""RemixFormer++: multimodal (dermoscopy + clinical + metadata) skin tumour classifier.

Xu et al., "RemixFormer++: A multi-modal transformer model for precision skin tumor
differential diagnosis with memory-efficient attention", IEEE TMI 2025. No official
code; the facts and decisions are in docs/models.md, section 1. The model
is four named parts, each exported as its own graph so the runtime can stream
dermoscopy windows on a memory budget and run only the stages a request needs:

``window_encoder``  windows N x 3 x W x W (source "dermoscopy_windows") -> N x D
    ViT (paper: ViT-S/16, 384/12/6, weight compatible with ViT-S/16 checkpoints via
    :func:`load_window_encoder`) + Multi-Scale Texture Attention (MSTA). Window
    embedding = CLS token + texture embedding.
``region_encoder``  B x G x D window embeddings (G = rows*cols of the fixed grid,
    row-major, as ``runtime.tiling.iter_windows`` yields them) -> B x D
    4 transformer blocks with a CLS token; position embeddings are created in
    ``__init__`` for the maximum grid (8x8 -> 65 tokens at 2048/256) and a smaller
    grid takes its (row, col) entries through a constant index.
``clinical_encoder``  B x 3 x Hc x Wc -> clinical_features B x T x D3
    Swin-T with a CLS token (CLS-WMSA) + Lesion Selection Module + local encoder +
    cross-scale fusion. T = 1 (CLS) + stage-4 patch tokens + K_p local region
    tokens; D3 = the stage-4 width. (Tokens rather than one vector so that the
    dermoscopy token can attend to where the clinical evidence is.)
``fusion``  dermoscopy_features, clinical_features, metadata, modality_mask -> logits
    Metadata MLP, directed cross-attentions (dermoscopy<-clinical,
    clinical<-dermoscopy, metadata<-dermoscopy, metadata<-clinical), concat, head.

Decisions where the paper/record is silent (every number is a constructor argument):
- CLS-WMSA: each window's patch queries attend to [CLS, own window] (relative
  position bias on patch pairs only, the shifted-window mask as usual); the CLS
  query attends to [CLS, every patch token]. Same qkv/proj weights as the Swin
  block, so the patch path with no CLS *is* Swin and Swin-T checkpoints load.
  Between stages the CLS goes through LayerNorm + Linear(C -> 2C) (the width of the
  merged patches), at every stage transition including 3 -> 4.
- LSM: S = mean_heads(softmax(CLS->patch) * softmax(patch->CLS)), both taken from
  the last block of stage 3 and mapped back to image order (shift undone). Fixed
  top-K_p (default 4) at training and inference (the paper's sampling at training is
  left out: it needs a multinomial that does not export); the K indices are sorted
  so the local tokens come in raster order. A region is a square of
  ``crop_fraction`` x the image side centred on the selected stage-3 token, clamped
  inside the image, resampled by ``grid_sample`` to ``local_size`` (default: half the
  clinical size, i.e. native pixels for crop_fraction 0.5) with batch*K folded.
- Local encoder = the global encoder's patch embed and first three stages (the same
  modules, run at the local resolution; only the shifted-window masks differ, kept
  as buffers). The window must be the same at every shared stage (checked).
- Cross-scale fusion after stage 3: global tokens (CLS + patches) attend to all
  local tokens of the K regions and vice versa, both from the pre-fusion states,
  with residuals. The fused global tokens continue through stage 4; each region's
  fused local CLS is projected to the stage-4 width and appended to the output.
- Paper clinical size 512 (docs/models.md): Swin window 8 (7 does not tile 128/64/32/16).
  A window-7 Swin-T checkpoint loads through :func:`load_clinical_encoder`, which
  resizes the relative position bias tables bicubically (explicitly).
- MSTA: y = the window's patch tokens at scales ``texture_scales`` (avg-pooled
  s x s token grids, concatenated: the "multi-scale"); a = y t_k^T,
  c = softmax_k(-s_k a), E_k = sum_j c_jk y_j; "projected" = LayerNorm per E_k,
  Linear(D -> texture_dim) shared by the templates, flatten, Linear(K_s*texture_dim -> D).
- Metadata: the nine one-hot attributes come from a schema file
  (``edgederm/runtime/schemas/remixformer_default.json``). The paper does not publish
  the category counts, so that schema is a plausible DEFAULT the user should replace
  with their own (``metadata_schema=...``); ``remixformer_tiny`` uses "synthetic" so
  it trains on edgederm's synthetic data.
- Missing modalities: ``modality_mask`` (N x 3, order dermoscopy/clinical/metadata,
  > 0.5 = present) is an input of the fusion graph. Absent inputs are replaced by
  zeros with ``where`` (so their values, even NaN, cannot matter), every
  cross-attention has a learnt null key that stays when the attended modality is
  absent, and the absent modalities' slots of the concatenation are zeroed. No
  data-dependent Python branch. ``training_loss`` drops modalities at random
  (``modality_dropout``) so one trained model serves every subset.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .base import EdgeDermModel, ExportStage
from .layers.vit import CrossAttention, TransformerBlock, VisionTransformer, init_linear, load_vit
from .layers.window_attention import PatchEmbed, PatchMerging, SwinBlock, shifted_window_mask, window_partition, window_reverse
from .registry import register_model

MODALITY_ORDER = ("dermoscopy", "clinical", "metadata")  # columns of modality_mask


# --------------------------------------------------------------------------- clinical


class ClsSwinBlock(SwinBlock):
    """A Swin block that can carry a CLS token (CLS-WMSA).

    ``forward(x)`` is the plain Swin block (checkpoint parity); ``forward_with_cls``
    adds the CLS token: patch queries attend to [CLS, own window], the CLS query to
    [CLS, all patches]. Resolution, shift and mask are arguments so the same weights
    serve the global image and the local crops.
    """

    def forward_with_cls(
        self, x: torch.Tensor, cls: torch.Tensor, resolution: tuple[int, int], shift: int,
        mask: torch.Tensor | None, return_scores: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        height, width = resolution
        window, heads = self.window, self.attn.heads
        channels = x.shape[-1]
        head_dim = channels // heads
        n = window * window
        windows_per_image = (height // window) * (width // window)
        scale = self.attn.scale

        grid = self.norm1(x).reshape(-1, height, width, channels)
        if shift:
            grid = torch.roll(grid, shifts=(-shift, -shift), dims=(1, 2))
        qkv = self.attn.qkv(window_partition(grid, window)).reshape(-1, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # B*nW, h, n, hd
        cls_qkv = self.attn.qkv(self.norm1(cls)).reshape(-1, 1, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        cls_q, cls_k, cls_v = cls_qkv[0], cls_qkv[1], cls_qkv[2]  # B, h, 1, hd

        # Patch queries: [CLS key] + own window keys (bias and shift mask on patch pairs only).
        local = (q * scale) @ k.transpose(-2, -1) + self.attn.position_bias().unsqueeze(0)
        if mask is not None:
            local = (local.reshape(-1, windows_per_image, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).reshape(-1, heads, n, n)
        # The CLS key/value copied per window is a broadcast view, not a new token per window.
        cls_k_w = cls_k.unsqueeze(1).expand(-1, windows_per_image, -1, -1, -1).reshape(-1, heads, 1, head_dim)
        cls_v_w = cls_v.unsqueeze(1).expand(-1, windows_per_image, -1, -1, -1).reshape(-1, heads, 1, head_dim)
        to_cls = (q * scale) @ cls_k_w.transpose(-2, -1)  # B*nW, h, n, 1
        attn = torch.cat([to_cls, local], dim=-1).softmax(dim=-1)
        out = attn[..., :1] @ cls_v_w + attn[..., 1:] @ v
        out = self.attn.proj(out.transpose(1, 2).reshape(-1, n, channels))
        out = window_reverse(out, window, height, width)
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        out = out.reshape(-1, height * width, channels)

        # CLS query: itself + every patch token (order irrelevant for attention).
        k_all = k.reshape(-1, windows_per_image, heads, n, head_dim).permute(0, 2, 1, 3, 4).reshape(-1, heads, windows_per_image * n, head_dim)
        v_all = v.reshape(-1, windows_per_image, heads, n, head_dim).permute(0, 2, 1, 3, 4).reshape(-1, heads, windows_per_image * n, head_dim)
        cls_logits = torch.cat([(cls_q * scale) @ cls_k.transpose(-2, -1), (cls_q * scale) @ k_all.transpose(-2, -1)], dim=-1)
        cls_attn = cls_logits.softmax(dim=-1)  # B, h, 1, 1 + HW
        cls_out = cls_attn[..., :1] @ cls_v + cls_attn[..., 1:] @ v_all
        cls_out = self.attn.proj(cls_out.transpose(1, 2).reshape(-1, 1, channels))

        x = x + self.drop_path(out)
        cls = cls + self.drop_path(cls_out)
        assert self.norm2 is not None
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        cls = cls + self.drop_path(self.mlp(self.norm2(cls)))

        scores = None
        if return_scores:
            # Both maps in window order (rolled) -> image order, then the LSM score.
            patch_to_cls = attn[..., 0].permute(0, 2, 1)  # B*nW, n, h
            cls_to_patch = cls_attn[:, :, 0, 1:].reshape(-1, heads, windows_per_image, n).permute(0, 2, 3, 1).reshape(-1, n, heads)
            both = torch.cat([patch_to_cls, cls_to_patch], dim=-1)
            both = window_reverse(both, window, height, width)
            if shift:
                both = torch.roll(both, shifts=(shift, shift), dims=(1, 2))
            both = both.reshape(-1, height * width, 2 * heads)
            scores = (both[..., :heads] * both[..., heads:]).mean(dim=-1)  # B, HW
        return x, cls, scores


class ClsSwinStage(nn.Module):
    def __init__(self, dim: int, resolution: tuple[int, int], depth: int, heads: int, window: int, drop_path: list[float]) -> None:
        super().__init__()
        self.resolution = resolution
        self.blocks = nn.ModuleList(
            ClsSwinBlock(dim, resolution, heads, window, shift=bool(i % 2), drop_path=drop_path[i]) for i in range(depth)
        )


class CrossScaleFusion(nn.Module):
    """Global tokens attend to local tokens and the reverse, with residuals."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_global = nn.LayerNorm(dim)
        self.norm_local = nn.LayerNorm(dim)
        self.global_from_local = CrossAttention(dim, heads)
        self.local_from_global = CrossAttention(dim, heads)

    def forward(self, global_tokens: torch.Tensor, local_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, l = self.norm_global(global_tokens), self.norm_local(local_tokens)
        return global_tokens + self.global_from_local(g, l), local_tokens + self.local_from_global(l, g)


class ClinicalEncoder(nn.Module):
    """Swin-T with CLS-WMSA, Lesion Selection Module, local encoder, cross-scale fusion.

    (B, 3, S, S) -> (B, 1 + (S/32)^2 + top_k, C4), layer-normalised.
    """

    def __init__(
        self,
        img_size: int = 512,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        heads: Sequence[int] = (3, 6, 12, 24),
        window: int = 8,
        top_k: int = 4,
        local_size: int | None = None,
        crop_fraction: float = 0.5,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(depths) != 4 or len(heads) != 4:
            raise ValueError(f"the clinical Swin has 4 stages; got depths {tuple(depths)} and heads {tuple(heads)}")
        if img_size % 32:
            raise ValueError(f"clinical_size {img_size} must be a multiple of 32 (patch 4, three 2x merges); use {img_size // 32 * 32 or 32}")
        local_size = local_size or img_size // 2
        if local_size % 16:
            raise ValueError(f"local_size {local_size} must be a multiple of 16 (patch 4, two 2x merges)")
        if not 0.0 < crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        dims = [embed_dim * 2**i for i in range(4)]
        sides = [img_size // 4 // 2**i for i in range(4)]
        if top_k > sides[2] ** 2:
            raise ValueError(f"top_k {top_k} exceeds the {sides[2] ** 2} stage-3 tokens of a {img_size} px clinical image")
        self.img_size, self.local_size, self.top_k, self.crop_fraction = img_size, local_size, top_k, crop_fraction
        self.dims, self.sides = dims, sides
        self.local_sides = [local_size // 4 // 2**i for i in range(3)]
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()

        self.patch_embed = PatchEmbed(4, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.merges = nn.ModuleList()
        self.cls_projections = nn.ModuleList()
        self.stages = nn.ModuleList()
        start = 0
        for i in range(4):
            if i == 0:
                self.merges.append(nn.Identity())
                self.cls_projections.append(nn.Identity())
            else:
                self.merges.append(PatchMerging(dims[i - 1], (sides[i - 1], sides[i - 1])))
                self.cls_projections.append(nn.Sequential(nn.LayerNorm(dims[i - 1]), nn.Linear(dims[i - 1], dims[i])))
            self.stages.append(ClsSwinStage(dims[i], (sides[i], sides[i]), depths[i], heads[i], window, rates[start:start + depths[i]]))
            start += depths[i]

        # Local geometry: same blocks, crop resolution; the window must not change
        # (the relative position tables are per window size).
        self.local_shifts: list[list[int]] = []
        for i in range(3):
            side, shifts = self.local_sides[i], []
            for j, block in enumerate(self.stages[i].blocks):
                if side % block.window or side < block.window:
                    raise ValueError(
                        f"local_size {local_size}: stage {i + 1} is {side}x{side} tokens, not a multiple of the window "
                        f"{block.window} used by the global stage; choose local_size so every shared stage holds whole "
                        f"windows (e.g. {img_size // 2})"
                    )
                shift = block.window // 2 if j % 2 and block.window < side else 0
                shifts.append(shift)
                if shift:
                    self.register_buffer(f"local_mask_{i}_{j}", shifted_window_mask(side, side, block.window, shift), persistent=False)
            self.local_shifts.append(shifts)

        self.scale_fusion = CrossScaleFusion(dims[2], heads[2])
        self.local_proj = nn.Sequential(nn.LayerNorm(dims[2]), nn.Linear(dims[2], dims[3]))
        self.norm = nn.LayerNorm(dims[3])
        # Pixel-centre sampling offsets of one crop in normalised units (x, y), so
        # grid_sample reads exact pixels when the crop is local_size pixels wide.
        coords = (torch.arange(local_size, dtype=torch.float32) + 0.5) / local_size * 2 - 1
        ys, xs = torch.meshgrid(coords, coords, indexing="ij")
        self.register_buffer("crop_offsets", torch.stack([xs, ys], dim=-1), persistent=False)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_linear)

    @property
    def num_tokens(self) -> int:
        return 1 + self.sides[3] ** 2 + self.top_k

    def _geometry(self, stage: int, index: int, local: bool) -> tuple[tuple[int, int], int, torch.Tensor | None]:
        block = self.stages[stage].blocks[index]
        if not local:
            return block.resolution, block.shift, block.attn_mask
        side = self.local_sides[stage]
        shift = self.local_shifts[stage][index]
        return (side, side), shift, (getattr(self, f"local_mask_{stage}_{index}") if shift else None)

    def _run_stage(self, stage: int, x: torch.Tensor, cls: torch.Tensor, local: bool,
                   want_scores: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if stage > 0:
            side = (self.local_sides if local else self.sides)[stage - 1]
            x = self.merges[stage](x, (side, side))
            cls = self.cls_projections[stage](cls)
        scores = None
        blocks = self.stages[stage].blocks
        for j, block in enumerate(blocks):
            resolution, shift, mask = self._geometry(stage, j, local)
            x, cls, s = block.forward_with_cls(x, cls, resolution, shift, mask, return_scores=want_scores and j == len(blocks) - 1)
            scores = s if s is not None else scores
        return x, cls, scores

    def encode_shared(self, images: torch.Tensor, local: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Patch embed + stages 1-3 with the CLS token; LSM scores (B, T3) for the global pass."""
        x = self.patch_embed(images)
        # repeat, not expand: a view of a Parameter fed to a submodule under no_grad
        # trips torch's module tracker (FlopCounterMode in `edgederm models`).
        cls = self.cls_token.repeat(x.shape[0], 1, 1)
        scores = None
        for stage in range(3):
            x, cls, s = self._run_stage(stage, x, cls, local, want_scores=(stage == 2 and not local))
            scores = s if s is not None else scores
        return x, cls, scores

    def select_regions(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LSM top-K: (B, T3) scores -> sorted token indices (B, K), crop centres (B, K, 2).

        Centres are normalised (x, y) in [-1, 1] (grid_sample convention), clamped so
        the crop stays inside the image.
        """
        side = self.sides[2]
        indices = scores.topk(self.top_k, dim=-1).indices.sort(dim=-1).values
        rows = torch.div(indices, side, rounding_mode="floor")
        cols = indices - rows * side
        centre = (torch.stack([cols, rows], dim=-1).to(scores.dtype) + 0.5) / side * 2 - 1
        half = self.crop_fraction
        return indices, centre.clamp(-1 + half, 1 - half)

    def crop_boxes(self, centres: torch.Tensor) -> torch.Tensor:
        """Normalised centres (B, K, 2) -> pixel boxes (B, K, 4) as x0, y0, x1, y1."""
        half_px = self.crop_fraction * self.img_size / 2
        centre_px = (centres + 1) / 2 * self.img_size
        return torch.cat([centre_px - half_px, centre_px + half_px], dim=-1)

    def crop_regions(self, clinical: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) x (B, K, 2) -> (B*K, 3, local, local), batch and K folded."""
        grid = centres[:, :, None, None, :] + self.crop_fraction * self.crop_offsets  # B, K, l, l, 2
        grid = grid.reshape(-1, self.local_size, self.local_size, 2)
        images = clinical.unsqueeze(1).expand(-1, self.top_k, -1, -1, -1).reshape(-1, *clinical.shape[1:])
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def forward(self, clinical: torch.Tensor) -> torch.Tensor:
        g, g_cls, scores = self.encode_shared(clinical, local=False)
        assert scores is not None
        _, centres = self.select_regions(scores)
        l, l_cls, _ = self.encode_shared(self.crop_regions(clinical, centres), local=True)
        per_region = 1 + self.local_sides[2] ** 2
        global_tokens = torch.cat([g_cls, g], dim=1)
        local_tokens = torch.cat([l_cls, l], dim=1).reshape(-1, self.top_k * per_region, self.dims[2])
        global_tokens, local_tokens = self.scale_fusion(global_tokens, local_tokens)
        x, cls, _ = self._run_stage(3, global_tokens[:, 1:], global_tokens[:, :1], local=False)
        region_tokens = self.local_proj(local_tokens.reshape(-1, self.top_k, per_region, self.dims[2])[:, :, 0])
        return self.norm(torch.cat([cls, x, region_tokens], dim=1))

    def forward_swin_features(self, clinical: torch.Tensor) -> torch.Tensor:
        """The plain Swin path (no CLS, no LSM): (B, (S/32)^2, C4), normalised.

        Exists to prove checkpoint compatibility: with the CLS removed the shared
        parts are exactly Swin-T.
        """
        x = self.patch_embed(clinical)
        for i in range(4):
            if i > 0:
                x = self.merges[i](x, (self.sides[i - 1], self.sides[i - 1]))
            for block in self.stages[i].blocks:
                x = block(x)
        return self.norm(x)


def swin_key_map(key: str) -> str | None:
    """Swin-T checkpoint key (timm layout) -> :class:`ClinicalEncoder` key."""
    if key.startswith("head.") or key.endswith(("relative_position_index", "attn_mask")):
        return None
    parts = key.split(".")
    if parts[0] == "layers":
        stage = parts[1]
        if parts[2] == "downsample":
            return ".".join(["merges", stage, *parts[3:]])
        key = ".".join(["stages", stage, *parts[2:]])
        return key.replace(".mlp.fc1.", ".mlp.0.").replace(".mlp.fc2.", ".mlp.2.")
    return key


def resize_relative_position_table(table: torch.Tensor, window: int) -> torch.Tensor:
    """((2w0-1)^2, heads) -> ((2w-1)^2, heads), bicubic on the (2w0-1)^2 offset grid.

    Plain bicubic (align_corners=False); other libraries use other interpolations
    (e.g. a geometric-spacing spline), so a resized table is close to, not equal to,
    theirs. Fine-tune after resizing.
    """
    old = int(round(table.shape[0] ** 0.5))
    new = 2 * window - 1
    if old == new:
        return table
    image = table.T.reshape(1, -1, old, old).float()
    image = F.interpolate(image, size=(new, new), mode="bicubic", align_corners=False)
    return image.reshape(-1, new * new).T.contiguous().to(table.dtype)


def load_clinical_encoder(encoder: ClinicalEncoder, source: str | Path | Mapping[str, torch.Tensor]) -> list[str]:
    """Load a Swin-T checkpoint (timm layout) into the clinical encoder, strictly.

    Every Swin weight must be used and every Swin-shaped parameter of ours filled;
    only the parts Swin does not have (CLS token and projections, cross-scale fusion,
    local projection) stay at their init. Relative position tables of another window
    size are resized explicitly (:func:`resize_relative_position_table`).
    """
    from .pretrained import load_mapped, read_state_dict

    state = read_state_dict(source)
    ours = encoder.state_dict()
    for key, value in list(state.items()):
        target = swin_key_map(key)
        if target is not None and key.endswith("relative_position_bias_table") and target in ours and ours[target].shape != value.shape:
            window = (int(round(ours[target].shape[0] ** 0.5)) + 1) // 2
            state[key] = resize_relative_position_table(value, window)
    return load_mapped(encoder, state, swin_key_map,
                       ignore_ours=[r"^cls_token$", r"^cls_projections\.", r"^scale_fusion\.", r"^local_proj\."])


# --------------------------------------------------------------------------- dermoscopy


class TextureAttention(nn.Module):
    """Multi-Scale Texture Attention: K_s learnable templates over multi-scale tokens.

    a = y t_k^T, c = softmax_k(-s_k a), E_k = sum_j c_jk y_j; then projected to one
    D-vector (LayerNorm per E_k, shared Linear D -> texture_dim, flatten, Linear).
    """

    def __init__(self, dim: int, grid: int, templates: int = 32, scales: Sequence[int] = (1, 2, 4), texture_dim: int | None = None) -> None:
        super().__init__()
        bad = [s for s in scales if s < 1 or grid % s]
        if bad:
            raise ValueError(f"texture scales {bad} do not divide the {grid}x{grid} patch grid of a window; use divisors of {grid}")
        self.grid, self.scales = grid, tuple(scales)
        texture_dim = texture_dim or max(dim // 8, 8)
        self.templates = nn.Parameter(torch.randn(templates, dim) * dim**-0.5)
        self.smoothing = nn.Parameter(torch.ones(templates))  # s_k
        self.norm = nn.LayerNorm(dim)
        self.reduce = nn.Linear(dim, texture_dim)
        self.proj = nn.Linear(templates * texture_dim, dim)

    def multi_scale_tokens(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, g*g, D) -> (N, sum_s (g/s)^2, D): the token grid average-pooled at each scale."""
        channels = patches.shape[-1]
        image = patches.transpose(1, 2).reshape(-1, channels, self.grid, self.grid)
        levels = [patches if s == 1 else F.avg_pool2d(image, s).flatten(2).transpose(1, 2) for s in self.scales]
        return torch.cat(levels, dim=1) if len(levels) > 1 else levels[0]

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        """(N, M, D) tokens -> (N, K_s, D) texture encodings E."""
        a = y @ self.templates.t()  # N, M, K
        c = (-self.smoothing * a).softmax(dim=-1)  # softmax over templates k
        return c.transpose(1, 2) @ y

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        encoded = self.reduce(self.norm(self.encode(self.multi_scale_tokens(patches))))
        return self.proj(encoded.flatten(1))


class WindowEncoder(nn.Module):
    """One dermoscopy window -> one embedding: ViT CLS + texture embedding."""

    def __init__(self, window: int = 256, patch: int = 16, dim: int = 384, depth: int = 12, heads: int = 6,
                 templates: int = 32, scales: Sequence[int] = (1, 2, 4), texture_dim: int | None = None,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.vit = VisionTransformer(window, patch, dim, depth, heads, drop_path_rate=drop_path_rate)
        self.texture = TextureAttention(dim, window // patch, templates, scales, texture_dim)
        self.texture.apply(init_linear)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        tokens = self.vit(windows)
        return tokens[:, 0] + self.texture(tokens[:, 1:])


class RegionEncoder(nn.Module):
    """Window embeddings (B, rows*cols, D_in) -> region CLS (B, D).

    Position embeddings cover ``max_grid`` (+ CLS), created here once; a grid of
    ``grid`` takes the entries of its (row, col) positions through a constant index.
    """

    def __init__(self, in_dim: int, dim: int, grid: tuple[int, int], max_grid: tuple[int, int],
                 depth: int = 4, heads: int = 6, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        rows, cols = grid
        max_rows, max_cols = max_grid
        if rows > max_rows or cols > max_cols:
            raise ValueError(f"window grid {grid} exceeds the maximum grid {max_grid} the position embeddings are sized for")
        self.grid, self.max_grid = (rows, cols), (max_rows, max_cols)
        self.input_proj = nn.Linear(in_dim, dim) if in_dim != dim else nn.Identity()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + max_rows * max_cols, dim))
        index = [0] + [1 + r * max_cols + c for r in range(rows) for c in range(cols)]
        self.register_buffer("pos_index", torch.tensor(index, dtype=torch.long), persistent=False)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, drop_path=rates[i]) for i in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_linear)

    def forward(self, window_embeddings: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(window_embeddings)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed.index_select(1, self.pos_index)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])


# --------------------------------------------------------------------------- fusion


class ModalityFusion(nn.Module):
    """Metadata MLP + directed cross-attentions between modalities + classifier.

    Inputs: dermoscopy (B, Dd), clinical tokens (B, T, Dc), metadata (B, M),
    modality_mask (B, 3) -> logits (B, num_classes).
    """

    def __init__(self, derm_dim: int, clinical_dim: int, metadata_dim: int, dim: int, heads: int,
                 num_classes: int, metadata_hidden: int = 128) -> None:
        super().__init__()
        self.metadata_mlp = nn.Sequential(nn.Linear(metadata_dim, metadata_hidden), nn.GELU(), nn.Linear(metadata_hidden, dim))
        self.derm_proj = nn.Linear(derm_dim, dim)
        self.clinical_proj = nn.Linear(clinical_dim, dim)
        self.norm_derm = nn.LayerNorm(dim)
        self.norm_clinical = nn.LayerNorm(dim)
        self.norm_metadata = nn.LayerNorm(dim)
        # Learnt "nothing here" keys: the only key left when a modality is absent.
        self.null_derm = nn.Parameter(torch.zeros(1, 1, dim))
        self.null_clinical = nn.Parameter(torch.zeros(1, 1, dim))
        self.derm_from_clinical = CrossAttention(dim, heads)
        self.clinical_from_derm = CrossAttention(dim, heads)
        self.metadata_from_derm = CrossAttention(dim, heads)
        self.metadata_from_clinical = CrossAttention(dim, heads)
        self.head_norm = nn.LayerNorm(4 * dim)
        self.head = nn.Linear(4 * dim, num_classes)
        nn.init.trunc_normal_(self.null_derm, std=0.02)
        nn.init.trunc_normal_(self.null_clinical, std=0.02)
        self.apply(init_linear)

    def forward(self, dermoscopy_features: torch.Tensor, clinical_features: torch.Tensor, metadata: torch.Tensor,
                modality_mask: torch.Tensor) -> torch.Tensor:
        present = modality_mask > 0.5
        has_derm, has_clinical, has_metadata = present[:, 0:1], present[:, 1:2], present[:, 2:3]  # B, 1
        d = torch.where(has_derm, dermoscopy_features, torch.zeros_like(dermoscopy_features))
        c = torch.where(has_clinical.unsqueeze(-1), clinical_features, torch.zeros_like(clinical_features))
        m = torch.where(has_metadata, metadata, torch.zeros_like(metadata))
        d = self.derm_proj(d).unsqueeze(1)  # B, 1, dim
        c = self.clinical_proj(c)  # B, T, dim
        m = self.metadata_mlp(m).unsqueeze(1)  # B, 1, dim
        nd, nc, nm = self.norm_derm(d), self.norm_clinical(c), self.norm_metadata(m)
        always = torch.ones_like(has_derm)
        derm_keys = torch.cat([self.null_derm.expand(d.shape[0], -1, -1), nd], dim=1)
        derm_key_mask = torch.cat([always, has_derm], dim=1)
        clinical_keys = torch.cat([self.null_clinical.expand(c.shape[0], -1, -1), nc], dim=1)
        clinical_key_mask = torch.cat([always, has_clinical.expand(-1, c.shape[1])], dim=1)

        z_derm = (d + self.derm_from_clinical(nd, clinical_keys, clinical_key_mask))[:, 0]
        z_clinical = (c + self.clinical_from_derm(nc, derm_keys, derm_key_mask)).mean(dim=1)
        z_meta_derm = (m + self.metadata_from_derm(nm, derm_keys, derm_key_mask))[:, 0]
        z_meta_clinical = (m + self.metadata_from_clinical(nm, clinical_keys, clinical_key_mask))[:, 0]
        parts = [(z_derm, has_derm), (z_clinical, has_clinical), (z_meta_derm, has_metadata), (z_meta_clinical, has_metadata)]
        z = torch.cat([torch.where(p, v, torch.zeros_like(v)) for v, p in parts], dim=-1)
        return self.head(self.head_norm(z))


# --------------------------------------------------------------------------- model


class RemixFormer(EdgeDermModel):
    task = "classify"
    modalities = MODALITY_ORDER

    def __init__(
        self,
        num_classes: int = 12,
        window_size: int = 256,
        window_grid: tuple[int, int] = (8, 8),
        max_window_grid: tuple[int, int] | None = None,
        vit_patch: int = 16,
        vit_dim: int = 384,
        vit_depth: int = 12,
        vit_heads: int = 6,
        texture_templates: int = 32,
        texture_scales: Sequence[int] = (1, 2, 4),
        texture_dim: int | None = None,
        region_dim: int | None = None,
        region_depth: int = 4,
        region_heads: int = 6,
        clinical_size: int = 512,
        clinical_embed_dim: int = 96,
        clinical_depths: Sequence[int] = (2, 2, 6, 2),
        clinical_heads: Sequence[int] = (3, 6, 12, 24),
        clinical_window: int = 8,
        top_k: int = 4,
        local_size: int | None = None,
        crop_fraction: float = 0.5,
        fusion_dim: int = 384,
        fusion_heads: int = 6,
        metadata_hidden: int = 128,
        metadata_schema: str | Mapping[str, Any] = "remixformer_default",
        modality_dropout: float = 0.25,
        drop_path_rate: float = 0.0,
        class_names: Sequence[str] | None = None,
    ) -> None:
        rows, cols = int(window_grid[0]), int(window_grid[1])
        super().__init__(num_classes, max(rows, cols) * window_size, class_names)
        from edgederm.runtime.metadata import load_schema

        schema = load_schema(metadata_schema)
        self.metadata_schema = schema.to_dict()
        if not 0.0 <= modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {modality_dropout}")
        self.modality_dropout = modality_dropout
        # What the runtime needs to cut windows and size the clinical image.
        self.window_size = int(window_size)
        self.window_grid = (rows, cols)
        self.clinical_size = (clinical_size, clinical_size)
        region_dim = region_dim or vit_dim
        self.window_encoder = WindowEncoder(window_size, vit_patch, vit_dim, vit_depth, vit_heads, texture_templates,
                                            texture_scales, texture_dim, drop_path_rate)
        self.region_encoder = RegionEncoder(vit_dim, region_dim, (rows, cols), tuple(max_window_grid or (rows, cols)),  # type: ignore[arg-type]
                                            region_depth, region_heads, drop_path_rate)
        self.clinical_encoder = ClinicalEncoder(clinical_size, clinical_embed_dim, clinical_depths, clinical_heads, clinical_window,
                                                top_k, local_size, crop_fraction, drop_path_rate)
        self.fusion = ModalityFusion(region_dim, self.clinical_encoder.dims[3], schema.dim, fusion_dim, fusion_heads,
                                     num_classes, metadata_hidden)

    @property
    def input_size(self) -> tuple[int, int]:
        rows, cols = self.window_grid
        return (rows * self.window_size, cols * self.window_size)

    def sample_input(self, batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, 3, *self.input_size)

    def example_inputs(self, batch: int = 2) -> dict[str, torch.Tensor]:
        return {
            "dermoscopy": self.sample_input(batch),
            "clinical": torch.randn(batch, 3, *self.clinical_size),
            "metadata": torch.rand(batch, self.metadata_dim),
        }

    def split_windows(self, dermoscopy: torch.Tensor) -> torch.Tensor:
        """(B, 3, rows*W, cols*W) -> (B*rows*cols, 3, W, W), row-major like runtime.tiling.iter_windows."""
        rows, cols = self.window_grid
        w = self.window_size
        if tuple(dermoscopy.shape[-2:]) != self.input_size:
            raise ValueError(f"dermoscopy is {tuple(dermoscopy.shape[-2:])}; expected {self.input_size} "
                             f"({rows}x{cols} windows of {w} px)")
        x = dermoscopy.reshape(-1, 3, rows, w, cols, w).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(-1, 3, w, w)

    def encode_dermoscopy(self, dermoscopy: torch.Tensor) -> torch.Tensor:
        embeddings = self.window_encoder(self.split_windows(dermoscopy))
        rows, cols = self.window_grid
        return self.region_encoder(embeddings.reshape(-1, rows * cols, embeddings.shape[-1]))

    def forward(self, dermoscopy: torch.Tensor | None = None, clinical: torch.Tensor | None = None,
                metadata: torch.Tensor | None = None, modality_mask: torch.Tensor | None = None) -> torch.Tensor:
        given = {"dermoscopy": dermoscopy, "clinical": clinical, "metadata": metadata}
        present = [t for t in given.values() if t is not None]
        if not present:
            raise ValueError("RemixFormer needs at least one of dermoscopy, clinical, metadata")
        reference = present[0]
        batch = reference.shape[0]
        # Absent modalities become zeros and are masked inside the fusion graph,
        # exactly what the runtime feeds.
        derm_features = (self.encode_dermoscopy(dermoscopy) if dermoscopy is not None
                         else reference.new_zeros(batch, self.fusion.derm_proj.in_features))
        clinical_features = (self.clinical_encoder(clinical) if clinical is not None
                             else reference.new_zeros(batch, self.clinical_encoder.num_tokens, self.clinical_encoder.dims[3]))
        if metadata is None:
            metadata = reference.new_zeros(batch, self.metadata_dim)
        if modality_mask is None:
            flags = torch.tensor([float(given[m] is not None) for m in MODALITY_ORDER], dtype=reference.dtype, device=reference.device)
            modality_mask = flags.expand(batch, -1)
        return self.fusion(derm_features, clinical_features, metadata, modality_mask)

    def training_loss(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with modality dropout: each given modality is dropped per sample
        with probability ``modality_dropout`` (at least one kept), so every subset is trained."""
        batch = labels.shape[0]
        given = torch.tensor([float(inputs.get(m) is not None) for m in MODALITY_ORDER], device=labels.device)
        mask = given.expand(batch, -1) * (torch.rand(batch, 3, device=labels.device) >= self.modality_dropout).float()
        # A sample that lost everything keeps one given modality at random.
        empty = mask.sum(dim=1, keepdim=True) == 0
        fallback = F.one_hot((torch.rand(batch, 3, device=labels.device) * given).argmax(dim=1), 3).float()
        mask = torch.where(empty, fallback, mask)
        logits = self(**{k: v for k, v in inputs.items() if k in MODALITY_ORDER}, modality_mask=mask)
        return F.cross_entropy(logits, labels)

    def export_stages(self, batch: int = 2) -> list[ExportStage]:
        rows, cols = self.window_grid
        w, d = self.window_size, self.fusion.derm_proj.in_features
        window_dim = self.window_encoder.vit.dim
        tokens, clinical_dim = self.clinical_encoder.num_tokens, self.clinical_encoder.dims[3]
        return [
            # batch*rows*cols windows: what one batch of images feeds (N is dynamic).
            ExportStage("window_encoder", self.window_encoder, {"windows": torch.randn(batch * rows * cols, 3, w, w)}, ["window_embeddings"],
                        image_inputs=["windows"], sources={"windows": "dermoscopy_windows"}),
            ExportStage("region_encoder", self.region_encoder, {"window_embeddings": torch.randn(batch, rows * cols, window_dim)},
                        ["dermoscopy_features"], sources={"window_embeddings": "window_encoder.window_embeddings"}),
            ExportStage("clinical_encoder", self.clinical_encoder, {"clinical": torch.randn(batch, 3, *self.clinical_size)},
                        ["clinical_features"], image_inputs=["clinical"], sources={"clinical": "clinical"}),
            ExportStage("fusion", self.fusion, {
                "dermoscopy_features": torch.randn(batch, d),
                "clinical_features": torch.randn(batch, tokens, clinical_dim),
                "metadata": torch.rand(batch, self.metadata_dim),
                "modality_mask": torch.ones(batch, 3),
            }, ["logits"], sources={
                "dermoscopy_features": "region_encoder.dermoscopy_features",
                "clinical_features": "clinical_encoder.clinical_features",
                "metadata": "metadata", "modality_mask": "modality_mask",
            }),
        ]


def load_window_encoder(model: RemixFormer, source: str | Path | Mapping[str, torch.Tensor]) -> list[str]:
    """ViT-S/16 checkpoint -> the window encoder's ViT (pos embed resampled if needed)."""
    return load_vit(model.window_encoder.vit, source)


@register_model("remixformer")
def remixformer_tiny(**kwargs: Any) -> RemixFormer:
    """SDK test size: 2x2 windows of 32 px (64 px dermoscopy), ViT 64/2, 64 px clinical Swin, synthetic metadata."""
    cfg: dict = dict(
        num_classes=3, window_size=32, window_grid=(2, 2), vit_dim=64, vit_depth=2, vit_heads=2,
        texture_templates=8, texture_scales=(1, 2), region_depth=2, region_heads=2,
        clinical_size=64, clinical_embed_dim=16, clinical_depths=(2, 2, 2, 2), clinical_heads=(1, 2, 4, 8),
        clinical_window=2, fusion_dim=64, fusion_heads=2, metadata_hidden=32, metadata_schema="synthetic",
    )
    return RemixFormer(**{**cfg, **kwargs})


@register_model("remixformer", paper_size=True)
def remixformer_pp(**kwargs: Any) -> RemixFormer:
    """RemixFormer++ (paper): ViT-S/16 on 8x8 windows of 256 px (2048 px), Swin-T clinical at 512, 12 classes."""
    return RemixFormer(**{**dict(num_classes=12), **kwargs})

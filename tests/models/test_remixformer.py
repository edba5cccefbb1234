"""RemixFormer++: modality subsets, masking, CLS-WMSA/LSM, MSTA, stage composition,
and ViT-S/16 / Swin-T checkpoint compatibility (timm used only as a reference)."""
from __future__ import annotations


import pytest

torch = pytest.importorskip("torch")

from torch.nn import functional as F  # noqa: E402

from edgederm.models import create_model  # noqa: E402
from edgederm.models.layers.vit import VisionTransformer, load_vit, resample_pos_embed  # noqa: E402
from edgederm.models.pretrained import PretrainedMismatchError  # noqa: E402
from edgederm.models.remixformer import (  # noqa: E402
    MODALITY_ORDER,
    ClinicalEncoder,
    ClsSwinBlock,
    RemixFormer,
    TextureAttention,
    load_clinical_encoder,
)

SUBSETS = ["D", "C", "CD", "DM", "CM", "CDM"]
LETTER = {"D": "dermoscopy", "C": "clinical", "M": "metadata"}


@pytest.fixture(scope="module")
def tiny() -> RemixFormer:
    torch.manual_seed(0)
    return create_model("remixformer_tiny").eval()


@pytest.fixture(scope="module")
def inputs(tiny):
    torch.manual_seed(1)
    return tiny.example_inputs(batch=3)


def mask_for(subset: str, batch: int) -> torch.Tensor:
    return torch.tensor([[float(any(LETTER[c] == m for c in subset)) for m in MODALITY_ORDER]] * batch)


@pytest.mark.parametrize("subset", SUBSETS)
def test_every_modality_subset_gives_finite_logits(tiny, inputs, subset):
    given = {LETTER[c]: inputs[LETTER[c]] for c in subset}
    with torch.no_grad():
        logits = tiny(**given)
        explicit = tiny(**inputs, modality_mask=mask_for(subset, 3))
    assert logits.shape == (3, tiny.num_classes) and torch.isfinite(logits).all()
    # Leaving a modality out == feeding anything for it with its mask column at 0.
    assert torch.allclose(logits, explicit, atol=1e-6)


@pytest.mark.parametrize("subset", SUBSETS)
def test_absent_modality_values_do_not_change_logits(tiny, inputs, subset):
    mask = mask_for(subset, 3)
    changed = dict(inputs)
    for name in MODALITY_ORDER:
        if name not in {LETTER[c] for c in subset}:
            changed[name] = torch.randn_like(inputs[name]) * 100
    with torch.no_grad():
        a = tiny(**inputs, modality_mask=mask)
        b = tiny(**changed, modality_mask=mask)
        # Fusion graph: even NaN/inf in an absent modality's features cannot leak.
        d = tiny.encode_dermoscopy(inputs["dermoscopy"])
        c = tiny.clinical_encoder(inputs["clinical"])
        m = inputs["metadata"]
        poisoned = [t.clone() for t in (d, c, m)]
        for i, name in enumerate(MODALITY_ORDER):
            if mask[0, i] == 0:
                poisoned[i].fill_(float("nan"))
        p = tiny.fusion(*poisoned, mask)
    assert torch.equal(a, b)
    assert torch.equal(p, a)
    # and the present modalities do matter
    present = next(LETTER[c] for c in subset)
    changed = dict(inputs, **{present: torch.randn_like(inputs[present])})
    with torch.no_grad():
        assert not torch.allclose(tiny(**changed, modality_mask=mask), a, atol=1e-4)


def test_stages_composed_by_hand_equal_forward(tiny, inputs):
    rows, cols = tiny.window_grid
    w = tiny.window_size
    derm = inputs["dermoscopy"]
    # Windows cut one by one in row-major order, as runtime.tiling.iter_windows does.
    windows = torch.stack([derm[b, :, r * w:(r + 1) * w, c * w:(c + 1) * w]
                           for b in range(derm.shape[0]) for r in range(rows) for c in range(cols)])
    stages = {s.name: s for s in tiny.export_stages(batch=2)}
    with torch.no_grad():
        emb = stages["window_encoder"].module(windows)
        derm_features = stages["region_encoder"].module(emb.reshape(derm.shape[0], rows * cols, -1))
        clinical_features = stages["clinical_encoder"].module(inputs["clinical"])
        logits = stages["fusion"].module(derm_features, clinical_features, inputs["metadata"], torch.ones(3, 3))
        expected = tiny(**inputs)
        # Dermoscopy only: the runtime feeds zeros and the mask.
        d_only = stages["fusion"].module(derm_features, torch.zeros_like(clinical_features),
                                         torch.zeros_like(inputs["metadata"]), mask_for("D", 3))
        expected_d = tiny(dermoscopy=derm)
    assert torch.allclose(logits, expected, atol=1e-5)
    assert torch.allclose(d_only, expected_d, atol=1e-5)


def test_export_stage_contract(tiny):
    assert tiny.window_size == 32 and tiny.window_grid == (2, 2) and tiny.clinical_size == (64, 64)
    assert tiny.input_size == (64, 64)
    stages = tiny.export_stages(batch=2)
    assert [s.name for s in stages] == ["window_encoder", "region_encoder", "clinical_encoder", "fusion"]
    sources = {s.name: s.sources for s in stages}
    assert sources["window_encoder"] == {"windows": "dermoscopy_windows"}
    assert sources["region_encoder"] == {"window_embeddings": "window_encoder.window_embeddings"}
    assert sources["clinical_encoder"] == {"clinical": "clinical"}
    assert sources["fusion"] == {
        "dermoscopy_features": "region_encoder.dermoscopy_features",
        "clinical_features": "clinical_encoder.clinical_features",
        "metadata": "metadata", "modality_mask": "modality_mask",
    }
    with torch.no_grad():
        outs = {s.name: s.module(*s.inputs.values()) for s in stages}
    assert outs["window_encoder"].shape == (2 * 4, 64)
    assert outs["region_encoder"].shape == (2, 64)
    assert outs["clinical_encoder"].shape == (2, tiny.clinical_encoder.num_tokens, 128)
    assert outs["fusion"].shape == (2, 3)


def test_training_loss_with_modality_dropout(tiny, inputs):
    torch.manual_seed(0)
    tiny.train()
    try:
        loss = tiny.training_loss(inputs, torch.tensor([0, 1, 2]))
        loss.backward()
    finally:
        tiny.eval()
        tiny.zero_grad(set_to_none=True)
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------- CLS-WMSA and LSM


def dense_cls_wmsa(block: ClsSwinBlock, x, cls, resolution, shift, mask):
    """Slow reference: one dense attention over [CLS, patches] with an explicit
    allowed-pairs pattern built by loops (CLS <-> all, patch <-> same window)."""
    height, width = resolution
    w, heads, channels = block.window, block.attn.heads, x.shape[-1]
    batch, hw = x.shape[0], height * width
    grid = block.norm1(x).reshape(batch, height, width, channels)
    grid = torch.roll(grid, (-shift, -shift), (1, 2)) if shift else grid
    tokens = torch.cat([block.norm1(cls), grid.reshape(batch, hw, channels)], dim=1)
    qkv = block.attn.qkv(tokens).reshape(batch, 1 + hw, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q * block.attn.scale) @ k.transpose(-2, -1)
    bias = block.attn.position_bias()
    extra = torch.full((heads, 1 + hw, 1 + hw), float("-inf"))
    extra[:, 0, :] = 0.0
    extra[:, :, 0] = 0.0
    per_row = width // w
    for p1 in range(hw):
        r1, c1 = divmod(p1, width)
        for p2 in range(hw):
            r2, c2 = divmod(p2, width)
            if (r1 // w, c1 // w) != (r2 // w, c2 // w):
                continue
            win = (r1 // w) * per_row + c1 // w
            i, j = (r1 % w) * w + c1 % w, (r2 % w) * w + c2 % w
            extra[:, 1 + p1, 1 + p2] = bias[:, i, j] + (mask[win, i, j] if mask is not None else 0.0)
    attn = (logits + extra).softmax(dim=-1)
    out = block.attn.proj((attn @ v).transpose(1, 2).reshape(batch, 1 + hw, channels))
    patch_out = out[:, 1:].reshape(batch, height, width, channels)
    patch_out = torch.roll(patch_out, (shift, shift), (1, 2)) if shift else patch_out
    new_x = x + patch_out.reshape(batch, hw, channels)
    new_cls = cls + out[:, :1]
    new_x = new_x + block.mlp(block.norm2(new_x))
    new_cls = new_cls + block.mlp(block.norm2(new_cls))
    score = (attn[:, :, 1:, 0] * attn[:, :, 0, 1:]).mean(dim=1).reshape(batch, height, width)
    score = torch.roll(score, (shift, shift), (1, 2)) if shift else score
    return new_x, new_cls, score.reshape(batch, hw)


@pytest.mark.parametrize("shifted", [False, True])
def test_cls_wmsa_matches_dense_reference(shifted):
    torch.manual_seed(3)
    block = ClsSwinBlock(16, (8, 8), heads=2, window=4, shift=shifted).eval()
    torch.nn.init.normal_(block.attn.relative_position_bias_table, std=1.0)
    assert block.shift == (2 if shifted else 0)
    x, cls = torch.randn(2, 64, 16), torch.randn(2, 1, 16)
    with torch.no_grad():
        ours = block.forward_with_cls(x, cls, block.resolution, block.shift, block.attn_mask, return_scores=True)
        ref = dense_cls_wmsa(block, x, cls, block.resolution, block.shift, block.attn_mask)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    # the score is a product of two attention probabilities per head: in (0, 1)
    assert (ours[2] > 0).all() and (ours[2] < 1).all()


def test_lsm_selection_and_crops_match_per_sample_loop(tiny):
    enc: ClinicalEncoder = tiny.clinical_encoder
    torch.manual_seed(4)
    clinical = torch.randn(3, 3, 64, 64)
    side = enc.sides[2]
    scores = torch.rand(3, side * side)
    scores[0, 0] = 2.0  # a corner token: its crop must be clamped inside the image
    indices, centres = enc.select_regions(scores)
    crops = enc.crop_regions(clinical, centres)
    boxes = enc.crop_boxes(centres)
    assert crops.shape == (3 * enc.top_k, 3, enc.local_size, enc.local_size)
    for b in range(3):
        expected = sorted(torch.topk(scores[b], enc.top_k).indices.tolist())
        assert indices[b].tolist() == expected
        for k, index in enumerate(expected):
            x0, y0, x1, y1 = boxes[b, k].tolist()
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and x1 - x0 == 32 == y1 - y0
            token_x, token_y = (index % side + 0.5) * 64 / side, (index // side + 0.5) * 64 / side
            assert x0 <= token_x <= x1 and y0 <= token_y <= y1
            # crop = the pixels of the box (crop side == local_size: no resampling)
            reference = clinical[b, :, int(y0):int(y1), int(x0):int(x1)]
            assert torch.allclose(crops[b * enc.top_k + k], reference, atol=1e-5)
    assert boxes[0, 0, :2].tolist() == [0.0, 0.0]


def test_crops_with_resampling_match_per_sample_grid_sample():
    torch.manual_seed(5)
    enc = ClinicalEncoder(64, 8, (1, 1, 1, 1), (1, 1, 2, 2), window=2, top_k=3, local_size=32, crop_fraction=0.3)
    clinical = torch.randn(2, 3, 64, 64)
    _, centres = enc.select_regions(torch.rand(2, enc.sides[2] ** 2))
    crops = enc.crop_regions(clinical, centres)
    coords = (torch.arange(32) + 0.5) / 32 * 2 - 1
    for b in range(2):
        for k in range(3):
            cx, cy = centres[b, k].tolist()
            ys, xs = torch.meshgrid(cy + 0.3 * coords, cx + 0.3 * coords, indexing="ij")
            grid = torch.stack([xs, ys], dim=-1)[None]
            ref = F.grid_sample(clinical[b:b + 1], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
            assert torch.allclose(crops[b * 3 + k], ref, atol=1e-5)


def test_clinical_local_size_must_keep_windows():
    with pytest.raises(ValueError, match="not a multiple of the window"):
        ClinicalEncoder(64, 8, (1, 1, 1, 1), (1, 1, 2, 2), window=4, local_size=16)


def test_dermoscopy_of_wrong_size_is_refused(tiny):
    with pytest.raises(ValueError, match=r"expected \(64, 64\)"):
        tiny(dermoscopy=torch.randn(1, 3, 48, 48))


# --------------------------------------------------------------------------- texture attention


def test_texture_attention_matches_formula():
    torch.manual_seed(6)
    msta = TextureAttention(dim=8, grid=4, templates=5, scales=(1, 2))
    torch.nn.init.normal_(msta.smoothing, std=1.0)
    patches = torch.randn(2, 16, 8)
    with torch.no_grad():
        y = msta.multi_scale_tokens(patches)
        encoded = msta.encode(y)
    # scale 2: mean of each 2x2 block of the 4x4 token grid, row-major
    grid = patches.reshape(2, 4, 4, 8)
    pooled = torch.stack([grid[:, 2 * r:2 * r + 2, 2 * c:2 * c + 2].mean(dim=(1, 2)) for r in range(2) for c in range(2)], dim=1)
    assert torch.allclose(y, torch.cat([patches, pooled], dim=1), atol=1e-6)
    t, s = msta.templates.detach(), msta.smoothing.detach()
    for n in range(2):
        for k in range(5):
            e = torch.zeros(8)
            for j in range(y.shape[1]):
                a = torch.stack([y[n, j] @ t[kk] for kk in range(5)])
                c = torch.exp(-s * a) / torch.exp(-s * a).sum()
                e += c[k] * y[n, j]
            assert torch.allclose(encoded[n, k], e, atol=1e-5)


# --------------------------------------------------------------------------- checkpoints


def _timm():
    return pytest.importorskip("timm", reason="timm not installed (reference only)")


# Reference models are built once per module: their random init dominates the runtime.
@pytest.fixture(scope="module")
def timm_vit_256():
    torch.manual_seed(7)
    return _timm().create_model("vit_small_patch16_224", pretrained=False, img_size=256).eval()


@pytest.fixture(scope="module")
def vit_state_224():
    torch.manual_seed(8)
    return _timm().create_model("vit_small_patch16_224", pretrained=False).state_dict()


@pytest.fixture(scope="module")
def our_vit_256():
    return VisionTransformer(256, 16, 384, 12, 6).eval()


@pytest.fixture(scope="module")
def timm_swin():
    torch.manual_seed(9)
    return _timm().create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()


def test_window_vit_loads_vit_small_patch16_strictly(timm_vit_256, our_vit_256):
    dropped = load_vit(our_vit_256, timm_vit_256.state_dict())
    assert dropped == ["head.weight", "head.bias"]
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        ref = timm_vit_256.forward_features(x)
        got = our_vit_256(x)
    assert torch.allclose(got[:, 0], ref[:, 0], atol=1e-5), (got[:, 0] - ref[:, 0]).abs().max()
    assert torch.allclose(got, ref, atol=1e-5)


def test_window_vit_resamples_a_224_checkpoint_explicitly(timm_vit_256, vit_state_224, our_vit_256):
    timm = _timm()
    state = dict(vit_state_224)
    assert state["pos_embed"].shape == (1, 197, 384)
    expected_pos = timm.layers.resample_abs_pos_embed(state["pos_embed"], [16, 16], num_prefix_tokens=1)
    load_vit(our_vit_256, state)
    assert torch.allclose(our_vit_256.pos_embed.detach(), expected_pos, atol=1e-6)
    assert torch.equal(resample_pos_embed(state["pos_embed"], (14, 14)), state["pos_embed"])
    # timm at 256 given the same resampled checkpoint: same window features.
    timm_vit_256.load_state_dict({**state, "pos_embed": expected_pos})
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.allclose(our_vit_256(x)[:, 0], timm_vit_256.forward_features(x)[:, 0], atol=1e-5)


def test_window_encoder_of_the_model_takes_the_checkpoint(tiny, vit_state_224):
    # the wrong architecture (tiny ViT) is refused with the keys named
    with pytest.raises(PretrainedMismatchError, match="shape mismatches"):
        load_vit(tiny.window_encoder.vit, vit_state_224)


def test_clinical_swin_loads_swin_tiny_strictly(timm_swin):
    """With the CLS token removed the clinical encoder's shared parts are Swin-T:
    exact features. (With CLS-WMSA every patch also attends to the CLS token, so
    whole-encoder equality with a CLS-less Swin is impossible by design.)"""
    ours = ClinicalEncoder(224, 96, (2, 2, 6, 2), (3, 6, 12, 24), window=7).eval()
    dropped = load_clinical_encoder(ours, timm_swin.state_dict())
    assert sorted(dropped) == ["head.fc.bias", "head.fc.weight"]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = timm_swin.forward_features(x).reshape(1, 49, 768)
        got = ours.forward_swin_features(x)
        full = ours(x)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    assert full.shape == (1, 1 + 49 + 4, 768) and torch.isfinite(full).all()


def test_window7_swin_checkpoint_loads_into_window8_encoder(timm_swin):
    state = dict(timm_swin.state_dict())
    enc = ClinicalEncoder(256, 96, (2, 2, 6, 2), (3, 6, 12, 24), window=8)
    load_clinical_encoder(enc, state)
    table = enc.stages[0].blocks[0].attn.relative_position_bias_table
    assert table.shape == (15 * 15, 3)
    # constant tables stay constant under the bicubic resize
    state["layers.0.blocks.0.attn.relative_position_bias_table"] = torch.full((169, 3), 0.7)
    load_clinical_encoder(enc, state)
    assert torch.allclose(enc.stages[0].blocks[0].attn.relative_position_bias_table, torch.tensor(0.7), atol=1e-5)
    state.pop("norm.weight")
    with pytest.raises(PretrainedMismatchError, match="left unfilled"):
        load_clinical_encoder(enc, state)


# --------------------------------------------------------------------------- paper size


def test_paper_variant_construction_and_parameter_count():
    torch.manual_seed(0)
    model = create_model("remixformer_pp")
    params = sum(p.numel() for p in model.parameters())
    assert 55e6 < params < 70e6, params  # measured 61.72 M (no published figure)
    assert model.num_classes == 12
    assert model.window_size == 256 and model.window_grid == (8, 8) and model.input_size == (2048, 2048)
    assert model.clinical_size == (512, 512)
    assert model.region_encoder.pos_embed.shape == (1, 65, 384)
    assert model.metadata_dim == 52
    vit = model.window_encoder.vit
    assert (vit.dim, len(vit.blocks), vit.blocks[0].attn.heads, vit.grid) == (384, 12, 6, 16)
    assert len(model.region_encoder.blocks) == 4
    assert model.clinical_encoder.top_k == 4 and model.clinical_encoder.num_tokens == 1 + 256 + 4
    assert model.window_encoder.texture.templates.shape == (32, 384)
    smaller = RemixFormer(window_grid=(4, 6), max_window_grid=(8, 8), clinical_depths=(1, 1, 1, 1), vit_depth=1)
    assert smaller.region_encoder.pos_index.tolist()[:8] == [0, 1, 2, 3, 4, 5, 6, 9]

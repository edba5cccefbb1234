"""CFFormer: paper sizes, CFCA and XFF against their formulas, loss by hand, pretrained key maps."""
from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from edgederm.models import create_model  # noqa: E402
from edgederm.models.cfformer import CFCA, CFFormer, SwinV2Encoder, dice_ce_loss, swin_v2_key_map  # noqa: E402
from edgederm.models.pretrained import load_mapped, load_resnet  # noqa: E402

# Reference sizes at 224 px (docs/models.md, section 3), in millions of parameters.
PAPER_PARAMS_M = {"cfformer_s": 98.3, "cfformer_b": 119.7, "cfformer_l": 184.8}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_paper_parameter_counts(name):
    with torch.device("meta"):  # construction only: shapes without allocating or initialising weights
        model = create_model(name)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params_m - PAPER_PARAMS_M[name]) / PAPER_PARAMS_M[name] < 0.10, f"{name}: {params_m:.2f} M"
    assert model.input_size == (224, 224) and model.num_classes == 2 and model.task == "segment"


def _cfca_by_formula(module: CFCA, cnn: torch.Tensor, trans: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CFCA written out element-wise: SE vectors, outer product, softmax by exp/sum."""
    def excite(se, x):
        w1, b1 = se.fc[0].weight[:, :, 0, 0], se.fc[0].bias
        w2, b2 = se.fc[2].weight[:, :, 0, 0], se.fc[2].bias
        pooled = x.mean(dim=(2, 3))
        return torch.sigmoid(torch.relu(pooled @ w1.T + b1) @ w2.T + b2)

    e_c, e_t = excite(module.cnn_excite, cnn), excite(module.trans_excite, trans)  # N x Cc, N x Ct
    q = e_c[:, :, None] * e_t[:, None, :]  # N x Cc x Ct
    # softmax over the transformer axis (dim 2): weights that mix T's channels into each CNN channel
    a_tc = q.exp() / q.exp().sum(dim=2, keepdim=True)
    # softmax over the CNN axis (dim 1): weights that mix C's channels into each transformer channel
    a_ct = q.exp() / q.exp().sum(dim=1, keepdim=True)
    from_trans = (a_tc[:, :, :, None, None] * trans[:, None]).sum(dim=2)  # N x Cc x H x W
    from_cnn = (a_ct[:, :, :, None, None] * cnn[:, :, None]).sum(dim=1)  # N x Ct x H x W
    return cnn + from_trans, trans + from_cnn


def test_cfca_matches_formula_and_softmax_axes():
    torch.manual_seed(0)
    cnn_channels, trans_channels = 6, 10
    module = CFCA(cnn_channels, trans_channels).double()
    # the squeeze-excitations are excited through the other encoder's width
    assert module.cnn_excite.fc[0].out_channels == trans_channels
    assert module.trans_excite.fc[0].out_channels == cnn_channels
    for p in module.parameters():  # spread the SE outputs so the softmaxes are far from uniform
        torch.nn.init.normal_(p, std=2.0)
    cnn = torch.randn(3, cnn_channels, 5, 7, dtype=torch.float64)
    trans = torch.randn(3, trans_channels, 5, 7, dtype=torch.float64)
    out_cnn, out_trans = module(cnn, trans)
    assert out_cnn.shape == cnn.shape and out_trans.shape == trans.shape
    ref_cnn, ref_trans = _cfca_by_formula(module, cnn, trans)
    assert (out_cnn - ref_cnn).abs().max() < 1e-6
    assert (out_trans - ref_trans).abs().max() < 1e-6
    # the test discriminates: the other softmax axis gives a clearly different result
    q = module.affinity(cnn, trans)
    wrong = cnn + torch.bmm(q.softmax(dim=1), trans.flatten(2)).reshape(cnn.shape)
    assert (wrong - out_cnn).abs().max() > 1e-3
    # convex mixes: each CNN channel of a constant-1 transformer map receives exactly 1,
    # and each transformer channel of a constant-1 CNN map receives exactly 1
    c_only, _ = module(torch.zeros_like(cnn), torch.ones_like(trans))
    _, t_only = module(torch.ones_like(cnn), torch.zeros_like(trans))
    assert torch.allclose(c_only, torch.ones_like(cnn), atol=1e-12)
    assert torch.allclose(t_only, torch.ones_like(trans), atol=1e-12)


def test_dice_ce_loss_by_hand():
    # two pixels, two classes: p = (0.25, 0.75) and (0.75, 0.25); both pixels are class 1
    logits = torch.tensor([[[[0.0, math.log(3.0)]], [[math.log(3.0), 0.0]]]])  # 1 x 2 x 1 x 2
    target = torch.tensor([[[1, 1]]])
    ce = (-math.log(0.75) - math.log(0.25)) / 2
    s = 1e-5
    dice_background = (0 + s) / (1.0 + 0 + s)  # sum p0 = 1, no background pixel
    dice_lesion = (2 * (0.75 + 0.25) + s) / (1.0 + 2 + s)
    expected = 0.5 * ce + 0.5 * (1 - (dice_background + dice_lesion) / 2)
    assert abs(dice_ce_loss(logits, target).item() - expected) < 1e-6
    # a perfect, confident prediction costs ~0
    perfect = torch.tensor([[[[-20.0, -20.0]], [[20.0, 20.0]]]])
    assert dice_ce_loss(perfect, target).item() < 0.5 * (1 - (s / (1 + s) + 1) / 2) + 1e-6
    with pytest.raises(ValueError, match="expected N x H x W"):
        dice_ce_loss(logits, target[0])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("cfformer_tiny").eval()


def test_tiny_mask_shape_and_training_loss(tiny):
    inputs = tiny.example_inputs(batch=2)
    with torch.no_grad():
        logits = tiny(**inputs)
    assert logits.shape == (2, 2, 64, 64)
    labels = torch.randint(0, 2, (2, 64, 64))
    loss = tiny.training_loss(inputs, labels)
    assert torch.isfinite(loss) and loss.ndim == 0
    assert torch.allclose(loss, dice_ce_loss(logits, labels), atol=1e-6)


def test_cfca_sums_feed_next_stage_of_both_encoders(tiny):
    captured = {}
    hooks = [
        tiny.cnn.layer2.register_forward_pre_hook(lambda m, a: captured.__setitem__("cnn_in", a[0])),
        tiny.transformer.merges[0].register_forward_pre_hook(lambda m, a: captured.__setitem__("trans_in", a[0])),
        tiny.cfca[0].register_forward_hook(lambda m, a, out: captured.__setitem__("cfca", out)),
        tiny.xff[0].register_forward_pre_hook(lambda m, a: captured.__setitem__("xff_in", a)),
    ]
    try:
        with torch.no_grad():
            tiny(torch.randn(1, 3, 64, 64))
    finally:
        for h in hooks:
            h.remove()
    cnn_sum, trans_sum = captured["cfca"]
    assert torch.equal(captured["cnn_in"], cnn_sum)
    assert torch.equal(captured["trans_in"], trans_sum.flatten(2).transpose(1, 2))
    assert torch.equal(captured["xff_in"][0], cnn_sum) and torch.equal(captured["xff_in"][1], trans_sum)


def test_bad_input_size_is_refused():
    with pytest.raises(ValueError, match="not a multiple of 32.*use 64 or 96"):
        CFFormer(img_size=80)


torchvision = pytest.importorskip("torchvision", reason="torchvision not installed (reference weights for the key maps)")


def test_resnet34_branch_loads_torchvision_weights():
    torch.manual_seed(1)
    reference = torchvision.models.resnet34().eval()
    # ResNet-34 CNN branch; a narrow transformer keeps the test fast (it does not touch the CNN)
    model = CFFormer(img_size=64, embed_dim=16, depths=(1, 1, 1, 1), heads=(1, 1, 1, 1), window=4).eval()
    assert load_resnet(model.cnn, reference.state_dict()) == ["fc.weight", "fc.bias"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        stem = reference.relu(reference.bn1(reference.conv1(x)))
        assert torch.allclose(model.encode(x)[0], stem, atol=1e-5, rtol=1e-5)  # the H/2 skip
        r = reference.maxpool(stem)
        for ours, layer in zip(model.cnn(x), [reference.layer1, reference.layer2, reference.layer3, reference.layer4]):
            r = layer(r)
            assert torch.allclose(ours, r, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def swin_v2_t():
    torch.manual_seed(2)
    reference = torchvision.models.swin_v2_t().eval()
    with torch.no_grad():
        for name, param in reference.named_parameters():  # Swin V2 ignores the key bias: values must not matter
            if name.endswith("attn.qkv.bias"):
                param[param.numel() // 3: 2 * param.numel() // 3].normal_()
    return reference


@pytest.mark.parametrize("size", [256, 224])  # 256: torchvision's input size; 224: paper size, padded windows
def test_swin_v2_branch_matches_torchvision(swin_v2_t, size):
    reference = swin_v2_t
    state = reference.state_dict()
    encoder = SwinV2Encoder(size, 96, (2, 2, 6, 2), (3, 6, 12, 24), window=8).eval()
    dropped = load_mapped(encoder, state, swin_v2_key_map)
    assert {k for k in dropped if not k.endswith(("relative_coords_table", "relative_position_index"))} == {
        "norm.weight", "norm.bias", "head.weight", "head.bias"}
    # the dropped position buffers are recomputed identically in __init__
    ref_attn = reference.features[1][0].attn
    ours_attn = encoder.stages[0].blocks[0].attn
    assert torch.allclose(ref_attn.relative_coords_table.reshape(-1, 2), ours_attn.relative_coords_table)
    assert torch.equal(ref_attn.relative_position_index.flatten(), ours_attn.relative_position_index)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        ours = encoder(x)
        r = x
        feats = []
        for i, block in enumerate(reference.features):
            r = block(r)
            if i % 2 == 1:
                feats.append(r.permute(0, 3, 1, 2))
    for a, b in zip(ours, feats):
        assert a.shape == b.shape
        assert (a - b).abs().max() < 1e-5 * max(1.0, b.abs().max().item()), f"max abs diff {(a - b).abs().max():.2e}"

"""TransXV2S-Net: paper parameter count, fusion scalars in use, DCGA graph stage against
a per-sample loop, and both backbones against their reference implementations
(torchvision efficientnet_v2_s, timm legacy_xception; random init, no download)."""
from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from torch.nn import functional as F  # noqa: E402

from edgederm.models import create_model  # noqa: E402
from edgederm.models.pretrained import PretrainedMismatchError  # noqa: E402
from edgederm.models.transxv2s import DualContextualGraphAttention, TransXV2SNet  # noqa: E402

PAPER_PARAMS = 60.69e6


@pytest.fixture(scope="module")
def paper_model():
    torch.manual_seed(0)
    return create_model("transxv2s_net")


def test_paper_parameter_count(paper_model):
    parts = paper_model.parameter_breakdown()
    total = parts["total"]
    assert total == sum(p.numel() for p in paper_model.parameters())
    assert abs(total - PAPER_PARAMS) / PAPER_PARAMS < 0.10, parts
    # the two standard backbones, without their classifiers (docs/models.md: ~20.2 M, ~20.8 M)
    assert parts["efficientnetv2"] == 20_177_488
    assert parts["xception"] == 20_806_952
    assert sum(v for k, v in parts.items() if k != "total") == total
    assert paper_model.num_classes == 8 and paper_model.input_size == (224, 224)


def test_paper_swin_stage_sits_at_stage4_with_shifted_windows(paper_model):
    branch = paper_model.efficient_swin
    assert branch.tap == 3 and branch.efficientnet.out_channels[3] == 128
    assert branch.swin_resolution == (14, 14)  # H/16 at 224 px
    blocks = branch.swin.blocks
    assert [b.shift for b in blocks] == [0, 3] * 3
    mask = blocks[1].attn_mask
    assert mask.shape == (4, 49, 49) and (mask == -100).any() and not mask[0].any()
    # one DCGA per Xception block; k clamped to the 7 x 7 exit map
    dcga = paper_model.xception_dcga.dcga
    assert len(dcga) == 12 and all(isinstance(m, DualContextualGraphAttention) for m in dcga)
    assert [m.top_k for m in dcga] == [64] * 11 + [49]
    assert isinstance(dcga[-1].top_k, int)


def test_fusion_scalars_receive_gradients():
    torch.manual_seed(0)
    model = create_model("transxv2s_tiny").eval()
    x = model.sample_input(2)
    out = model(dermoscopy=x)
    out.square().mean().backward()
    for name in ("theta", "eta", "alpha", "beta", "gamma", "delta"):
        grad = getattr(model, name).grad
        assert grad is not None and grad.abs() > 0, name
    # and they change the output
    with torch.no_grad():
        model.delta.mul_(3.0)
        assert not torch.allclose(model(dermoscopy=x), out, atol=1e-6)


def _graph_stage_loop(module: DualContextualGraphAttention, nodes: torch.Tensor):
    """Slow reference: one sample at a time, Python sort for the top-k."""
    distributed, pooled, indices = [], [], []
    k, hw, hidden = module.top_k, nodes.shape[1], nodes.shape[2]
    for n in nodes:
        logits = module.score(n)[:, 0]
        scores = torch.softmax(torch.tanh(logits), dim=0)
        order = sorted(range(hw), key=lambda i: -float(logits[i]))[:k]
        key = torch.stack([n[i] * scores[i] * hw for i in order])
        relation = key @ n.T / math.sqrt(hidden)
        h1 = key + F.relu(module.graph_conv1(torch.softmax(relation, dim=1) @ n))
        h2 = h1 + F.relu(module.graph_conv2(torch.softmax(relation[:, order], dim=1) @ h1))
        distributed.append(torch.softmax(relation.T, dim=1) @ h2)
        pooled.append(h2.mean(0))
        indices.append(order)
    return torch.stack(distributed), torch.stack(pooled), torch.tensor(indices)


@pytest.mark.parametrize("side,top_k", [(12, 64), (5, 64), (6, 8)])
def test_dcga_graph_stage_matches_loop(side, top_k):
    torch.manual_seed(side)
    module = DualContextualGraphAttention(32, (side, side), reduction=2, top_k=top_k).eval()
    nodes = torch.randn(3, side * side, 16)
    with torch.no_grad():
        distributed, pooled, index = module.graph_stage(nodes)
        ref_distributed, ref_pooled, ref_index = _graph_stage_loop(module, nodes)
    assert torch.equal(index, ref_index)
    assert torch.allclose(distributed, ref_distributed, atol=1e-5, rtol=1e-5)
    assert torch.allclose(pooled, ref_pooled, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side,expected_k", [(12, 64), (5, 25), (3, 9)])
def test_dcga_topk_gather_shapes(side, expected_k):
    module = DualContextualGraphAttention(40, (side, side), reduction=4, top_k=64).eval()
    assert module.top_k == expected_k and isinstance(module.top_k, int)
    x = torch.randn(2, 40, side, side)
    nodes = module.collect(x)
    assert nodes.shape == (2, side * side, 10)
    distributed, pooled, index = module.graph_stage(nodes)
    assert index.shape == (2, expected_k) and index.dtype == torch.int64
    assert distributed.shape == (2, side * side, 10) and pooled.shape == (2, 10)
    # the gathered nodes are exactly the rows the indices name
    gathered = torch.gather(nodes, 1, index.unsqueeze(-1).expand(-1, -1, 10))
    assert torch.equal(gathered[1, 0], nodes[1, index[1, 0]])
    y, graph_feature = module(x)
    assert y.shape == x.shape and graph_feature.shape == (2, 10)


def _randomize_batchnorm(model: torch.nn.Module, seed: int) -> None:
    # random-init references have unit BN statistics; perturb them so the comparison
    # exercises every BN parameter and buffer
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)


def _small_model(**kwargs) -> TransXV2SNet:
    # paper backbones at 96 px (Swin stage at 6 x 6 needs a window dividing 6)
    return TransXV2SNet(img_size=96, swin_window=3, swin_depth=2, **kwargs).eval()


def test_efficientnet_matches_torchvision():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(1)
    reference = torchvision.models.efficientnet_v2_s().eval()
    _randomize_batchnorm(reference, 1)
    model = _small_model(dcga=False)
    assert model.load_efficientnet(reference.state_dict()) == ["classifier.1.weight", "classifier.1.bias"]
    backbone = model.efficient_swin.efficientnet
    x = torch.randn(2, 3, 96, 96)
    worst = 0.0
    with torch.no_grad():
        ours = backbone.stage_outputs(x)
        r = reference.features[0](x)
        for i in range(6):
            r = reference.features[i + 1](r)
            assert ours[i].shape == r.shape
            worst = max(worst, float((ours[i] - r).abs().max()))
            assert torch.allclose(ours[i], r, atol=1e-5, rtol=1e-5), f"stage {i + 1}"
        r = reference.features[7](r)
        f_eff, _ = model.efficient_swin(x)
        assert torch.allclose(f_eff, r.mean(dim=(2, 3)), atol=1e-5, rtol=1e-5)
        assert r.abs().max() > 0.1  # a real signal, not a near-zero comparison
    print(f"efficientnet_v2_s max abs diff {worst:.2e}")


def test_xception_matches_timm():
    timm = pytest.importorskip("timm")
    torch.manual_seed(2)
    reference = timm.create_model("legacy_xception", pretrained=False).eval()
    _randomize_batchnorm(reference, 2)
    model = _small_model(dcga=False)
    assert model.load_xception(reference.state_dict()) == ["fc.weight", "fc.bias"]
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        r = reference.forward_features(x)
        ours = model.xception_dcga.xception(x)
        f_xcept, _ = model.xception_dcga(x)
    diff = float((ours - r).abs().max())
    print(f"legacy_xception max abs diff {diff:.2e}")
    assert ours.shape == r.shape == (2, 2048, 3, 3)
    assert torch.allclose(ours, r, atol=1e-5, rtol=1e-5) and r.abs().max() > 0.1
    assert torch.allclose(f_xcept, r.mean(dim=(2, 3)), atol=1e-5, rtol=1e-5)
    # with DCGA on, the same Xception weights still load (DCGA lives beside the backbone)
    assert _small_model(dcga_top_k=16).load_xception(reference.state_dict()) == ["fc.weight", "fc.bias"]


def test_wrong_reference_is_refused():
    torchvision = pytest.importorskip("torchvision")
    model = create_model("transxv2s_tiny")
    with pytest.raises(PretrainedMismatchError, match="shape mismatches|left unfilled|map to no parameter"):
        model.load_efficientnet(torchvision.models.efficientnet_v2_s().state_dict())


def test_bad_configuration_messages():
    with pytest.raises(ValueError, match="dcga_blocks"):
        create_model("transxv2s_tiny", dcga_blocks=[0, 20])
    with pytest.raises(ValueError, match="swin_tap_stage"):
        create_model("transxv2s_tiny", swin_tap_stage=7)
    with pytest.raises(ValueError, match="not a multiple of window"):
        create_model("transxv2s_tiny", swin_window=4)

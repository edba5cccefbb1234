"""SGMC-Net: metadata reaches the logits, CSF blocks compute what the paper says,
SupCon and the training loss match slow references, projection heads stay out of
the exported graph, the backbone loads torchvision weights, schemas encode."""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.nn import functional as F  # noqa: E402

from edgederm.models import create_model  # noqa: E402
from edgederm.models.sgmcnet import (  # noqa: E402
    CSFModule,
    FeatureRectification,
    SGMCNet,
    stage_sides,
    supervised_contrastive_loss,
)
from edgederm.runtime.errors import InputError  # noqa: E402
from edgederm.runtime.metadata import load_schema  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("sgmcnet_tiny").eval()


def test_metadata_changes_logits(tiny):
    schema = load_schema("synthetic")
    meta = torch.from_numpy(schema.encode_many([
        {"age": 30, "sex": "female", "site": "back"},
        {"age": 80, "sex": "male", "site": "face"},
    ]))
    image = torch.randn(1, 3, 96, 96).expand(2, -1, -1, -1)
    with torch.no_grad():
        logits = tiny(dermoscopy=image, metadata=meta)
        same = tiny(dermoscopy=image, metadata=meta[:1].expand(2, -1))
    assert (logits[0] - logits[1]).abs().max() > 1e-4, "metadata did not change the logits"
    torch.testing.assert_close(same[0], same[1], rtol=0, atol=1e-6)


def test_fr_blend_weights_sum_to_one_and_match_direct_computation():
    torch.manual_seed(1)
    fr = FeatureRectification(8)
    cf, sf = torch.randn(3, 8, 5, 5), torch.randn(3, 8, 5, 5)
    weights = fr.blend_weights(cf, sf)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3, 5, 5), rtol=0, atol=1e-6)
    # Direct: 1x1 conv = per-position matmul over the 16 concatenated channels.
    stacked = torch.cat([cf, sf], dim=1).permute(0, 2, 3, 1)  # N H W 16
    scores = stacked @ fr.score.weight.view(2, 16).t() + fr.score.bias  # N H W 2
    e = scores.exp()
    direct = (e / e.sum(-1, keepdim=True)).permute(0, 3, 1, 2)
    torch.testing.assert_close(weights, direct, rtol=0, atol=1e-6)
    expected = direct[:, 0:1] * cf + direct[:, 1:2] * sf
    torch.testing.assert_close(fr(cf, sf), expected, rtol=0, atol=1e-6)


def test_csf_module_matches_direct_computation():
    torch.manual_seed(2)
    csf = CSFModule(channels=16, embed_dim=6, side=5, reduction=4).eval()
    with torch.no_grad():
        csf.spatial_fusion.gamma.fill_(0.7)
        csf.spatial_fusion.omega.fill_(-1.3)
    x, m = torch.randn(2, 16, 5, 5), torch.randn(2, 6)
    cf_mlp, sf = csf.channel_fusion.mlp, csf.spatial_fusion
    channel = x * torch.sigmoid(cf_mlp(m))[:, :, None, None]
    image_map = F.conv2d(torch.stack([x.max(1).values, x.mean(1)], 1), sf.image_conv.weight, sf.image_conv.bias, padding=3)
    metadata_map = sf.metadata_mlp(m).view(2, 1, 5, 5)
    spatial = x * torch.sigmoid(0.7 * image_map - 1.3 * metadata_map)
    fused = csf.rectification(channel, spatial)
    with torch.no_grad():
        torch.testing.assert_close(csf(x, m), x + fused, rtol=0, atol=1e-5)
        assert csf.spatial_fusion.spatial_map(x, m).shape == (2, 1, 5, 5)


def _supcon_slow(shallow, deep, labels, temperature):
    rows = torch.cat([shallow, deep]).tolist()
    z = [[a / math.sqrt(sum(b * b for b in v)) for a in v] for v in rows]
    y = labels.tolist() * 2
    n = len(z)

    def sim(i, j):
        return sum(a * b for a, b in zip(z[i], z[j])) / temperature

    total = 0.0
    for i in range(n):
        denominator = sum(math.exp(sim(i, a)) for a in range(n) if a != i)
        positives = [p for p in range(n) if p != i and y[p] == y[i]]
        total += -sum(math.log(math.exp(sim(i, p)) / denominator) for p in positives) / len(positives)
    return total / n


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_supervised_contrastive_loss_matches_slow_reference(temperature):
    torch.manual_seed(3)
    shallow, deep = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    fast = supervised_contrastive_loss(shallow, deep, labels, temperature)
    assert abs(float(fast) - _supcon_slow(shallow, deep, labels, temperature)) < 1e-5
    fast32 = supervised_contrastive_loss(shallow.float(), deep.float(), labels, temperature)
    assert abs(float(fast32) - _supcon_slow(shallow, deep, labels, temperature)) < 1e-5 * max(1.0, float(fast))


def test_training_loss_is_ce_plus_delta_lcon():
    torch.manual_seed(4)
    model = create_model("sgmcnet_tiny", delta=0.37).eval()
    inputs = model.example_inputs(batch=4)
    labels = torch.tensor([0, 2, 0, 1])
    total = model.training_loss(inputs, labels)
    ce = F.cross_entropy(model(**inputs), labels)
    con = model.contrastive_loss(model.network.forward_features(**inputs), labels)
    assert float(con.detach()) > 0
    torch.testing.assert_close(total, ce + 0.37 * con, rtol=0, atol=1e-6)
    model.delta = 0.0
    torch.testing.assert_close(model.training_loss(inputs, labels), ce, rtol=0, atol=1e-6)
    # The guidance trains the projection heads; the logits alone never reach them.
    model.delta = 0.37
    model.zero_grad()
    model.training_loss(inputs, labels).backward()
    heads = list(model.feature_guidance.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)
    model.zero_grad()
    model(**inputs).sum().backward()
    assert all(p.grad is None for p in heads)


def test_training_loss_runs_at_batch_one_in_train_mode(tiny):
    model = create_model("sgmcnet_tiny").train()
    loss = model.training_loss(model.example_inputs(batch=1), torch.tensor([2]))
    assert torch.isfinite(loss)
    loss.backward()


@pytest.mark.slow
def test_projection_heads_absent_from_exported_graph(tiny, tmp_path):
    onnx = pytest.importorskip("onnx")
    from edgederm.export.onnx import export_stage_onnx

    (stage,) = tiny.export_stages(batch=2)
    assert stage.module is tiny.network and stage.outputs == ["logits"]
    assert not any(m is tiny.feature_guidance for m in stage.module.modules())
    graph = onnx.load(str(export_stage_onnx(stage, tmp_path / "classifier.onnx"))).graph
    names = [i.name for i in graph.initializer]
    exported = sum(int(np.prod(i.dims)) for i in graph.initializer)
    network = sum(t.numel() for t in tiny.network.state_dict().values() if t.is_floating_point())
    guidance = sum(p.numel() for p in tiny.feature_guidance.parameters())
    assert guidance > 0 and not any("feature_guidance" in n or "projection" in n for n in names)
    # BatchNorm folding makes the graph slightly smaller than the network; with the
    # heads it would be larger than the network (guidance > what folding saves).
    assert exported <= network < exported + guidance
    ours = {n for n, _ in tiny.network.named_parameters()} | {n for n, _ in tiny.network.named_buffers()}
    named = [n for n in names if n.startswith(("backbone.", "fusions.", "metadata_embedding.", "head."))]
    assert named and all(n.removesuffix("_bias") in ours for n in named)


@pytest.mark.parametrize("depth", [18, 50])
def test_backbone_loads_torchvision_weights(depth):
    torchvision = pytest.importorskip("torchvision")
    from edgederm.models.pretrained import PretrainedMismatchError

    torch.manual_seed(depth)
    reference = getattr(torchvision.models, f"resnet{depth}")().eval()
    model = create_model(f"sgmcnet_{depth}", img_size=64).eval()
    assert model.load_backbone(reference.state_dict()) == ["fc.weight", "fc.bias"]
    x = torch.randn(2, 3, 64, 64)
    worst = 0.0
    with torch.no_grad():
        ours = model.network.backbone(x)
        r = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        for i, layer in enumerate([reference.layer1, reference.layer2, reference.layer3, reference.layer4]):
            r = layer(r)
            worst = max(worst, float((ours[i] - r).abs().max()))
            assert torch.allclose(ours[i], r, atol=1e-5, rtol=1e-5)
        assert ours[-1].shape[-1] == stage_sides(64)[-1]
    print(f"sgmcnet_{depth} backbone vs torchvision resnet{depth}: max abs diff {worst:.2e}")
    other = getattr(torchvision.models, f"resnet{68 - depth}")()  # 18 <-> 50
    with pytest.raises(PretrainedMismatchError):
        model.load_backbone(other.state_dict())


def test_pad_ufes_20_schema_encodes_a_csv_row():
    schema = load_schema("pad_ufes_20")
    one_hot = sum(len(f["categories"]) for f in schema.fields if f["type"] == "categorical")
    numeric = sum(f["type"] == "numeric" for f in schema.fields)
    categorical = len(schema.fields) - numeric
    assert (len(schema.fields), one_hot + numeric) == (21, 81)  # MetaBlock's 81
    assert schema.dim == one_hot + categorical + 2 * numeric == 102  # + missing slots
    row = {
        "smoke": False, "drink": "True", "background_father": "POMERANIA", "background_mother": "UNK",
        "age": 55, "pesticide": "False", "gender": "FEMALE", "skin_cancer_history": True,
        "cancer_history": "True", "has_piped_water": "True", "has_sewage_system": "False",
        "fitspatrick": 3.0, "region": "FACE", "diameter_1": 10.0, "diameter_2": 5.0,
        "itch": "UNK", "grew": "False", "hurt": "False", "changed": "True", "bleed": "False", "elevation": "True",
    }
    v = schema.encode(row)
    assert v.shape == (102,) and v.dtype == np.float32
    assert v.sum() == pytest.approx(18 + 0.55 + 0.10 + 0.05)
    # An empty record (PAD-UFES-20 has patients without answers): every missing slot.
    empty = schema.encode({})
    assert empty.sum() == 21
    with pytest.raises(InputError, match="'region'"):
        schema.encode({**row, "region": "ELBOW"})


def test_derm7pt_and_ham10000_schemas():
    derm7pt = load_schema("derm7pt")
    assert [f["name"] for f in derm7pt.fields] == ["elevation", "sex", "location"]  # no label leaks
    assert derm7pt.dim == 3 + 2 + 9 + 3
    v = derm7pt.encode({"elevation": "palpable", "sex": "male", "location": "head neck"})
    assert v.sum() == 3 and v[1] == 1 and v[5] == 1
    with pytest.raises(InputError, match="'location'"):
        derm7pt.encode({"location": "moon"})
    ham = load_schema("ham10000")
    assert ham.dim == 2 + 4 + 16
    v = ham.encode({"age": 45.0, "sex": "male", "localization": "lower extremity"})
    assert v[0] == pytest.approx(0.45) and v.sum() == pytest.approx(2.45)
    with pytest.raises(InputError, match="'sex'"):
        ham.encode({"sex": "x"})


def test_model_carries_its_schema(tiny):
    assert tiny.metadata_schema == load_schema("synthetic").to_dict()
    assert tiny.metadata_dim == 12 and tiny.example_inputs(3)["metadata"].shape == (3, 12)
    custom = {"name": "two", "fields": [{"name": "sex", "type": "categorical", "categories": ["f", "m"]}]}
    model = SGMCNet(num_classes=2, img_size=64, depth=18, widths=(8, 16, 32, 64), metadata_schema=custom, embed_dim=8)
    assert model.metadata_dim == 3
    assert model(dermoscopy=torch.randn(1, 3, 64, 64), metadata=torch.tensor([[0.0, 1.0, 0.0]])).shape == (1, 2)
    with pytest.raises(ValueError, match="shallow stages"):
        create_model("sgmcnet_tiny", guided_stages=(3,))


def test_stage_sides_follow_the_backbone():
    assert stage_sides(224) == [56, 28, 14, 7]
    assert stage_sides(96) == [24, 12, 6, 3]
    assert stage_sides(100) == [25, 13, 7, 4]
    model = create_model("sgmcnet_tiny", img_size=100).eval()
    with torch.no_grad():
        shapes = [f.shape[-1] for f in model.network.forward_features(**model.example_inputs(1))]
    assert shapes == [25, 13, 7, 4]


@pytest.mark.parametrize("name, backbone", [("sgmcnet_18", 11_176_512), ("sgmcnet_50", 23_508_032)])
def test_paper_variants_construct(name, backbone, record_property):
    model = create_model(name)
    assert model.img_size == 224 and model.num_classes == 6
    assert model.class_names == ["ACK", "BCC", "MEL", "NEV", "SCC", "SEK"]
    assert model.metadata_schema["name"] == "pad_ufes_20" and model.metadata_dim == 102
    # torchvision resnet18/50 without fc
    assert sum(p.numel() for p in model.network.backbone.parameters()) == backbone
    deployed = sum(p.numel() for p in model.network.parameters())
    total = sum(p.numel() for p in model.parameters())
    record_property(f"figure:{name}.params_deployed_M", f"{deployed / 1e6:.2f}")
    record_property(f"figure:{name}.params_with_projection_heads_M", f"{total / 1e6:.2f}")
    print(f"{name}: {deployed / 1e6:.2f} M deployed, {total / 1e6:.2f} M with projection heads")
    assert backbone < deployed < total


def test_tiny_is_small_and_cheap(tiny):
    """Small enough for training tests on two CPU cores, counted in parameters and
    multiply-adds rather than seconds (a timing depends on the machine's load)."""
    from edgederm.models.summary import count_gmacs

    assert sum(p.numel() for p in tiny.parameters()) < 5e6
    assert count_gmacs(tiny) < 0.05  # sgmcnet_18 at its paper size: 1.8 GMACs

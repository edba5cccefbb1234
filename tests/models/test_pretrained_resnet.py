"""ResNet encoders load torchvision weights through a strict key map, same features."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision", reason="torchvision not installed (CI installs torch 2.14.1 + torchvision 0.29.1)")

from edgederm.models.layers.resnet import ResNetEncoder  # noqa: E402
from edgederm.models.pretrained import PretrainedMismatchError, load_resnet  # noqa: E402


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_resnet_matches_torchvision(depth):
    torch.manual_seed(depth)
    reference = getattr(torchvision.models, f"resnet{depth}")().eval()
    encoder = ResNetEncoder(depth).eval()
    dropped = load_resnet(encoder, reference.state_dict())
    assert dropped == ["fc.weight", "fc.bias"]
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        r = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        ours = encoder(x)
        for i, layer in enumerate([reference.layer1, reference.layer2, reference.layer3, reference.layer4]):
            r = layer(r)
            assert torch.allclose(ours[i], r, atol=1e-5, rtol=1e-5)


def test_resnet_wrong_depth_is_refused():
    reference = torchvision.models.resnet18()
    with pytest.raises(PretrainedMismatchError, match="left unfilled|map to no parameter"):
        load_resnet(ResNetEncoder(34), reference.state_dict())

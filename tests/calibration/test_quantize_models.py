"""quantize_bundle on every task and stage layout, and the fallback on a model made sensitive on purpose.

The zoo's *_tiny models are quantized stage by stage in tests/models/test_models.py; here the
bundle-level path runs on micro models (seconds to export) that have the layouts the
zoo has: a tiled segmenter, an image + metadata classifier, a two-stage windowed
classifier (windows -> embeddings -> region), and a classifier with one layer whose
input range is dominated by an outlier channel, so that INT8 breaks it.
The zoo bundles themselves (slow to export) run under ``-m slow``.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402

from edgederm.calibration import quantize_bundle  # noqa: E402
from edgederm.models.base import EdgeDermModel, ExportStage  # noqa: E402
from edgederm.runtime import load  # noqa: E402
from edgederm.runtime.backends.onnxruntime import cpu_identity  # noqa: E402
from edgederm.runtime.imageio import read_image  # noqa: E402
from edgederm.runtime.latency import MIN_ROUNDS  # noqa: E402

CLASSES = ["nevus", "melanoma", "vascular"]


class MicroSegmenter(EdgeDermModel):
    """Lesion = dark: a fixed darkness detector plus a small random conv branch."""

    task = "segment"

    def __init__(self) -> None:
        super().__init__(2, 32, ["background", "lesion"])
        self.branch = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))
        self.dark = nn.Conv2d(3, 2, 3, padding=1)
        with torch.no_grad():
            self.dark.weight.zero_()
            self.dark.weight[1] = -1.0  # lesion logit = -(local brightness)
            self.dark.bias.copy_(torch.tensor([0.0, -2.0]))
            self.branch[2].weight.mul_(0.1)

    def forward(self, dermoscopy: torch.Tensor) -> torch.Tensor:
        return self.dark(dermoscopy) + self.branch(dermoscopy)


class MicroMetadata(EdgeDermModel):
    modalities = ("dermoscopy", "metadata")

    def __init__(self) -> None:
        from edgederm.runtime.metadata import load_schema

        super().__init__(3, 32, CLASSES)
        self.metadata_schema = load_schema("synthetic").to_dict()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.meta_mlp = nn.Sequential(nn.Linear(self.metadata_dim, 16), nn.ReLU())
        self.head = nn.Linear(32, 3)

    def forward(self, dermoscopy: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.stem(dermoscopy), self.meta_mlp(metadata)], dim=1))


class WindowEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.LayerNorm(16), nn.Linear(16, 16))

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return self.net(windows)


class RegionEncoder(nn.Module):
    def __init__(self, tokens: int) -> None:
        super().__init__()
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16 * tokens, 3)

    def forward(self, window_embeddings: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(window_embeddings)).flatten(1))


class MicroWindowed(EdgeDermModel):
    """Two stages like RemixFormer++'s dermoscopy branch: 2x2 windows of 16 px -> region."""

    def __init__(self) -> None:
        super().__init__(3, 32, CLASSES)
        self.window_size, self.window_grid = 16, (2, 2)
        self.window_encoder = WindowEncoder()
        self.region_encoder = RegionEncoder(4)

    def forward(self, dermoscopy: torch.Tensor) -> torch.Tensor:
        windows = dermoscopy.reshape(-1, 3, 2, 16, 2, 16).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, 16, 16)
        return self.region_encoder(self.window_encoder(windows).reshape(-1, 4, 16))

    def export_stages(self, batch: int = 2) -> list[ExportStage]:
        return [
            ExportStage("window_encoder", self.window_encoder, {"windows": torch.randn(batch * 4, 3, 16, 16)},
                        ["window_embeddings"], image_inputs=["windows"], sources={"windows": "dermoscopy_windows"}),
            ExportStage("region_encoder", self.region_encoder, {"window_embeddings": torch.randn(batch, 4, 16)}, ["logits"],
                        sources={"window_embeddings": "window_encoder.window_embeddings"}),
        ]


class Sensitive(EdgeDermModel):
    """``mixer`` reads activations whose channel 0 is scaled by 2000 (and barely used):
    its INT8 input range is set by that outlier, so every other channel rounds to 0."""

    def __init__(self) -> None:
        super().__init__(3, 16, CLASSES)
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.expand = nn.Linear(128, 32)
        self.register_buffer("scale", torch.tensor([2000.0] + [1.0] * 31))
        self.mixer = nn.Linear(32, 32)
        self.head = nn.Linear(32, 3)
        with torch.no_grad():
            self.expand.weight[0] = 0.0
            self.expand.bias[0] = 2.0  # channel 0 is the constant relu(2) * 2000: it alone sets the range
            self.mixer.weight[:, 0] *= 1e-4  # the outlier channel hardly matters in float
            self.head.weight.mul_(4.0)

    def forward(self, dermoscopy: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.expand(self.stem(dermoscopy).flatten(1))) * self.scale
        return self.head(torch.relu(self.mixer(x)))


def _bundle(factory, folder):
    from edgederm.export import export_bundle

    torch.manual_seed(0)  # weights independent of the tests that ran before
    return export_bundle(factory().eval(), folder, profile_memory=False)


def _quantize(bundle, data, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "only N calibration images": deliberate, to stay fast
        return quantize_bundle(bundle, data / "train", eval_dir=data / "test", say=lambda m: None, **kwargs)


def test_segmenter_bundle_tiles_dice_hd95(tmp_path, synthetic_data, record_property):
    from edgederm.runtime.tiling import make_grid

    bundle = _bundle(MicroSegmenter, tmp_path / "seg")
    report = _quantize(bundle, synthetic_data, max_images=8)
    manifest = json.loads((bundle / "manifest.json").read_text())
    tiling = manifest["tiling"]
    assert tiling["tile"] == 32 and tiling["overlap"] == 0.25
    per_image = len(make_grid(128, 128, 32, 0.25))
    assert report["stages"]["segmenter"]["calibration_inputs"] == 8 * per_image  # the runtime's tiles, all kept
    fid = report["fidelity"]
    for key in ("pixel_agreement", "dice_vs_fp32", "hd95_vs_fp32", "dice_fp32", "dice_quantized", "dice_change", "hd95_change"):
        assert key in fid, key
    record_property("figure:seg_int8_dice_vs_fp32", f"{fid['dice_vs_fp32']:.4f}")
    record_property("figure:seg_int8_dice_change", f"{fid['dice_change']:+.4f}")
    assert fid["dice_fp32"] > 0.3  # the darkness detector finds the lesions: Dice is meaningful
    assert fid["pixel_agreement"] > 0.97 and fid["dice_vs_fp32"] > 0.9
    assert manifest["calibration"]["int8"]["fidelity"] == fid
    int8 = load(bundle, precision="int8")
    image = read_image(sorted((synthetic_data / "test" / "images").iterdir())[0])
    assert int8.predict(image).mask.shape == image.shape[:2]


@pytest.mark.slow
def test_metadata_bundle_every_precision(tmp_path, synthetic_data, record_property):
    bundle = _bundle(MicroMetadata, tmp_path / "meta")
    reports = {p: _quantize(bundle, synthetic_data, max_images=12, precision=p) for p in ("int8", "fp16", "int8_dynamic")}
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["calibration"]) == {"int8", "fp16", "int8_dynamic"}  # each precision keeps its section
    assert set(manifest["stages"][0]["graphs"]) == {"fp32", "int8", "fp16", "int8_dynamic"}
    for precision, report in reports.items():
        fid = report["fidelity"]
        record_property(f"figure:meta_{precision}_agreement", f"{fid['decision_agreement']:.3f}")
        assert fid["images"] == 30 and fid["held_out"] is True
        assert {"recall_change", "ece_change", "max_probability_diff"} <= set(fid)
        assert fid["decision_agreement"] >= 0.9, (precision, fid)
        latency = report["latency"]  # fp32 and the precision alternated in rounds; precision="auto" on CPU reads it
        assert latency["fp32_ms"] > 0 and latency["ms"] > 0 and latency["rounds"] >= MIN_ROUNDS
        assert latency["cpu"] == cpu_identity()  # load re-measures on any other CPU
        assert latency["speedup"] == pytest.approx(latency["fp32_ms"] / latency["ms"], rel=1e-2)
        assert manifest["calibration"][precision]["latency"] == latency
    assert reports["fp16"]["fidelity"]["max_probability_diff"] < 1e-2
    case = {"age": 54, "sex": "female"}
    for precision in ("fp32", "int8", "fp16", "int8_dynamic"):
        result = load(bundle, precision=precision).predict(np.full((64, 64, 3), 120, np.uint8), metadata=case)
        assert result.precision == precision and abs(sum(result.probabilities.values()) - 1) < 1e-4


@pytest.mark.slow
def test_windowed_two_stage_bundle(tmp_path, synthetic_data):
    bundle = _bundle(MicroWindowed, tmp_path / "win")
    report = _quantize(bundle, synthetic_data, max_images=8)
    assert report["stages"]["window_encoder"]["calibration_inputs"] == 8 * 4  # 2x2 windows per image
    assert report["stages"]["region_encoder"]["calibration_inputs"] == 8  # fed by the fp32 window encoder
    assert report["fidelity"]["decision_agreement"] >= 0.9
    model = load(bundle, precision="int8")
    assert model.predict(np.full((96, 80, 3), 90, np.uint8)).label in CLASSES


def test_fallback_finds_the_outlier_layer(tmp_path, synthetic_data, record_property):
    bundle = _bundle(Sensitive, tmp_path / "sensitive")
    graph = onnx.load(str(bundle / "classifier.fp32.onnx"))
    scale = next(n for n in graph.graph.node if n.op_type == "Mul")
    mixer = next(n.name for n in graph.graph.node if scale.output[0] in n.input)
    no_fallback = _quantize(bundle, synthetic_data, max_images=24, target_agreement=None)
    report = _quantize(bundle, synthetic_data, max_images=24, target_agreement=0.99)
    target = report["target"]
    record_property("figure:sensitive_agreement_all_int8", f"{target['agreement_all_int8']:.3f}")
    record_property("figure:sensitive_agreement_after_fallback", f"{target['agreement']:.3f}")
    record_property("figure:sensitive_nodes_in_float", str(len(target["nodes_to_exclude"])))
    assert target["agreement_all_int8"] < 0.9, "INT8 should break this model"
    assert target["most_sensitive"][0]["node"] == f"classifier/{mixer}"
    assert target["nodes_to_exclude"][0] == f"classifier/{mixer}"
    assert target["reached"] and target["agreement"] >= 0.99
    assert report["fidelity"]["decision_agreement"] > no_fallback["fidelity"]["decision_agreement"]
    assert report["fidelity"]["decision_agreement"] >= 0.95
    int8 = onnx.load(str(bundle / json.loads((bundle / "manifest.json").read_text())["stages"][0]["graphs"]["int8"]["file"]))
    producers = {o: n for n in int8.graph.node for o in n.output}
    node = next(n for n in int8.graph.node if n.name == mixer)
    assert not any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in node.input)


def test_unreachable_target_is_reported(tmp_path, synthetic_data):
    bundle = _bundle(Sensitive, tmp_path / "sensitive")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = quantize_bundle(bundle, synthetic_data / "train", precision="int8_dynamic", max_images=12,
                                 target_agreement=1.0, say=lambda m: None)
    assert report["fidelity"]["held_out"] is True  # the unused calibration images
    assert "reached" in report["target"] and report["target"]["target_agreement"] == 1.0
    tried = report["target"]["forms_tried"]  # every MatMul first, then attention products in float
    assert tried[0]["matmul_weights_only"] is False
    assert [t["matmul_weights_only"] for t in tried] == ([False] if tried[0]["agreement"] >= 1.0 else [False, True])
    assert report["target"]["agreement"] == tried[-1]["agreement"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cfformer_tiny", "sgmcnet_tiny", "remixformer_tiny"])
def test_zoo_bundles(name, tmp_path, synthetic_data, record_property):
    from edgederm.models import create_model

    torch.manual_seed(0)
    bundle = _bundle(lambda: create_model(name), tmp_path / name)
    report = _quantize(bundle, synthetic_data, max_images=16)
    fid = report["fidelity"]
    value = fid.get("decision_agreement", fid.get("pixel_agreement"))
    record_property(f"figure:{name}.bundle_int8_agreement", f"{value:.3f}")
    assert value >= 0.9

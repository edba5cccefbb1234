"""Tiled segmentation and the staged (window -> region -> fusion) runtime, end to end.

Every model here is a small hand-made torch module exported to a real bundle
(ONNX, manifest, memory profile), so the runtime is tested exactly as a device
runs it. The identity-predictor invariance of the tiler itself lives in
tests/runtime/test_tiling.py and is not repeated.

Honesty about receptive fields: a convolution with zero padding sees zeros at a
tile's edge where the full image has pixels, so a tiled prediction can equal the
untiled one only where every tile that covers a pixel sees its whole receptive
field. A pointwise model (receptive field 1) must therefore match the untiled run
to float precision; a 3x3x2 model (radius 2) matches closely when the overlap
(16 px) covers the radius and the gaussian weights push tile edges down, and the
test shows the error it leaves next to the error without overlap.
"""
from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from edgederm.data.synthetic import generate_case  # noqa: E402
from edgederm.export import export_bundle  # noqa: E402
from edgederm.models.base import EdgeDermModel, ExportStage  # noqa: E402
from edgederm.runtime import InputError, load  # noqa: E402
from edgederm.runtime import preprocess as pp  # noqa: E402
from edgederm.runtime.probabilities import tile_probabilities  # noqa: E402
from tests.tiny_models import ConvSegmenter  # noqa: E402

TILE = 64


# --------------------------------------------------------------------------- models


class DarkLesionSegmenter(EdgeDermModel):
    """Deterministic: lesion where the 5x5-smoothed brightness is below a threshold.

    Gives a non-trivial mask on synthetic dermoscopy (lesions are darker than skin)
    without training, so seams can be measured on a real-looking mask.
    """

    task = "segment"

    def __init__(self, img_size: int = TILE, threshold: float = -0.1, gain: float = 12.0) -> None:
        super().__init__(2, img_size, ["background", "lesion"])
        self.smooth = nn.Conv2d(3, 1, 5, padding=2, bias=False)
        self.head = nn.Conv2d(1, 2, 1)
        with torch.no_grad():
            self.smooth.weight.fill_(1.0 / (3 * 25))
            self.head.weight.copy_(torch.tensor([[[[gain]]], [[[-gain]]]]))
            self.head.bias.copy_(torch.tensor([-gain * threshold, gain * threshold]))

    def forward(self, dermoscopy: torch.Tensor) -> torch.Tensor:
        return self.head(self.smooth(dermoscopy))


class WindowEncoder(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.proj = nn.Linear(8, dim)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.conv(windows)).mean(dim=(2, 3)))


class RegionEncoder(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, window_embeddings: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(window_embeddings.mean(dim=1)))


class Fusion(nn.Module):
    def __init__(self, dim: int, metadata_dim: int, classes: int) -> None:
        super().__init__()
        self.metadata_proj = nn.Linear(metadata_dim, dim)
        self.head = nn.Linear(2 * dim, classes)

    def forward(self, dermoscopy_features: torch.Tensor, metadata: torch.Tensor, modality_mask: torch.Tensor) -> torch.Tensor:
        d = dermoscopy_features * modality_mask[:, 0:1]
        m = torch.relu(self.metadata_proj(metadata)) * modality_mask[:, 2:3]
        return self.head(torch.cat([d, m], dim=1))


class WindowedClassifier(EdgeDermModel):
    """Three stages the runtime chains from the manifest alone: window -> region -> fusion."""

    task = "classify"
    modalities = ("dermoscopy", "clinical", "metadata")

    def __init__(self, window: int = 16, grid: tuple[int, int] = (2, 3), dim: int = 12) -> None:
        super().__init__(3, window * max(grid), ["nevus", "melanoma", "vascular"])
        from edgederm.runtime.metadata import load_schema

        self.metadata_schema = load_schema("synthetic").to_dict()
        self.window_size, self.window_grid, self.dim = window, grid, dim
        torch.manual_seed(1)
        self.window_encoder = WindowEncoder(dim)
        self.region_encoder = RegionEncoder(dim)
        self.fusion = Fusion(dim, self.metadata_dim, 3)

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.window_grid[0] * self.window_size, self.window_grid[1] * self.window_size)

    def forward(self, dermoscopy: torch.Tensor | None = None, metadata: torch.Tensor | None = None) -> torch.Tensor:
        rows, cols = self.window_grid
        w = self.window_size
        present = torch.tensor([[float(dermoscopy is not None), 0.0, float(metadata is not None)]])
        if dermoscopy is not None:
            windows = dermoscopy.reshape(-1, 3, rows, w, cols, w).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, w, w)
            features = self.region_encoder(self.window_encoder(windows).reshape(-1, rows * cols, self.dim))
        else:
            features = torch.zeros(1, self.dim)
        metadata = metadata if metadata is not None else torch.zeros(features.shape[0], self.metadata_dim)
        return self.fusion(features, metadata, present.expand(features.shape[0], -1))

    def export_stages(self, batch: int = 2) -> list[ExportStage]:
        rows, cols = self.window_grid
        w = self.window_size
        return [
            ExportStage("window_encoder", self.window_encoder, {"windows": torch.randn(batch * rows * cols, 3, w, w)},
                        ["window_embeddings"], image_inputs=["windows"], sources={"windows": "dermoscopy_windows"}),
            ExportStage("region_encoder", self.region_encoder, {"window_embeddings": torch.randn(batch, rows * cols, self.dim)},
                        ["dermoscopy_features"], sources={"window_embeddings": "window_encoder.window_embeddings"}),
            ExportStage("fusion", self.fusion, {"dermoscopy_features": torch.randn(batch, self.dim),
                                                "metadata": torch.rand(batch, self.metadata_dim),
                                                "modality_mask": torch.ones(batch, 3)}, ["logits"],
                        sources={"dermoscopy_features": "region_encoder.dermoscopy_features",
                                 "metadata": "metadata", "modality_mask": "modality_mask"}),
        ]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EDGEDERM_CACHE", str(tmp_path_factory.getbasetemp() / "edgederm-cache"))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiled_bundles")
    models = {"pointwise": ConvSegmenter(kernel=1), "conv3": ConvSegmenter(kernel=3), "dark": DarkLesionSegmenter(),
              "windowed": WindowedClassifier()}
    paths = {}
    for name, model in models.items():
        paths[name] = export_bundle(model.eval(), root / name, progress=lambda m: None)
    return paths, models


def _untiled_probabilities(model: nn.Module, image: np.ndarray, bundle) -> np.ndarray:
    """The whole image through torch in one run (no tiles), same preprocessing."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    config = pp.PreprocessConfig.from_dict(manifest["preprocess"])
    x = pp.normalize(pp.apply_color_constancy(image, config.color_constancy), config.mean, config.std)[None]
    with torch.no_grad():
        return tile_probabilities(model(torch.from_numpy(x)).numpy())[0]


def _with_tiling(src, dst, **changes):
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["tiling"].update(changes)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


# --------------------------------------------------------------------------- segmentation


def test_export_writes_tiling_defaults_and_a_measured_memory_line(bundles):
    paths, _ = bundles
    manifest = json.loads((paths["conv3"] / "manifest.json").read_text())
    tiling, memory = manifest["tiling"], manifest["memory"]
    assert tiling["tile"] == TILE and tiling["overlap"] == 0.25 and tiling["blend"] == "gaussian"
    assert 1 <= tiling["batch_size"] <= 16
    # Measured in a fresh process: Python + numpy + OpenCV + ONNX Runtime is tens of MB, not GBs.
    assert 30 * 2**20 < memory["fixed_bytes"] < 600 * 2**20
    assert memory["per_tile_bytes"] >= memory["measured_on"]["slope_floor_bytes"] > 0
    low, high = memory["measured_on"]["peak_bytes"]
    assert high >= low
    windowed = json.loads((paths["windowed"] / "manifest.json").read_text())
    assert windowed["tiling"]["window"] == 16 and windowed["tiling"]["grid"] == [2, 3]
    assert windowed["memory"]["stage"] == "window_encoder"


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_tiled_equals_untiled_for_a_pointwise_model(bundles, tmp_path, blend, record_property):
    paths, models = bundles
    bundle = _with_tiling(paths["pointwise"], tmp_path / "b", blend=blend)
    image = generate_case(seed=4, size=(181, 250)).image  # sizes that do not divide by the stride
    result = load(bundle, precision="fp32").predict(dermoscopy=image)
    expected = _untiled_probabilities(models["pointwise"], image, paths["pointwise"])
    diff = float(np.abs(result.heatmap - (1.0 - expected[0])).max())
    record_property(f"figure:pointwise_tiled_vs_untiled_max_abs_{blend}", f"{diff:.2e}")
    assert result.heatmap.shape == image.shape[:2] and result.heatmap.dtype == np.float32
    assert diff < 1e-5
    assert np.array_equal(result.mask, (expected[1] > expected[0]).astype(np.uint8))


def test_tiled_matches_untiled_when_overlap_covers_the_receptive_field(bundles, tmp_path, record_property):
    paths, models = bundles
    image = generate_case(seed=6, size=300).image
    probs = _untiled_probabilities(models["conv3"], image, paths["conv3"])
    expected, expected_mask = 1.0 - probs[0], probs[1] > probs[0]
    errors, dices = {}, {}
    for overlap in (0.0, 0.25, 0.5):
        bundle = _with_tiling(paths["conv3"], tmp_path / f"b{overlap}", overlap=overlap)
        result = load(bundle, precision="fp32").predict(dermoscopy=image)
        errors[overlap] = np.abs(result.heatmap - expected)
        dices[overlap] = _dice(result.mask, expected_mask)
        record_property(f"figure:conv3_tiled_vs_untiled_overlap_{overlap}",
                        f"mean {errors[overlap].mean():.1e} max {errors[overlap].max():.2f} dice {dices[overlap]:.4f}")
    # Radius 2 inside a 16 px (0.25) or 32 px (0.5) overlap: almost every pixel is
    # dominated by a tile that sees its whole receptive field. Not exact: the
    # gaussian weight is floored at 2**-10 (runtime/tiling.py), so where every
    # covering tile is near its edge (image border rows, tile corners) the
    # zero-padded edge predictions keep a share; the max shows it.
    assert errors[0.25].mean() < 2e-3 and dices[0.25] > 0.995
    assert errors[0.5].mean() < 1e-3 and dices[0.5] > 0.999
    # Without overlap every tile edge is a seam with the full zero-padding error.
    assert errors[0.0].mean() > 4 * errors[0.25].mean() and dices[0.0] < dices[0.25]


def test_mask_does_not_move_when_the_image_shifts_by_half_a_tile(bundles, record_property):
    paths, _ = bundles
    model = load(paths["dark"], precision="fp32")
    image = generate_case(seed=7, size=320, label=1).image
    shift = TILE // 2
    full = model.predict(dermoscopy=image).mask
    shifted = model.predict(dermoscopy=np.ascontiguousarray(image[shift:, shift:])).mask
    assert 0.02 < full.mean() < 0.9, "the lesion mask must be non-trivial for a seam test"
    dice = _dice(full[shift:, shift:], shifted)
    record_property("figure:half_tile_shift_dice_change", f"{1 - dice:.5f}")
    assert 1.0 - dice < 0.01


def test_result_is_a_uint8_mask_and_heatmap_at_input_resolution(bundles):
    paths, _ = bundles
    progress = []
    model = load(paths["dark"])
    image = generate_case(seed=8, size=(97, 203)).image
    result = model.predict(dermoscopy=image, progress=lambda done, total: progress.append((done, total)))
    assert result.mask.shape == (97, 203) and result.mask.dtype == np.uint8
    assert set(np.unique(result.mask)) <= {0, 1}
    assert result.heatmap.shape == (97, 203) and 0.0 <= result.heatmap.min() <= result.heatmap.max() <= 1.0
    assert np.array_equal(result.mask, (result.heatmap > 0.5).astype(np.uint8))
    assert result.probabilities["lesion_fraction"] == pytest.approx(result.mask.mean())
    assert progress[-1][0] == progress[-1][1] == model.last_run["tiles"]
    assert {"tiled_inference", "preprocess", "inference", "total"} <= set(result.timings)


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_are_handled_or_refused_clearly(bundles):
    paths, _ = bundles
    segmenter, classifier = load(paths["dark"]), load(paths["windowed"])
    image = generate_case(seed=9, size=96).image
    with pytest.raises(InputError, match="float32"):
        segmenter.predict(dermoscopy=image.astype(np.float32))
    gray = image[..., :1]  # 1 channel: replicated to gray RGB
    assert np.array_equal(segmenter.predict(dermoscopy=gray).mask,
                          segmenter.predict(dermoscopy=np.repeat(gray, 3, axis=2)).mask)
    rgba = np.dstack([image, np.full(image.shape[:2], 7, np.uint8)])  # alpha dropped
    assert np.array_equal(segmenter.predict(dermoscopy=rgba).mask, segmenter.predict(dermoscopy=image).mask)
    for model in (segmenter, classifier):
        with pytest.raises(InputError, match=r"1x1 image; expected at least 8x8"):
            model.predict(dermoscopy=np.zeros((1, 1, 3), np.uint8))
    strip = np.ascontiguousarray(np.tile(image[:20, :20], (1000, 1, 1)))  # 20000 x 20
    mask = segmenter.predict(dermoscopy=strip).mask
    assert mask.shape == (20000, 20)  # tiled with reflection padding across the narrow axis
    with pytest.raises(InputError, match=r"20000x20 image \(aspect ratio 1000:1\).*crop"):
        classifier.predict(dermoscopy=strip)
    with pytest.raises(InputError, match="age.*finite"):
        classifier.predict(dermoscopy=image, metadata={"age": float("nan")})


# --------------------------------------------------------------------------- staged models


def _probs(result, names):
    return np.array([result.probabilities[n] for n in names])


def test_staged_runtime_matches_torch_and_runs_only_the_stages_needed(bundles, record_property):
    paths, models = bundles
    torch_model = models["windowed"].eval()
    runtime = load(paths["windowed"], precision="fp32")
    manifest = json.loads((paths["windowed"] / "manifest.json").read_text())
    config = pp.PreprocessConfig.from_dict(manifest["preprocess"])
    from edgederm.runtime.metadata import load_schema
    from edgederm.runtime.probabilities import softmax

    image = generate_case(seed=10, size=(150, 220)).image
    metadata = {"age": 61, "sex": "male", "site": "back"}
    x = torch.from_numpy(pp.preprocess(image, config)[None])
    m = torch.from_numpy(load_schema(manifest["model"]["metadata_schema"]).encode(metadata)[None])
    names = manifest["model"]["class_names"]
    worst = 0.0
    cases = [({"dermoscopy": image}, {"dermoscopy": x}, ["window_encoder", "region_encoder", "fusion"]),
             ({"dermoscopy": image, "metadata": metadata}, {"dermoscopy": x, "metadata": m},
              ["window_encoder", "region_encoder", "fusion"]),
             ({"metadata": metadata}, {"metadata": m}, ["fusion"])]
    for request, torch_inputs, stages in cases:
        result = runtime.predict(**request)
        with torch.no_grad():
            expected = softmax(torch_model(**torch_inputs).numpy()[0])
        worst = max(worst, float(np.abs(_probs(result, names) - expected).max()))
        assert runtime.last_run["stages_run"] == stages
    record_property("figure:staged_runtime_vs_torch_max_abs", f"{worst:.2e}")
    assert worst < 1e-5


def test_window_embeddings_are_streamed_in_batches_of_the_plan(bundles):
    paths, _ = bundles
    image = generate_case(seed=11, size=200).image
    import dataclasses

    from edgederm.runtime import DeployedModel
    from edgederm.runtime.bundle import read_manifest

    manifest = read_manifest(paths["windowed"])

    def with_batch(batch):
        tiling = dataclasses.replace(manifest.tiling, batch_size=batch)
        return DeployedModel(dataclasses.replace(manifest, tiling=tiling), precision="fp32")

    one, all_at_once = with_batch(1), with_batch(6)
    seen = []
    a = one.predict(dermoscopy=image, progress=lambda done, total: seen.append((done, total)))
    b = all_at_once.predict(dermoscopy=image)
    assert one.last_run["batch_size"] == 1 and all_at_once.last_run["batch_size"] == 6
    assert seen == [(i, 6) for i in range(1, 7)]
    assert _probs(a, one.class_names) == pytest.approx(_probs(b, one.class_names), abs=1e-6)


def _remixformer_ready() -> bool:
    try:
        from edgederm.models import create_model

        create_model("remixformer_tiny")
    except Exception:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _remixformer_ready(), reason="edgederm/models/remixformer.py is not available yet")
def test_remixformer_runtime_matches_torch_for_modality_subsets(tmp_path, record_property):
    """RemixFormer++ (tiny) through the generic staged runtime vs its torch forward: D, DM, CDM."""
    import dataclasses

    from edgederm.models import create_model
    from edgederm.runtime.metadata import load_schema
    from edgederm.runtime.probabilities import softmax

    torch.manual_seed(0)
    model = create_model("remixformer_tiny").eval()
    bundle = export_bundle(model, tmp_path / "remix", progress=lambda m: None)
    manifest = json.loads((bundle / "manifest.json").read_text())
    runtime = load(bundle, precision="fp32")
    config = pp.PreprocessConfig.from_dict(manifest["preprocess"])
    image, clinical = generate_case(seed=2, size=300).image, generate_case(seed=3, size=200).image
    metadata = {"age": 54, "sex": "female", "site": "back"}
    clinical_size = tuple(model.clinical_size)
    x = torch.from_numpy(pp.preprocess(image, config)[None])
    c = torch.from_numpy(pp.preprocess(clinical, dataclasses.replace(config, input_size=clinical_size))[None])
    m = torch.from_numpy(load_schema(manifest["model"]["metadata_schema"]).encode(metadata)[None])
    names = manifest["model"]["class_names"]
    worst = 0.0
    for request, inputs, skipped in [
        ({"dermoscopy": image}, {"dermoscopy": x}, ["clinical_encoder"]),
        ({"dermoscopy": image, "metadata": metadata}, {"dermoscopy": x, "metadata": m}, ["clinical_encoder"]),
        ({"dermoscopy": image, "metadata": metadata, "clinical": clinical},
         {"dermoscopy": x, "metadata": m, "clinical": c}, []),
    ]:
        result = runtime.predict(**request)
        with torch.no_grad():
            expected = softmax(model(**inputs).numpy()[0])
        diff = float(np.abs(_probs(result, names) - expected).max())
        worst = max(worst, diff)
        assert runtime.last_run["stages_skipped"] == skipped
    record_property("figure:remixformer_runtime_vs_torch_max_abs", f"{worst:.2e}")
    assert worst < 1e-4


# --------------------------------------------------------------------------- overlay


def test_overlay_outlines_the_mask_and_tints_the_heatmap(bundles, tmp_path):
    import cv2

    from edgederm.cli import main
    from edgederm.runtime.overlay import OUTLINE_RGB, draw_overlay

    paths, _ = bundles
    image = generate_case(seed=7, size=256, label=1).image
    result = load(paths["dark"]).predict(dermoscopy=image)
    picture = draw_overlay(image, result.mask, result.heatmap)
    outline = np.all(picture == OUTLINE_RGB, axis=2)
    # The mask's edge, the image frame counting as outside (the dark vignette of a
    # dermoscope is often masked up to the frame, and its outline runs along it).
    padded = np.pad(result.mask, 1)
    boundary = (cv2.morphologyEx(padded, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0)[1:-1, 1:-1]
    assert outline.sum() > 50 and boundary[outline].mean() > 0.95  # drawn on the mask's edge only
    untouched = (result.heatmap < 1e-3) & ~outline
    assert np.array_equal(picture[untouched], image[untouched])  # skin the model is sure about is not tinted
    path = tmp_path / "case.png"
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    out = tmp_path / "overlay.png"
    assert main(["predict", str(paths["dark"]), str(path), "--overlay", str(out), "--memory-budget", "1GiB"]) == 0
    written = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)
    assert np.array_equal(written, picture)


def test_working_scale_runs_the_model_at_the_scale_it_learnt(bundles, tmp_path):
    """A segmenter trained on whole images resized to its input works at that scale."""
    paths, _ = bundles
    scaled = _with_tiling(paths["dark"], tmp_path / "scaled", working_max_side=TILE)
    image = generate_case(seed=12, size=(300, 240)).image
    result = load(scaled).predict(dermoscopy=image)
    assert result.mask.shape == (300, 240) and result.heatmap.shape == (300, 240)
    # reference: the downscaled image through the native-scale bundle, upscaled back
    small = cv2.resize(image, (round(240 * TILE / 300), TILE), interpolation=cv2.INTER_AREA)
    reference = load(paths["dark"]).predict(dermoscopy=small)
    expected = cv2.resize(reference.mask, (240, 300), interpolation=cv2.INTER_NEAREST)
    assert np.array_equal(result.mask, expected)
    assert result.probabilities["lesion_fraction"] == pytest.approx(expected.mean())


def test_training_a_segmenter_on_whole_images_records_its_working_scale(tmp_path):
    from edgederm.checkpoint import load_checkpoint
    from edgederm.data.synthetic import generate_dataset
    from edgederm.export.bundle import tiling_section
    from edgederm.data import read_image_folder
    from edgederm.train import TrainConfig, train

    generate_dataset(tmp_path / "data", n_per_class=2, size=96, seed=3)
    config = pp.PreprocessConfig(input_size=(64, 64))
    data = read_image_folder(tmp_path / "data", config, masks=True)
    train(data, TrainConfig(model="cfformer_tiny", epochs=1, batch_size=6), out_dir=tmp_path / "ck", preprocess=config,
          say=lambda m: None)
    model, saved = load_checkpoint(tmp_path / "ck")
    assert saved["tiling"] == {"working_max_side": 64}
    assert tiling_section(model)["working_max_side"] == 64

"""End to end: train -> checkpoint -> export -> quantize -> predict, with real learning."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgederm.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from edgederm.models import create_model  # noqa: E402
from edgederm.runtime.preprocess import PreprocessConfig  # noqa: E402
from edgederm.data import read_image_folder  # noqa: E402
from edgederm.metrics import expected_calibration_error, fit_temperature  # noqa: E402
from edgederm.train import TrainConfig, train  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from edgederm.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("pipeline")
    generate_dataset(root / "train", n_per_class=80, size=128, seed=10)
    generate_dataset(root / "test", n_per_class=20, size=128, seed=11)
    config = PreprocessConfig(input_size=(64, 64))
    data = read_image_folder(root / "train", config)
    model, report = train(data, TrainConfig(epochs=6, batch_size=16, seed=0, model_kwargs={"img_size": 64}),
                          out_dir=root / "ckpt", preprocess=config, say=lambda m: None)
    return root, model, report


@pytest.mark.slow
def test_training_beats_chance_and_is_calibrated(trained):
    _, _, report = trained
    assert report["val_accuracy"] >= 0.8, report  # chance is 1/3
    assert report["val_ece_after"] <= 0.1, report


@pytest.mark.slow
def test_pipeline_fp32_and_int8_agree(trained):
    from edgederm.calibration import quantize_bundle
    from edgederm.export import export_bundle
    from edgederm.export.bundle import model_from_checkpoint_or_name
    from edgederm.runtime import load

    root, _, report = trained
    model, preprocess, clinical = model_from_checkpoint_or_name(str(root / "ckpt"))
    assert clinical["temperature"] == pytest.approx(report["temperature"])
    bundle = export_bundle(model, root / "bundle", preprocess=preprocess, clinical=clinical)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["export"]["parity"]["classifier"]["max_rel_diff"] < 1e-4
    assert manifest["clinical"]["temperature"] == pytest.approx(report["temperature"])
    calib = quantize_bundle(bundle, root / "train", eval_dir=root / "test", max_images=48, say=lambda m: None)
    fidelity = calib["fidelity"]
    assert fidelity["images"] == 60
    assert fidelity["accuracy_fp32"] >= 0.7
    assert fidelity["decision_agreement"] >= 0.95, fidelity
    assert abs(fidelity["accuracy_quantized"] - fidelity["accuracy_fp32"]) <= 0.05
    # the runtime's fp32 output equals torch on the checkpoint's weights
    from edgederm.data.synthetic import generate_case
    from edgederm.runtime.probabilities import softmax
    from edgederm.runtime.preprocess import preprocess as pp

    image = generate_case(seed=99, size=2048, label=2).image
    result = load(bundle, precision="fp32").predict(dermoscopy=image)
    with torch.no_grad():
        logits = model(torch.from_numpy(pp(image, preprocess)[None])).numpy()
    expected = softmax(logits, report["temperature"])[0]
    assert np.allclose([result.probabilities[c] for c in model.class_names], expected, atol=1e-5)


def test_checkpoint_round_trip_is_exact(tmp_path):
    torch.manual_seed(1)
    model = create_model("hifuse_tiny", num_classes=3, class_names=["a", "b", "c"]).eval()
    save_checkpoint(model, tmp_path / "ck", preprocess=None)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]
    loaded, config = load_checkpoint(tmp_path / "ck")
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert config["class_names"] == ["a", "b", "c"]


def test_fit_temperature_recovers_known_temperature():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, (4000, 4))
    probs = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(4, p=p) for p in probs])
    t = fit_temperature(true_logits * 3.0, labels)  # over-confident by a factor 3
    assert t == pytest.approx(3.0, rel=0.1)


def test_ece_of_perfectly_calibrated_predictions_is_small():
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.5, 1.0, 20000)
    correct = rng.uniform(size=20000) < conf
    probs = np.stack([conf, 1 - conf], 1)
    labels = np.where(correct, 0, 1)
    assert expected_calibration_error(probs, labels) < 0.02
    assert expected_calibration_error(np.stack([np.ones(100), np.zeros(100)], 1), np.ones(100, int)) == pytest.approx(1.0)

"""`edgederm train` trains every registered family on the synthetic data.

Each *_tiny model takes one short epoch on a small synthetic set read the way the
CLI reads it (metadata for image+metadata models, masks for segmenters); the
checkpoint it writes must rebuild the same model with identical outputs.
"""
from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from edgederm.checkpoint import load_checkpoint  # noqa: E402
from edgederm.models import create_model, list_models  # noqa: E402
from edgederm.runtime.preprocess import PreprocessConfig  # noqa: E402
from edgederm.data import read_image_folder  # noqa: E402
from edgederm.train import TrainConfig, train  # noqa: E402


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    from edgederm.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("families")
    generate_dataset(root, n_per_class=6, size=128, seed=7)
    return root


@pytest.mark.parametrize("name", list_models("*_tiny"))
def test_family_trains_and_checkpoints(name, small_set, tmp_path):
    probe = create_model(name)
    segment = probe.task == "segment"
    config = PreprocessConfig(input_size=tuple(probe.input_size))
    data = read_image_folder(small_set, config, masks=segment)
    model, report = train(data, TrainConfig(model=name, epochs=1, batch_size=6, seed=0), out_dir=tmp_path / "ck",
                          preprocess=config, say=lambda m: None)
    losses = [h["train_loss"] for h in report["history"]]
    assert losses and all(math.isfinite(v) and v > 0 for v in losses), report["history"]
    metric = report["val_dice"] if segment else report["val_accuracy"]
    assert metric is None or 0.0 <= metric <= 1.0
    loaded, saved = load_checkpoint(tmp_path / "ck")
    assert saved["model_name"] == name
    inputs = model.example_inputs(batch=2)
    if "metadata" in inputs:  # metadata width follows the schema the model was trained with
        assert inputs["metadata"].shape[1] == loaded.metadata_dim
    with torch.no_grad():
        a, b = model.eval()(**inputs), loaded.eval()(**inputs)
    assert torch.equal(a, b)

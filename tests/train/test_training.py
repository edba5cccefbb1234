"""Trainer: schedule, losses, metrics, augmentation, calibration figures, exact resume."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgederm import losses  # noqa: E402
from edgederm.metrics import binary_auc, classification_metrics, hd95, segmentation_metrics  # noqa: E402
from edgederm.runtime.errors import InputError  # noqa: E402
from edgederm.runtime.probabilities import softmax  # noqa: E402
from edgederm.runtime.preprocess import PreprocessConfig  # noqa: E402
from edgederm.data import read_image_folder  # noqa: E402
from edgederm.data.augment import augment, draw_augment  # noqa: E402
from edgederm.metrics import expected_calibration_error  # noqa: E402
from edgederm.train import predict_logits, train  # noqa: E402
from edgederm.training.config import TrainConfig, lr_factor  # noqa: E402
from edgederm.training.distributed import shard_rows  # noqa: E402
from edgederm.training.state import read_training_state  # noqa: E402
from tests.tiny_models import tiny_net  # noqa: E402

SIZE = 32


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from edgederm.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("train_small")
    generate_dataset(root, n_per_class=30, size=48, seed=3)
    return read_image_folder(root, PreprocessConfig(input_size=(SIZE, SIZE)))


# -- pure pieces -----------------------------------------------------------------------------
def test_lr_schedule_warms_up_then_decays_to_zero():
    total, warm = 100, 10
    assert [lr_factor(s, total, warm) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_factor(9, total, warm) == pytest.approx(1.0)
    assert lr_factor(10, total, warm) == pytest.approx(1.0)
    assert lr_factor(55, total, warm) == pytest.approx(0.5)  # cosine half way
    assert lr_factor(100, total, warm) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(55, total, warm, "poly", 0.9) == pytest.approx(0.5 ** 0.9)
    cos = [lr_factor(s, total, warm) for s in range(warm, total)]
    assert all(a >= b for a, b in zip(cos, cos[1:]))


def test_class_balanced_weights_follow_cui_et_al():
    counts = [1000, 100, 10]
    w = losses.class_balanced_weights(counts, beta=0.999)
    expected = np.array([(1 - 0.999) / (1 - 0.999 ** n) for n in counts])
    assert w == pytest.approx(expected / expected.sum() * 3)
    assert w.sum() == pytest.approx(3) and w[2] > w[1] > w[0]
    assert losses.class_balanced_weights(counts, beta=0.0) == pytest.approx([1, 1, 1])
    assert losses.class_balanced_weights([10, 0], beta=0.9)[1] == pytest.approx(losses.class_balanced_weights([10, 0], 0.9)[0])
    with pytest.raises(ValueError, match="beta must be in"):
        losses.class_balanced_weights(counts, beta=1.0)


def test_focal_loss_matches_its_formula_and_reduces_to_ce():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 4, generator=g)
    target = torch.randint(0, 4, (16,), generator=g)
    weight = torch.tensor([0.5, 1.0, 2.0, 0.5])
    p = torch.softmax(logits, 1)[torch.arange(16), target]
    manual = (-(1 - p) ** 2 * torch.log(p) * weight[target]).mean()
    assert losses.focal_loss(logits, target, 2.0, weight) == pytest.approx(float(manual), rel=1e-5)
    ce = torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.1)
    assert losses.focal_loss(logits, target, 0.0, label_smoothing=0.1) == pytest.approx(float(ce), rel=1e-5)
    assert losses.cross_entropy(logits, target, 0.1) == pytest.approx(float(ce), rel=1e-5)
    fn = losses.make_classification_loss("focal", [90, 9, 1, 0], gamma=2.0, beta=0.99)
    assert torch.isfinite(fn(logits, target))


def test_segmentation_loss_is_half_ce_half_dice():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 2, 8, 8, generator=g)
    target = (torch.rand(2, 8, 8, generator=g) > 0.5).long()
    probs = logits.softmax(1)[:, 1]
    dice = (2 * (probs * target).sum() + 1) / (probs.sum() + target.sum() + 1)
    expected = 0.5 * torch.nn.functional.cross_entropy(logits, target) + 0.5 * (1 - dice)
    assert losses.dice_ce_loss(logits, target) == pytest.approx(float(expected), rel=1e-5)


def test_auc_equals_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    pos = rng.random(60) < 0.4
    s_pos, s_neg = scores[pos], scores[~pos]
    pairwise = ((s_pos[:, None] > s_neg[None]).sum() + 0.5 * (s_pos[:, None] == s_neg[None]).sum()) / (len(s_pos) * len(s_neg))
    assert binary_auc(scores, pos) == pytest.approx(pairwise)
    assert binary_auc(np.arange(4), np.array([0, 0, 1, 1], bool)) == 1.0
    assert binary_auc(np.arange(4), np.ones(4, bool)) is None


def test_classification_metrics_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 0, 2])
    probs = np.eye(3)[pred] * 0.7 + 0.1
    m = classification_metrics(probs, labels, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["recall"] == pytest.approx({"a": 2 / 3, "b": 1 / 2, "c": 1.0})
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    f1_a, f1_b = 2 * (2 / 3) * (2 / 3) / (4 / 3), 2 * 0.5 * 0.5 / 1.0
    assert m["macro_f1"] == pytest.approx((f1_a + f1_b + 1.0) / 3)
    assert m["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert m["auc"]["c"] == 1.0


def test_dice_iou_hd95_on_known_shapes():
    a = np.zeros((64, 64), bool)
    a[10:30, 10:30] = True
    b = np.zeros_like(a)
    b[10:30, 14:34] = True  # shifted 4 px right
    m = segmentation_metrics(a[None], b[None])
    assert m["dice"] == pytest.approx(2 * 16 * 20 / 800)
    assert m["iou"] == pytest.approx(320 / 480)
    # brute force: pooled surface distances, 95th percentile
    def surface(m):
        inner = m.copy()
        inner[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:] \
            & m[:-2, :-2] & m[:-2, 2:] & m[2:, :-2] & m[2:, 2:]
        return np.argwhere(m & ~inner)
    sa, sb = surface(a), surface(b)
    d = np.sqrt(((sa[:, None] - sb[None]) ** 2).sum(-1))
    assert hd95(a, b) == pytest.approx(np.percentile(np.r_[d.min(1), d.min(0)], 95), abs=1e-4)
    assert hd95(a, a) == 0.0 and hd95(a, np.zeros_like(a)) is None
    assert segmentation_metrics(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))["dice"] == 1.0


def test_augmentation_moves_masks_with_images_and_shards_agree():
    rng = np.random.default_rng(0)
    masks = np.zeros((6, 32, 32), np.int64)
    for i in range(6):
        masks[i, 4 + i:14 + i, 6:20 + i] = 1
    images = np.repeat(masks[:, None].astype(np.float32), 3, axis=1)
    config = TrainConfig(color_jitter=0.0)
    params = draw_augment(rng, 6, config)
    out, out_masks = augment(images, params, np.arange(6), masks)
    assert out.shape == images.shape and not np.array_equal(out_masks, masks)
    # the image channel (nearest-neighbour would be exact; bilinear only blurs the edge)
    assert np.mean((out[:, 0] > 0.5) == (out_masks > 0)) > 0.97
    # a shard of the global batch gets exactly the rows of the whole-batch augmentation
    rows = shard_rows(6, 1, 2)
    shard, _ = augment(images[rows], params, rows, masks[rows])
    assert np.array_equal(shard, out[rows])
    identity = draw_augment(np.random.default_rng(1), 6, TrainConfig(color_jitter=0.0, rotate_degrees=0.0, scale_range=0.0))
    identity.flip_h[:] = identity.flip_v[:] = identity.transpose[:] = identity.affine[:] = False
    assert np.array_equal(augment(images, identity, np.arange(6))[0], images)


# -- training ------------------------------------------------------------------------------
def test_tiny_model_learns_and_is_calibrated(tmp_path_factory, record_property):
    """The documented figure: tiny GroupNorm CNN, synthetic 3 classes, 32 px."""
    from edgederm.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("train_calib")
    generate_dataset(root / "train", n_per_class=160, size=48, seed=10)
    generate_dataset(root / "test", n_per_class=60, size=48, seed=11)
    config = PreprocessConfig(input_size=(SIZE, SIZE))
    data = read_image_folder(root / "train", config)
    held_out = read_image_folder(root / "test", config)
    cfg = TrainConfig(model="tiny_net", epochs=12, batch_size=16, lr=5e-3, val_fraction=0.4, label_smoothing=0.0,
                      augment=False, seed=0, threads=2, model_kwargs={"img_size": SIZE, "width": 16})
    model, report = train(data, cfg, out_dir=root / "ckpt", preprocess=config, model_factory=tiny_net, say=lambda m: None)
    logits = predict_logits(model, [{"dermoscopy": torch.from_numpy(held_out.x)}])
    t = report["temperature"]
    test_acc = float((logits.argmax(1) == held_out.y).mean())
    test_ece = expected_calibration_error(softmax(logits, t), held_out.y)
    for key, value in [("val_accuracy", report["val_accuracy"]), ("val_ece_before", report["val_ece_before"]),
                       ("val_ece_after", report["val_ece_after"]), ("temperature", t), ("heldout_accuracy", test_acc),
                       ("heldout_ece_after", test_ece)]:
        record_property(f"figure:{key}", round(float(value), 4))
    assert report["val_accuracy"] >= 0.85, report["history"][-1]  # chance 1/3
    assert test_acc >= 0.85
    assert report["val_ece_after"] <= 0.05 and report["val_ece_after"] < report["val_ece_before"]
    assert test_ece <= 0.06  # held-out: the temperature generalises
    clinical = report["clinical"]
    assert clinical["malignant_classes"] == ["melanoma"]
    assert clinical["malignant_operating_point"]["sensitivity"] >= 0.95
    assert set(clinical["image_reference"]["ranges"]) >= {"skin_fraction", "colorfulness"}
    # per-epoch metrics, JSON and CSV, in the checkpoint folder
    history = json.loads((root / "ckpt" / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 13))
    header = (root / "ckpt" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_macro_auc", "val_recall_melanoma",
            "val_auc_vascular"} <= set(header)
    stored = json.loads((root / "ckpt" / "config.json").read_text())
    assert stored["clinical"]["temperature"] == pytest.approx(t)


def _straight_and_resumed(data, tmp_path, cfg, interrupt_after):
    straight, _ = train(data, cfg, out_dir=tmp_path / "straight", model_factory=tiny_net, say=lambda m: None)

    class Interrupted(Exception):
        pass

    def stop(epoch, entry):
        if epoch == interrupt_after:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(data, cfg, out_dir=tmp_path / "run", model_factory=tiny_net, say=lambda m: None, on_epoch_end=stop)
    resumed, report = train(data, cfg, out_dir=tmp_path / "run", model_factory=tiny_net, say=lambda m: None,
                            resume=tmp_path / "run")
    return straight, resumed, report


def test_interrupted_run_resumes_to_the_same_weights(small_data, tmp_path, record_property):
    cfg = TrainConfig(model="tiny_net", epochs=3, batch_size=8, lr=3e-3, seed=5, threads=1,
                      model_kwargs={"img_size": SIZE, "width": 8})
    straight, resumed, report = _straight_and_resumed(small_data, tmp_path, cfg, interrupt_after=1)
    a, b = straight.state_dict(), resumed.state_dict()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    record_property("figure:resume_max_weight_diff", diff)
    assert diff <= 1e-6
    assert [h["epoch"] for h in report["history"]] == [1, 2, 3]
    # everything on disk is JSON or safetensors (no pickle), one state file kept
    files = sorted(p.relative_to(tmp_path / "run").as_posix() for p in (tmp_path / "run").rglob("*") if p.is_file())
    assert files == ["config.json", "metrics.csv", "metrics.json", "model.safetensors",
                     "training_state/epoch-0003.safetensors", "training_state/state.json"]
    meta, tensors = read_training_state(tmp_path / "run")
    assert meta["epoch"] == 3 and any(k.startswith("optimizer.") and k.endswith(".exp_avg_sq") for k in tensors)
    straight_hist = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert [h["train_loss"] for h in report["history"]] == pytest.approx([h["train_loss"] for h in straight_hist], abs=1e-6)


def test_resume_with_augmentation_bf16_and_focal_loss(small_data, tmp_path):
    cfg = TrainConfig(model="tiny_net", epochs=2, batch_size=8, lr=3e-3, seed=1, threads=1, bf16=True, loss="focal",
                      schedule="poly", model_kwargs={"img_size": SIZE, "width": 8})
    straight, resumed, report = _straight_and_resumed(small_data, tmp_path, cfg, interrupt_after=1)
    assert all(torch.allclose(straight.state_dict()[k], v, atol=1e-6) for k, v in resumed.state_dict().items())
    assert all(math.isfinite(h["train_loss"]) for h in report["history"])


def test_resume_refuses_changed_options_and_damaged_state(small_data, tmp_path):
    cfg = TrainConfig(model="tiny_net", epochs=1, batch_size=8, seed=2, threads=1, model_kwargs={"img_size": SIZE, "width": 8})
    train(small_data, cfg, out_dir=tmp_path / "run", model_factory=tiny_net, say=lambda m: None)
    changed = TrainConfig(**{**cfg.to_dict(), "lr": 1e-4, "epochs": 2})
    with pytest.raises(InputError, match=r"options differ from the interrupted run \(lr: 0.002 -> 0.0001\)"):
        train(small_data, changed, out_dir=tmp_path / "run", model_factory=tiny_net, resume=tmp_path / "run")
    with pytest.raises(InputError, match="no training_state/state.json"):
        train(small_data, cfg, resume=tmp_path / "nowhere", model_factory=tiny_net)
    state = next((tmp_path / "run" / "training_state").glob("*.safetensors"))
    damaged = bytearray(state.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    state.write_bytes(bytes(damaged))
    with pytest.raises(InputError, match="does not match its sha256"):
        train(small_data, cfg, resume=tmp_path / "run", model_factory=tiny_net)


def test_cli_options_and_resume_take_the_runs_config(small_data, tmp_path):
    import argparse

    from edgederm.train import add_train_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(["data", "--out", "o", "--loss", "focal", "--bf16", "--schedule", "poly", "--warmup", "1",
                              "--label-smoothing", "0.05", "--malignant-classes", "melanoma,bcc"])
    cfg = config_from_args(args)
    assert (cfg.loss, cfg.bf16, cfg.schedule, cfg.warmup_epochs, cfg.label_smoothing) == ("focal", True, "poly", 1.0, 0.05)
    assert cfg.malignant_classes == ["melanoma", "bcc"] and cfg.epochs == TrainConfig().epochs
    run = TrainConfig(model="tiny_net", epochs=1, batch_size=8, lr=1e-3, seed=4, threads=1,
                      model_kwargs={"img_size": SIZE, "width": 8})
    train(small_data, run, out_dir=tmp_path / "run", model_factory=tiny_net, say=lambda m: None)
    resumed = config_from_args(parser.parse_args(["data", "--out", "o", "--resume", str(tmp_path / "run"), "--epochs", "3"]))
    assert resumed == TrainConfig(**{**run.to_dict(), "epochs": 3})


def test_segmentation_training_logs_dice_iou_hd95(tmp_path):
    from edgederm.data.synthetic import generate_dataset
    from tests.tiny_models import tiny_seg_net

    generate_dataset(tmp_path / "data", n_per_class=8, size=48, seed=6)
    data = read_image_folder(tmp_path / "data", PreprocessConfig(input_size=(SIZE, SIZE)), masks=True)
    cfg = TrainConfig(model="tiny_seg_net", epochs=3, batch_size=8, lr=1e-2, seed=0, threads=1,
                      model_kwargs={"img_size": SIZE})
    _, report = train(data, cfg, out_dir=tmp_path / "ckpt", model_factory=tiny_seg_net, say=lambda m: None)
    history = report["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert 0.0 <= report["val_dice"] <= 1.0 and 0.0 <= report["val_iou"] <= report["val_dice"] + 1e-9
    if report["val_hd95"] is None:  # undefined: every validation image had one of its two masks empty
        assert history[-1]["val_hd95_undefined_images"] > 0
    else:  # a distance between pixels of a SIZE x SIZE image
        assert 0.0 <= report["val_hd95"] <= SIZE * 2 ** 0.5
    assert "temperature" not in report  # segmenters are not temperature-scaled
    header = (tmp_path / "ckpt" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val_dice", "val_iou", "val_hd95"} <= set(header)


def test_validation_split_keeps_each_lesion_on_one_side():
    from edgederm.data.splits import split_indices

    groups = [f"lesion{i // 3}" for i in range(60)] + [None] * 10  # 20 lesions x 3 images, 10 singletons
    train_idx, val_idx = split_indices(70, 0.2, np.random.default_rng(0), groups)
    assert sorted(np.r_[train_idx, val_idx].tolist()) == list(range(70))
    train_groups = {groups[i] for i in train_idx if groups[i] is not None}
    val_groups = {groups[i] for i in val_idx if groups[i] is not None}
    assert not train_groups & val_groups
    assert 14 <= len(val_idx) <= 16  # at least 20% of 70, overshooting by less than one group
    # without groups the split is the seeded permutation it always was
    plain_train, plain_val = split_indices(70, 0.2, np.random.default_rng(0))
    order = np.random.default_rng(0).permutation(70)
    assert np.array_equal(plain_val, order[:14]) and np.array_equal(plain_train, order[14:])

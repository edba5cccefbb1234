"""Training on an image folder with labels (PyTorch); ``edgederm train`` calls this.

Pixels reach the model through ``edgederm.runtime.preprocess`` - the code the
device runs - so training and deployment see the same inputs. Temperature scaling
(Guo et al., 2017) is fitted on the validation split and stored in the checkpoint,
so the runtime's probabilities and review thresholds are calibrated.
"""
from __future__ import annotations

import csv
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgederm.runtime import preprocess as pp
from edgederm.runtime.errors import InputError
from edgederm.runtime.imageio import read_image

log = logging.getLogger(__name__)


@dataclass
class LabelledImages:
    """Images (preprocessed, N x 3 x H x W float32), labels and ids."""

    x: np.ndarray
    y: np.ndarray
    ids: list[str]
    class_names: list[str]


def read_image_folder(root: str | Path, config: pp.PreprocessConfig, progress: Callable[[int, int], None] | None = None) -> LabelledImages:
    """Read ``root/labels.csv`` (id,label,class_name,...) and ``root/images/<id>.jpg``."""
    root = Path(root)
    table = root / "labels.csv"
    if not table.is_file():
        raise InputError(f"{root} has no labels.csv; expected the layout written by `edgederm data` / generate_dataset (images/ + labels.csv)")
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise InputError(f"{table} lists no images")
    names: dict[int, str] = {}
    for r in rows:
        names[int(r["label"])] = r.get("class_name") or f"class_{r['label']}"
    class_names = [names[i] for i in range(max(names) + 1)]
    x = np.empty((len(rows), 3, *config.input_size), np.float32)
    for i, r in enumerate(rows):
        image_path = next((p for p in (root / "images" / f"{r['id']}{ext}" for ext in (".jpg", ".png", ".jpeg")) if p.exists()), None)
        if image_path is None:
            raise InputError(f"{table} lists {r['id']!r} but {root / 'images'} has no image for it")
        x[i] = pp.preprocess(read_image(image_path), config)
        if progress:
            progress(i + 1, len(rows))
    y = np.array([int(r["label"]) for r in rows], np.int64)
    return LabelledImages(x, y, [r["id"] for r in rows], class_names)


@dataclass
class TrainConfig:
    model: str = "hifuse_tiny"
    epochs: int = 6
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    val_fraction: float = 0.2
    seed: int = 0
    threads: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature minimising validation NLL (golden-section search over log T).

    T is kept in [0.25, 20]: when the validation split is perfectly separated the
    NLL keeps falling as T -> 0, and a device should not be taught certainty from a
    few hundred images.
    """
    def nll(log_t: float) -> float:
        z = logits / math.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(labels)), labels].mean())

    lo, hi = math.log(0.25), math.log(20.0)
    golden = (math.sqrt(5) - 1) / 2
    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    for _ in range(60):
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
        a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    return math.exp((lo + hi) / 2)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (confidence > lo) & (confidence <= hi)
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(ece)


def _augment(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dihedral flips/rotations: lesions have no canonical orientation."""
    out = batch.copy()
    flip_h = rng.random(len(out)) < 0.5
    flip_v = rng.random(len(out)) < 0.5
    out[flip_h] = out[flip_h, :, :, ::-1]
    out[flip_v] = out[flip_v, :, ::-1, :]
    if rng.random() < 0.5:
        out = out.transpose(0, 1, 3, 2)
    return np.ascontiguousarray(out)


def _progress_line(text: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r" + text.ljust(79))
        sys.stderr.flush()


def train(data: LabelledImages, config: TrainConfig, out_dir: str | Path | None = None,
          preprocess: pp.PreprocessConfig | None = None, say: Callable[[str], None] = print) -> tuple[Any, dict[str, Any]]:
    """Train ``config.model`` on ``data``; returns (model, report) and saves a checkpoint if ``out_dir``."""
    import torch
    from torch.nn import functional as F

    from edgederm.checkpoint import save_checkpoint
    from edgederm.models import create_model

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    n = len(data.y)
    order = rng.permutation(n)
    n_val = max(1, int(round(n * config.val_fraction)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    kwargs = {"num_classes": len(data.class_names), "class_names": list(data.class_names), **config.model_kwargs}
    model = create_model(config.model, **kwargs)
    expected = tuple(getattr(model, "input_size", data.x.shape[2:]))
    if tuple(data.x.shape[2:]) != expected:
        raise InputError(f"images are preprocessed to {data.x.shape[2:]}, model {config.model} takes {expected}; set the preprocess input size to the model's")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_idx) / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = max(1, int(config.warmup_epochs * steps_per_epoch))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
    )
    x_all = torch.from_numpy(data.x)
    y_all = torch.from_numpy(data.y)
    history = []
    start = time.time()
    for epoch in range(config.epochs):
        model.train()
        perm = rng.permutation(train_idx)
        running, seen = 0.0, 0
        for step in range(steps_per_epoch):
            idx = perm[step * config.batch_size:(step + 1) * config.batch_size]
            xb = torch.from_numpy(_augment(data.x[idx], rng))
            yb = y_all[idx]
            loss = F.cross_entropy(model(xb), yb, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += float(loss.detach()) * len(idx)
            seen += len(idx)
            _progress_line(f"epoch {epoch + 1}/{config.epochs} step {step + 1}/{steps_per_epoch} loss {running / seen:.3f}")
        val_logits = predict_logits(model, x_all[val_idx])
        val_acc = float((val_logits.argmax(1) == data.y[val_idx]).mean())
        history.append({"epoch": epoch + 1, "train_loss": running / max(seen, 1), "val_accuracy": val_acc})
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        say(f"epoch {epoch + 1}/{config.epochs}: train loss {running / max(seen, 1):.3f}, val accuracy {val_acc:.3f} ({time.time() - start:.0f}s)")
    val_logits = predict_logits(model, x_all[val_idx])
    temperature = fit_temperature(val_logits, data.y[val_idx])
    from edgederm.runtime.model import softmax

    ece_before = expected_calibration_error(softmax(val_logits), data.y[val_idx])
    ece_after = expected_calibration_error(softmax(val_logits, temperature), data.y[val_idx])
    report = {
        "model": config.model, "epochs": config.epochs, "train_images": int(len(train_idx)), "val_images": int(n_val),
        "val_accuracy": history[-1]["val_accuracy"], "temperature": temperature,
        "val_ece_before": ece_before, "val_ece_after": ece_after, "seconds": time.time() - start, "history": history,
    }
    say(f"temperature {temperature:.3f}: validation ECE {ece_before:.3f} -> {ece_after:.3f}")
    if out_dir is not None:
        save_checkpoint(model, out_dir, preprocess=(preprocess.to_dict() if preprocess else None),
                        clinical={"temperature": temperature}, metrics=report)
    return model.eval(), report


def predict_logits(model: Any, x: Any, batch_size: int = 64) -> np.ndarray:
    import torch

    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            outs.append(model(x[i:i + batch_size]).numpy())
    return np.concatenate(outs)

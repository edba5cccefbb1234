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
    """Preprocessed images (N x 3 x H x W float32), labels, and what else the folder has."""

    x: np.ndarray
    y: np.ndarray
    ids: list[str]
    class_names: list[str]
    records: list[dict[str, Any]] = field(default_factory=list)  # raw metadata per image
    masks: np.ndarray | None = None  # N x H x W int64 lesion masks (0/1) at the input size

    def metadata(self, schema: Any) -> np.ndarray:
        """Metadata encoded with ``schema`` (edgederm.runtime.metadata)."""
        from edgederm.runtime.metadata import load_schema

        schema = load_schema(schema)
        fields = {f["name"] for f in schema.fields}
        return schema.encode_many([{k: v for k, v in r.items() if k in fields} for r in self.records])


_NOT_METADATA = {"id", "label", "class_name"}


def read_image_folder(root: str | Path, config: pp.PreprocessConfig, progress: Callable[[int, int], None] | None = None,
                      masks: bool = False) -> LabelledImages:
    """Read ``root/labels.csv`` (id,label,class_name[,metadata...]) and ``root/images/<id>.jpg``.

    Other CSV columns are kept as metadata records (numbers parsed). ``masks=True``
    also reads ``root/masks/<id>.png`` (0/255), resized with nearest neighbour.
    """
    import cv2

    root = Path(root)
    table = root / "labels.csv"
    if not table.is_file():
        raise InputError(f"{root} has no labels.csv; expected the layout written by `edgederm data` (images/ + labels.csv)")
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise InputError(f"{table} lists no images")
    names: dict[int, str] = {}
    for r in rows:
        names[int(r["label"])] = r.get("class_name") or f"class_{r['label']}"
    class_names = [names.get(i, f"class_{i}") for i in range(max(names) + 1)]
    x = np.empty((len(rows), 3, *config.input_size), np.float32)
    mask_array = np.empty((len(rows), *config.input_size), np.int64) if masks else None
    for i, r in enumerate(rows):
        image_path = next((p for p in (root / "images" / f"{r['id']}{ext}" for ext in (".jpg", ".png", ".jpeg")) if p.exists()), None)
        if image_path is None:
            raise InputError(f"{table} lists {r['id']!r} but {root / 'images'} has no image for it")
        x[i] = pp.preprocess(read_image(image_path), config)
        if mask_array is not None:
            mask_path = root / "masks" / f"{r['id']}.png"
            mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
            if mask is None:
                raise InputError(f"segmentation training needs {mask_path}; it is missing or unreadable")
            mask = cv2.resize(mask, config.input_size[::-1], interpolation=cv2.INTER_NEAREST)
            mask_array[i] = mask > 127
        if progress:
            progress(i + 1, len(rows))
    y = np.array([int(r["label"]) for r in rows], np.int64)
    records = [{k: _parse(v) for k, v in r.items() if k not in _NOT_METADATA} for r in rows]
    return LabelledImages(x, y, [r["id"] for r in rows], class_names, records, mask_array)


def _parse(value: str) -> Any:
    if value == "":
        return None
    try:
        return float(value) if any(c in value for c in ".eE") else int(value)
    except ValueError:
        return value


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


def _augment(batch: np.ndarray, rng: np.random.Generator, masks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Dihedral flips/transposes (lesions have no canonical orientation), masks alike."""
    out = batch.copy()
    out_masks = masks.copy() if masks is not None else None
    flip_h = rng.random(len(out)) < 0.5
    flip_v = rng.random(len(out)) < 0.5
    out[flip_h] = out[flip_h, :, :, ::-1]
    out[flip_v] = out[flip_v, :, ::-1, :]
    transpose = rng.random() < 0.5 and out.shape[2] == out.shape[3]
    if transpose:
        out = out.transpose(0, 1, 3, 2)
    if out_masks is not None:
        out_masks[flip_h] = out_masks[flip_h, :, ::-1]
        out_masks[flip_v] = out_masks[flip_v, ::-1, :]
        if transpose:
            out_masks = out_masks.transpose(0, 2, 1)
        out_masks = np.ascontiguousarray(out_masks)
    return np.ascontiguousarray(out), out_masks


def segmentation_loss(logits: Any, target: Any) -> Any:
    """0.5 cross-entropy + 0.5 soft Dice over foreground classes (CFFormer's recipe)."""
    import torch
    from torch.nn import functional as F

    ce = F.cross_entropy(logits, target)
    probs = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    union = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    dice = (2 * inter + 1.0) / (union + 1.0)
    return 0.5 * ce + 0.5 * (1 - dice[1:]).mean() if logits.shape[1] > 1 else ce + torch.zeros(())


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
    model = create_model(config.model, **config.model_kwargs)
    if getattr(model, "task", "classify") == "segment":
        # Segmenters learn the lesion mask: background vs lesion, whatever the diagnosis.
        kwargs = {"num_classes": 2, "class_names": ["background", "lesion"], **config.model_kwargs}
    else:
        kwargs = {"num_classes": len(data.class_names), "class_names": list(data.class_names), **config.model_kwargs}
    torch.manual_seed(config.seed)
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
    segment = getattr(model, "task", "classify") == "segment"
    if segment and data.masks is None:
        raise InputError(f"{config.model} is a segmenter: read the folder with masks=True (it needs masks/<id>.png)")
    schema = getattr(model, "metadata_schema", None)
    metadata = data.metadata(schema) if "metadata" in getattr(model, "modalities", ()) else None
    targets = data.masks if segment else data.y

    def inputs_for(idx: np.ndarray, augment: bool) -> tuple[dict[str, Any], Any]:
        masks = data.masks[idx] if segment else None
        x = data.x[idx]
        if augment:
            x, masks = _augment(x, rng, masks)
        batch = {"dermoscopy": torch.from_numpy(x)}
        if metadata is not None:
            batch["metadata"] = torch.from_numpy(metadata[idx])
        return batch, torch.from_numpy(masks if segment else data.y[idx])

    def loss_of(batch: dict[str, Any], labels: Any) -> Any:
        if hasattr(model, "training_loss"):
            return model.training_loss(batch, labels)
        out = model(**batch)
        return segmentation_loss(out, labels) if segment else F.cross_entropy(out, labels, label_smoothing=config.label_smoothing)

    def evaluate() -> tuple[np.ndarray, float]:
        logits = predict_logits(model, [inputs_for(val_idx[i:i + 64], False)[0] for i in range(0, len(val_idx), 64)])
        if segment:
            pred = logits.argmax(1)
            truth = targets[val_idx]
            inter = ((pred == 1) & (truth == 1)).sum()
            return logits, float(2 * inter / max((pred == 1).sum() + (truth == 1).sum(), 1))
        return logits, float((logits.argmax(1) == data.y[val_idx]).mean())

    metric = "val_dice" if segment else "val_accuracy"
    history = []
    start = time.time()
    for epoch in range(config.epochs):
        model.train()
        perm = rng.permutation(train_idx)
        running, seen = 0.0, 0
        for step in range(steps_per_epoch):
            idx = perm[step * config.batch_size:(step + 1) * config.batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on a batch of one
                continue
            batch, labels = inputs_for(idx, augment=True)
            loss = loss_of(batch, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += float(loss.detach()) * len(idx)
            seen += len(idx)
            _progress_line(f"epoch {epoch + 1}/{config.epochs} step {step + 1}/{steps_per_epoch} loss {running / max(seen, 1):.3f}")
        val_logits, val_metric = evaluate()
        history.append({"epoch": epoch + 1, "train_loss": running / max(seen, 1), metric: val_metric})
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        say(f"epoch {epoch + 1}/{config.epochs}: train loss {running / max(seen, 1):.3f}, {metric.replace('_', ' ')} {val_metric:.3f} ({time.time() - start:.0f}s)")
    if segment:
        report = {"model": config.model, "epochs": config.epochs, "train_images": int(len(train_idx)), "val_images": int(n_val),
                  metric: history[-1][metric], "seconds": time.time() - start, "history": history}
        if out_dir is not None:
            save_checkpoint(model, out_dir, preprocess=(preprocess.to_dict() if preprocess else None), metrics=report)
        return model.eval(), report
    val_logits, _ = evaluate()
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


def predict_logits(model: Any, batches: list[dict[str, Any]]) -> np.ndarray:
    """Eval-mode logits of the model over a list of keyword-input batches."""
    import torch

    model.eval()
    with torch.no_grad():
        return np.concatenate([model(**batch).numpy() for batch in batches])

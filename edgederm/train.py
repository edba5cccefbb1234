"""Training on an image folder with labels (PyTorch); ``edgederm train`` and
``torchrun --nproc_per_node=N -m edgederm.train`` call this.

Pixels reach the model through ``edgederm.runtime.preprocess`` - the code the device
runs - so training and deployment see the same inputs.

Decisions:

* Optimiser: AdamW; the learning rate warms up linearly for ``warmup_epochs`` then
  follows a cosine or polynomial (``(1 - t)^0.9``) decay to 0, set per step from the
  step count alone, so the schedule's whole state is one integer.
* Losses (``edgederm.losses``): label-smoothed CE, or class-balanced focal loss for
  rare classes; segmenters 0.5 CE + 0.5 Dice. A model's own ``training_loss`` hook
  (SGMC-Net's self-contrastive guidance, CFFormer's Dice + CE, RemixFormer's modality
  drop-out) is the paper's recipe and takes precedence over ``loss``.
* Augmentation in numpy/OpenCV on the preprocessed tensors: dihedral flips and
  transposes (lesions have no canonical orientation), a small scale-rotation
  (+-15 degrees, 0.9-1.1x, reflected border; masks alike with nearest neighbour) and a
  small colour jitter (per-channel gain and offset in the normalised space, where a
  pixel-space gain/offset stays affine). Every random parameter of a global batch is
  drawn from one seeded generator, so the data order and augmentation are the same
  whether one process or N train, and after a resume.
* Mixed precision: ``bf16=True`` runs forward and loss under ``torch.autocast`` with
  bfloat16 (no loss scaling needed: bf16 has fp32's range). Validation runs in fp32 so
  temperature scaling is fitted on full-precision logits.
* Distributed: DistributedDataParallel (gloo on CPU, nccl on GPU), set up from
  torchrun's environment. ``batch_size`` is the *global* batch: every rank draws the
  same permutation and augmentation parameters and takes its contiguous shard of
  each global batch; a shard's mean loss is scaled by its share of the global batch,
  so the averaged gradient equals the single-process gradient exactly (up to float
  summation order) for models without BatchNorm. BatchNorm normalises per rank's
  shard, so those models match only approximately. Rank 0 validates, calibrates,
  writes checkpoints and logs; all ranks load a checkpoint to resume (shared disk).
* Checkpoints each epoch into ``out_dir``: ``model.safetensors`` + ``config.json``
  (a complete, exportable, calibrated checkpoint), ``metrics.json`` / ``metrics.csv``
  (one row per epoch), and ``training_state/`` for resuming:
  ``epoch-NNNN.safetensors`` (weights, AdamW moments and step counts, torch RNG) and
  ``state.json`` (epoch, scheduler step, the numpy generator's state, optimiser
  hyper-parameters, history, config, dataset fingerprint and the tensor file's
  sha256). The tensor file is complete before ``state.json`` points at it (temp file
  + rename), older tensor files are deleted after; nothing is pickled. A resumed run
  restores every piece of state, so k epochs + resume to N equals N epochs straight.
* Calibration (Guo et al., 2017) is fitted on the validation split each epoch and
  stored in the checkpoint's ``clinical`` section with the review rules of
  ``edgederm.runtime.safety``: the P(malignant) threshold for the target sensitivity,
  rare and safety-listed classes, and the training images' colour statistics for the
  not-skin check. Threshold and ECE come from the split the temperature was fitted
  on, so they are in-sample estimates; check them on held-out data (the tests do).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgederm.runtime import preprocess as pp
from edgederm.data.csvvalues import parse_csv_value
from edgederm.metrics import expected_calibration_error, fit_temperature  # noqa: F401  (public here too)
from edgederm.runtime.bundle import sha256_file, write_bytes_atomic, write_json_atomic
from edgederm.runtime.errors import InputError
from edgederm.runtime.imageio import read_image
from edgederm.train_options import SCHEDULES, add_train_arguments

log = logging.getLogger(__name__)

STATE_DIR = "training_state"
STATE_JSON = "state.json"


@dataclass
class LabelledImages:
    """Preprocessed images (N x 3 x H x W float32), labels, and what else the folder has."""

    x: np.ndarray
    y: np.ndarray
    ids: list[str]
    class_names: list[str]
    records: list[dict[str, Any]] = field(default_factory=list)  # raw metadata per image
    masks: np.ndarray | None = None  # N x H x W int64 lesion masks (0/1) at the input size
    # edgederm.runtime.safety.image_statistics of each original image (the not-skin check's reference)
    image_stats: list[dict[str, float]] | None = None
    # Lesion or patient id per image (edgederm.data.datasets Record.group): images of
    # one group stay in one split, so validation never sees a lesion training saw.
    groups: list[str | None] | None = None

    def metadata(self, schema: Any) -> np.ndarray:
        """Metadata encoded with ``schema`` (edgederm.runtime.metadata)."""
        from edgederm.runtime.metadata import load_schema

        schema = load_schema(schema)
        return schema.encode_many([schema.select(r) for r in self.records])

    def fingerprint(self) -> str:
        """Hash of ids, labels and tensor shape: a resume must see the same dataset."""
        h = hashlib.sha256()
        h.update("\n".join(self.ids).encode())
        h.update(np.ascontiguousarray(self.y, np.int64).tobytes())
        h.update(repr(tuple(self.x.shape)).encode())
        return h.hexdigest()


_NOT_METADATA = {"id", "label", "class_name"}


def read_image_folder(root: str | Path, config: pp.PreprocessConfig, progress: Callable[[int, int], None] | None = None,
                      masks: bool = False) -> LabelledImages:
    """Read ``root/labels.csv`` (id,label,class_name[,metadata...]) and ``root/images/<id>.jpg``.

    Other CSV columns are kept as metadata records (numbers parsed). ``masks=True``
    also reads ``root/masks/<id>.png`` (0/255), resized with nearest neighbour.
    """
    import cv2

    from edgederm.runtime.safety import image_statistics

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
    stats = []
    for i, r in enumerate(rows):
        image_path = next((p for p in (root / "images" / f"{r['id']}{ext}" for ext in (".jpg", ".png", ".jpeg")) if p.exists()), None)
        if image_path is None:
            raise InputError(f"{table} lists {r['id']!r} but {root / 'images'} has no image for it")
        image = read_image(image_path)
        x[i] = pp.preprocess(image, config)
        stats.append(image_statistics(image))
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
    records = [{k: parse_csv_value(v) for k, v in r.items() if k not in _NOT_METADATA} for r in rows]
    return LabelledImages(x, y, [r["id"] for r in rows], class_names, records, mask_array, stats)


@dataclass
class TrainConfig:
    model: str = "hifuse_tiny"
    epochs: int = 6
    batch_size: int = 32  # global batch (all ranks together)
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    schedule: str = "cosine"  # "cosine" | "poly"
    poly_power: float = 0.9
    loss: str = "ce"  # "ce" | "focal" (class-balanced, Cui et al. 2019)
    label_smoothing: float = 0.1
    focal_gamma: float = 2.0
    class_balance_beta: float = 0.999
    augment: bool = True
    color_jitter: float = 0.1  # max per-channel gain deviation and offset (normalised units)
    rotate_degrees: float = 15.0
    scale_range: float = 0.1
    bf16: bool = False
    val_fraction: float = 0.2
    seed: int = 0
    threads: int | None = None
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # calibrated safe outputs (edgederm.runtime.safety)
    target_sensitivity: float = 0.95
    malignant_classes: list[str] | None = None  # None: the class names known to be malignant
    review_classes: list[str] = field(default_factory=list)  # safety-listed, always reviewed near the top
    rare_class_fraction: float = 0.05  # classes rarer than this in training are reviewed too
    review_threshold: float = 0.5  # low_confidence below this top probability

    # Options that may change on resume without changing what the run computes.
    _RESUMABLE = ("epochs", "threads", "device")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"training config has unknown options {unknown}; known: {sorted(known)}")
        return cls(**data)

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise InputError(f"schedule {self.schedule!r} is not supported; choose one of {', '.join(SCHEDULES)}")
        from edgederm.losses import LOSSES

        if self.loss not in LOSSES:
            raise InputError(f"loss {self.loss!r} is not supported; choose one of {', '.join(LOSSES)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise InputError(f"epochs and batch size must be >= 1; got epochs={self.epochs}, batch_size={self.batch_size}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise InputError(f"label smoothing must be in [0, 1); got {self.label_smoothing}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InputError(f"device {self.device!r} is not supported; choose auto, cpu or cuda")


# -- pure pieces (tested on their own) ---------------------------------------------------
def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine", power: float = 0.9) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return (1 - progress) ** power


@dataclass
class AugmentParams:
    """Per-image random augmentation of one global batch (drawn once, applied per shard)."""

    flip_h: np.ndarray
    flip_v: np.ndarray
    transpose: np.ndarray
    affine: np.ndarray  # which images get a scale-rotation
    angle: np.ndarray
    scale: np.ndarray
    gain: np.ndarray  # n x 3
    offset: np.ndarray  # n x 3


def draw_augment(rng: np.random.Generator, n: int, config: TrainConfig) -> AugmentParams:
    """All random numbers of a global batch of ``n`` images, in a fixed order."""
    j = config.color_jitter
    return AugmentParams(
        flip_h=rng.random(n) < 0.5, flip_v=rng.random(n) < 0.5, transpose=rng.random(n) < 0.5,
        affine=rng.random(n) < 0.5,
        angle=rng.uniform(-config.rotate_degrees, config.rotate_degrees, n),
        scale=rng.uniform(1 - config.scale_range, 1 + config.scale_range, n),
        gain=rng.uniform(1 - j, 1 + j, (n, 3)), offset=rng.uniform(-j, j, (n, 3)),
    )


def augment(batch: np.ndarray, params: AugmentParams, rows: np.ndarray,
            masks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply ``params[rows]`` to ``batch`` (n x 3 x H x W float32) and masks (n x H x W) alike."""
    import cv2

    out = batch.copy()
    out_masks = masks.copy() if masks is not None else None
    h, w = out.shape[2:]
    for i, r in enumerate(rows):
        image = out[i].transpose(1, 2, 0)  # H x W x 3 view for OpenCV
        mask = out_masks[i] if out_masks is not None else None
        if params.flip_h[r]:
            image, mask = image[:, ::-1], (mask[:, ::-1] if mask is not None else None)
        if params.flip_v[r]:
            image, mask = image[::-1], (mask[::-1] if mask is not None else None)
        if params.transpose[r] and h == w:
            image, mask = image.transpose(1, 0, 2), (mask.T if mask is not None else None)
        if params.affine[r]:
            matrix = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), float(params.angle[r]), float(params.scale[r]))
            image = cv2.warpAffine(np.ascontiguousarray(image), matrix, (w, h), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REFLECT_101)
            if mask is not None:
                mask = cv2.warpAffine(np.ascontiguousarray(mask.astype(np.uint8)), matrix, (w, h),
                                      flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101).astype(np.int64)
        image = image * params.gain[r].astype(np.float32) + params.offset[r].astype(np.float32)
        out[i] = image.transpose(2, 0, 1)
        if out_masks is not None:
            out_masks[i] = mask
    return np.ascontiguousarray(out), out_masks


def segmentation_loss(logits: Any, target: Any) -> Any:
    """0.5 cross-entropy + 0.5 soft Dice (moved to ``edgederm.losses.dice_ce_loss``)."""
    from edgederm.losses import dice_ce_loss

    return dice_ce_loss(logits, target)


def shard_rows(n: int, rank: int, world: int) -> np.ndarray:
    """Positions of rank ``rank``'s contiguous shard within a global batch of ``n``."""
    return np.array_split(np.arange(n), world)[rank]


# -- progress, files ------------------------------------------------------------------
def _progress_line(text: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r" + text.ljust(79))
        sys.stderr.flush()


def _flat_row(entry: dict[str, Any]) -> dict[str, Any]:
    row = {}
    for key, value in entry.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                row[f"{key}_{sub}"] = v
        elif not isinstance(value, list):
            row[key] = value
    return row


def write_metrics(out_dir: Path, history: list[dict[str, Any]]) -> None:
    """``metrics.json`` (the history as is) and ``metrics.csv`` (one flat row per epoch)."""
    write_json_atomic(out_dir / "metrics.json", history)
    rows = [_flat_row(h) for h in history]
    columns: list[str] = []
    for r in rows:
        columns += [c for c in r if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(out_dir / "metrics.csv", buf.getvalue().encode())


# -- training state (no pickle) ---------------------------------------------------------
def _optimizer_to_flat(optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Optimizer state dict -> (tensors for safetensors, JSON-able rest)."""
    import torch

    sd = optimizer.state_dict()
    tensors: dict[str, Any] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{pid}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])  # JSON turned the tuple into a list
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_training_state(out_dir: Path, model: Any, optimizer: Any, rng: np.random.Generator, state: dict[str, Any]) -> Path:
    """Write ``training_state/epoch-NNNN.safetensors`` then point ``state.json`` at it."""
    import torch
    from safetensors.torch import save_file

    folder = out_dir / STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    name = f"epoch-{state['epoch']:04d}.safetensors"
    tmp = folder / f".{name}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / name)
    meta = {**state, "tensors": name, "sha256": sha256_file(folder / name), "optimizer": opt_meta,
            "numpy_rng": rng.bit_generator.state}
    write_json_atomic(folder / STATE_JSON, meta)
    for old in folder.glob("epoch-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return folder / STATE_JSON


def _training_state_json(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(path of state.json, its contents)`` from a checkpoint folder, its training_state/ or state.json."""
    path = Path(path)
    candidates = [path, path / STATE_JSON, path / STATE_DIR / STATE_JSON]
    json_path = next((p for p in candidates if p.is_file()), None)
    if json_path is None:
        raise InputError(f"cannot resume from {path}: no {STATE_DIR}/{STATE_JSON} there; "
                         "pass the checkpoint folder an interrupted `edgederm train --out` was writing")
    return json_path, json.loads(json_path.read_text())


def read_training_state(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state.json contents, tensors)``, the tensors checked against their sha256."""
    from safetensors.torch import load_file

    json_path, meta = _training_state_json(path)
    tensor_path = json_path.parent / meta["tensors"]
    if not tensor_path.is_file() or sha256_file(tensor_path) != meta["sha256"]:
        raise InputError(f"cannot resume from {json_path}: {tensor_path.name} is missing or does not match its sha256; "
                         "the training state is damaged, restart without --resume")
    return meta, load_file(str(tensor_path))


# -- distributed -------------------------------------------------------------------------
@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_pref: str) -> DistContext:
    """Single process, an existing process group (tests), or torchrun's environment."""
    import torch
    import torch.distributed as dist

    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but torch sees no CUDA GPU; use --device cpu (or auto)")
    owns = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
    else:
        rank, world, local = 0, 1, 0
    device = "cpu"
    if use_cuda:
        device = f"cuda:{local % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    return DistContext(rank, world, local, device, owns)


# -- the trainer -------------------------------------------------------------------------
def _build_model(config: TrainConfig, data: LabelledImages, model_factory: Callable[..., Any] | None) -> tuple[Any, bool]:
    import torch

    from edgederm.models import create_model

    factory = model_factory or (lambda **kw: create_model(config.model, **kw))
    probe = factory(**config.model_kwargs)
    segment = getattr(probe, "task", "classify") == "segment"
    if segment:
        # Segmenters learn the lesion mask: background vs lesion, whatever the diagnosis.
        kwargs = {"num_classes": 2, "class_names": ["background", "lesion"], **config.model_kwargs}
    else:
        kwargs = {"num_classes": len(data.class_names), "class_names": list(data.class_names), **config.model_kwargs}
    torch.manual_seed(config.seed)
    return factory(**kwargs), segment


def _loss_module(model: Any, loss_fn: Callable[[Any, Any], Any]) -> Any:
    """A module whose forward is the training loss, so DistributedDataParallel sees (and
    syncs) the whole step, including a model's own ``training_loss`` hook."""
    from torch import nn

    class TrainingStep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, batch: dict[str, Any], labels: Any) -> Any:
            if hasattr(self.model, "training_loss"):
                return self.model.training_loss(batch, labels)
            return loss_fn(self.model(**batch), labels)

    return TrainingStep()


def _reference_stats(data: LabelledImages, idx: np.ndarray, preprocess: pp.PreprocessConfig | None) -> list[dict[str, float]] | None:
    """Image statistics of the training images, for the not-skin check's reference."""
    from edgederm.runtime.safety import image_statistics

    if data.image_stats is not None:
        return [data.image_stats[i] for i in idx]
    if preprocess is None or preprocess.color_constancy != "none" or preprocess.hair_removal:
        return None  # the tensors no longer show the camera's colours; use the fixed ranges
    mean = np.array(preprocess.mean, np.float32)[:, None, None]
    std = np.array(preprocess.std, np.float32)[:, None, None]
    return [image_statistics(np.clip((data.x[i] * std + mean) * 255 + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0))
            for i in idx]


def calibrate(val_logits: np.ndarray, val_labels: np.ndarray, class_names: Sequence[str], config: TrainConfig,
              train_labels: np.ndarray, image_reference: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(clinical section, calibration report) from validation logits."""
    from edgederm.runtime.model import softmax
    from edgederm.runtime.safety import default_malignant_classes, malignant_probability, malignant_threshold

    temperature = fit_temperature(val_logits, val_labels)
    probs = softmax(val_logits, temperature)
    malignant = list(config.malignant_classes) if config.malignant_classes is not None else default_malignant_classes(class_names)
    unknown = [c for c in malignant if c not in class_names]
    if unknown:
        raise InputError(f"malignant classes {unknown} are not class names of this dataset ({list(class_names)})")
    malignant_idx = [list(class_names).index(c) for c in malignant]
    operating = malignant_threshold(malignant_probability(probs, class_names, malignant),
                                    np.isin(val_labels, malignant_idx), config.target_sensitivity) if malignant else None
    prevalence = np.bincount(train_labels, minlength=len(class_names)) / max(1, len(train_labels))
    rare = [c for c, p in zip(class_names, prevalence) if p < config.rare_class_fraction]
    clinical: dict[str, Any] = {
        "temperature": temperature,
        "review_threshold": config.review_threshold,
        "review_classes": sorted(set(config.review_classes) | set(rare)),
        "malignant_classes": malignant,
        "malignant_threshold": operating["threshold"] if operating else None,
        "target_sensitivity": config.target_sensitivity,
    }
    if operating:
        clinical["malignant_operating_point"] = operating
    if image_reference is not None:
        clinical["image_reference"] = image_reference
    report = {
        "temperature": temperature,
        "val_ece_before": expected_calibration_error(softmax(val_logits), val_labels),
        "val_ece_after": expected_calibration_error(probs, val_labels),
    }
    return clinical, report


def train(data: LabelledImages, config: TrainConfig, out_dir: str | Path | None = None,
          preprocess: pp.PreprocessConfig | None = None, say: Callable[[str], None] = print,
          resume: str | Path | None = None, model_factory: Callable[..., Any] | None = None,
          on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """Train ``config.model`` on ``data``; returns (model, report) and checkpoints each epoch to ``out_dir``.

    ``resume``: a checkpoint folder written by an interrupted run (its
    ``training_state/``); training continues where it stopped. ``model_factory``:
    ``factory(num_classes=, class_names=, **model_kwargs)`` instead of the registry
    (custom or test models). ``on_epoch_end(epoch, history_entry)`` runs after the
    epoch's checkpoint is written (an exception there interrupts the run cleanly).
    """
    import torch

    from edgederm.checkpoint import save_checkpoint
    from edgederm.losses import dice_ce_loss, make_classification_loss
    from edgederm.metrics import classification_metrics, segmentation_metrics
    from edgederm.runtime.model import softmax
    from edgederm.runtime.safety import fit_image_reference

    config.validate()
    resumed = read_training_state(resume) if resume is not None else None
    if resumed is not None:
        _check_resume(resumed[0], config, data)
    if config.threads:
        torch.set_num_threads(config.threads)
    ctx = _setup_distributed(config.device)
    say = say if ctx.main else (lambda m: None)
    out = Path(out_dir) if out_dir is not None else None
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    n = len(data.y)
    train_idx, val_idx = split_indices(n, config.val_fraction, rng, data.groups)
    model, segment = _build_model(config, data, model_factory)
    expected = tuple(getattr(model, "input_size", data.x.shape[2:]))
    if tuple(data.x.shape[2:]) != expected:
        raise InputError(f"images are preprocessed to {data.x.shape[2:]}, model {config.model} takes {expected}; set the preprocess input size to the model's")
    if segment and data.masks is None:
        raise InputError(f"{config.model} is a segmenter: read the folder with masks=True (it needs masks/<id>.png)")
    if not segment and config.malignant_classes is not None:
        unknown = [c for c in config.malignant_classes if c not in data.class_names]
        if unknown:
            raise InputError(f"malignant classes {unknown} are not class names of this dataset ({data.class_names}); "
                             "fix --malignant-classes")
    if config.loss != "ce" and hasattr(model, "training_loss"):
        log.warning("%s trains with its own training_loss (the paper's recipe); --loss %s is not used", config.model, config.loss)
    device = torch.device(ctx.device)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_idx) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = max(1, int(config.warmup_epochs * steps_per_epoch))
    schema = getattr(model, "metadata_schema", None)
    metadata = data.metadata(schema) if "metadata" in getattr(model, "modalities", ()) else None
    counts = np.bincount(data.y[train_idx], minlength=len(data.class_names))
    loss_fn = dice_ce_loss if segment else make_classification_loss(
        config.loss, counts, config.label_smoothing, config.focal_gamma, config.class_balance_beta)
    history: list[dict[str, Any]] = []
    start_epoch, step, elapsed = 0, 0, 0.0
    if resumed is not None:
        # Loaded before DDP wraps the model; every rank loads the same state.
        meta, saved = resumed
        model.load_state_dict({k[len("model."):]: v for k, v in saved.items() if k.startswith("model.")})
        optimizer.load_state_dict(_optimizer_from_flat(saved, meta["optimizer"]))
        rng.bit_generator.state = meta["numpy_rng"]
        torch.set_rng_state(saved["rng.torch"])
        if "rng.cuda" in saved and device.type == "cuda":
            torch.cuda.set_rng_state(saved["rng.cuda"])
        start_epoch, step, elapsed, history = meta["epoch"], meta["step"], meta["seconds"], meta["history"]
        if start_epoch >= config.epochs:
            say(f"{resume} already finished {start_epoch} epochs; nothing to train (raise --epochs to continue)")
        else:
            say(f"resuming {config.model} at epoch {start_epoch + 1}/{config.epochs} from {resume}")
    step_module = _loss_module(model, loss_fn)
    if ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_module = DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None,
                                              find_unused_parameters=hasattr(model, "training_loss"))
    image_reference = None
    if not segment and ctx.main:
        image_reference = fit_image_reference(_reference_stats(data, train_idx, preprocess) or [])

    def tensors(idx: np.ndarray, params: AugmentParams | None = None, rows: np.ndarray | None = None) -> tuple[dict[str, Any], Any]:
        x = data.x[idx]
        masks = data.masks[idx] if data.masks is not None and segment else None
        if params is not None and rows is not None:
            x, masks = augment(x, params, rows, masks)
        batch = {"dermoscopy": torch.from_numpy(x).to(device)}
        if metadata is not None:
            batch["metadata"] = torch.from_numpy(metadata[idx]).to(device)
        return batch, torch.from_numpy(masks if segment else data.y[idx]).to(device)

    def evaluate() -> np.ndarray:
        return predict_logits(model, [tensors(val_idx[i:i + 64])[0] for i in range(0, len(val_idx), 64)])

    clinical: dict[str, Any] = {}
    calibration: dict[str, Any] = {}
    step_losses: list[float] = []
    rank_samples = 0  # images this rank trained on (a shard of each global batch)
    start = time.time() - elapsed
    for epoch in range(start_epoch, config.epochs):
        step_module.train()
        perm = rng.permutation(train_idx)
        running, seen = 0.0, 0
        for b in range(steps_per_epoch):
            idx = perm[b * config.batch_size:(b + 1) * config.batch_size]
            params = draw_augment(rng, len(idx), config) if config.augment else None
            if len(idx) < 2 * ctx.world:  # BatchNorm cannot train on a shard of one
                continue
            rows = shard_rows(len(idx), ctx.rank, ctx.world)
            batch, labels = tensors(idx[rows], params, rows)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_factor(step, total_steps, warmup, config.schedule, config.poly_power)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                loss = step_module(batch, labels)
            # Scale by the shard's share so DDP's gradient average is the global batch mean.
            share = len(rows) * ctx.world / len(idx)
            optimizer.zero_grad(set_to_none=True)
            (loss * share).backward()
            optimizer.step()
            step += 1
            global_loss = _global_mean_loss(loss.detach().float() * len(rows), len(idx), ctx)
            step_losses.append(global_loss)
            rank_samples += len(rows)
            running += global_loss * len(idx)
            seen += len(idx)
            if ctx.main:
                _progress_line(f"epoch {epoch + 1}/{config.epochs} step {b + 1}/{steps_per_epoch} loss {running / max(seen, 1):.3f}")
        if ctx.main and sys.stderr.isatty():
            sys.stderr.write("\n")
        entry: dict[str, Any] = {"epoch": epoch + 1, "train_loss": running / max(seen, 1),
                                 "lr": optimizer.param_groups[0]["lr"]}
        if ctx.main:
            val_logits = evaluate()
            if segment:
                assert data.masks is not None  # checked before training
                seg = segmentation_metrics(val_logits.argmax(1), data.masks[val_idx])
                entry.update({"val_dice": seg["dice"], "val_iou": seg["iou"], "val_hd95": seg["hd95"],
                              "val_hd95_undefined_images": seg["hd95_undefined_images"]})
                summary = f"val dice {seg['dice']:.3f}, IoU {seg['iou']:.3f}, HD95 {seg['hd95'] if seg['hd95'] is None else round(seg['hd95'], 2)} px"
            else:
                val_labels = data.y[val_idx]
                clinical, calibration = calibrate(val_logits, val_labels, data.class_names, config,
                                                  data.y[train_idx], image_reference)
                probs = softmax(val_logits)
                m = classification_metrics(probs, val_labels, data.class_names)
                entry.update({
                    "val_loss": float(-np.log(np.clip(probs[np.arange(len(val_labels)), val_labels], 1e-12, None)).mean()),
                    "val_accuracy": m["accuracy"], "val_balanced_accuracy": m["balanced_accuracy"],
                    "val_macro_f1": m["macro_f1"], "val_macro_auc": m["macro_auc"],
                    "val_recall": m["recall"], "val_auc": m["auc"], **calibration,
                })
                summary = (f"val accuracy {m['accuracy']:.3f}, balanced {m['balanced_accuracy']:.3f}, "
                           f"macro F1 {m['macro_f1']:.3f}, ECE {calibration['val_ece_before']:.3f} -> {calibration['val_ece_after']:.3f}")
            entry["seconds"] = time.time() - start
            history.append(entry)
            say(f"epoch {epoch + 1}/{config.epochs}: train loss {entry['train_loss']:.3f}, {summary} ({entry['seconds']:.0f}s)")
            if out is not None:
                report = _report(config, data, train_idx, val_idx, history, calibration, clinical, ctx, segment)
                save_checkpoint(model, out, preprocess=(preprocess.to_dict() if preprocess else None),
                                clinical=clinical or None, metrics=report, train_config=config.to_dict(),
                                tiling=segmenter_tiling(segment, preprocess))
                save_training_state(out, model, optimizer, rng, {
                    "epoch": epoch + 1, "step": step, "seconds": entry["seconds"], "history": history,
                    "config": config.to_dict(), "dataset": data.fingerprint(), "world_size": ctx.world,
                })
                write_metrics(out, history)
        _barrier(ctx)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, history[-1] if history else entry)
    report = _report(config, data, train_idx, val_idx, history, calibration, clinical, ctx, segment)
    report["step_losses"] = step_losses
    report["rank_samples"] = rank_samples
    if calibration and ctx.main:
        say(f"temperature {calibration['temperature']:.3f}: validation ECE {calibration['val_ece_before']:.3f} -> {calibration['val_ece_after']:.3f}")
    if ctx.owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()
    return model.eval(), report


def split_indices(n: int, val_fraction: float, rng: np.random.Generator,
                  groups: Sequence[str | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices; seeded. With ``groups``, whole groups go to one side.

    Groups are shuffled and moved to validation until it holds at least
    ``val_fraction`` of the images; an image without a group is a group of its own.
    """
    n_val = max(1, int(round(n * val_fraction)))
    if not groups or all(g is None for g in groups):
        order = rng.permutation(n)
        return order[n_val:], order[:n_val]
    keys = [g if g is not None else f"\0image-{i}" for i, g in enumerate(groups)]
    members: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    names = list(members)
    val: list[int] = []
    for j in rng.permutation(len(names)):
        if len(val) >= n_val:
            break
        val.extend(members[names[j]])
    chosen = np.zeros(n, bool)
    chosen[val] = True
    if chosen.all():
        raise InputError(f"all {n} images fell into {len(names)} group(s) too large to leave any for training; "
                         "lower val_fraction or check the lesion/patient ids")
    return rng.permutation(np.flatnonzero(~chosen)), np.flatnonzero(chosen)


def segmenter_tiling(segment: bool, preprocess: pp.PreprocessConfig | None) -> dict[str, Any] | None:
    """The pixel scale a segmenter learnt, for the runtime's tiler.

    Images resized whole to the input size teach lesions at that scale, so the
    runtime must tile a copy whose longer side is the input size (and scale the mask
    back); tiles cut at native resolution would show the model a scale it never saw.
    Training on native-resolution crops (``resize="none"``) leaves the runtime at
    native resolution.
    """
    if not segment or preprocess is None or preprocess.resize == "none":
        return None
    return {"working_max_side": int(max(preprocess.input_size))}


def _global_mean_loss(weighted_sum: Any, global_n: int, ctx: DistContext) -> float:
    if ctx.world > 1:
        import torch.distributed as dist

        total = weighted_sum.clone()
        dist.all_reduce(total)
        return float(total) / global_n
    return float(weighted_sum) / global_n


def _barrier(ctx: DistContext) -> None:
    if ctx.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _report(config: TrainConfig, data: LabelledImages, train_idx: np.ndarray, val_idx: np.ndarray,
            history: list[dict[str, Any]], calibration: dict[str, Any], clinical: dict[str, Any],
            ctx: DistContext, segment: bool) -> dict[str, Any]:
    last = history[-1] if history else {}
    report: dict[str, Any] = {
        "model": config.model, "epochs": config.epochs, "train_images": int(len(train_idx)), "val_images": int(len(val_idx)),
        "world_size": ctx.world, "seconds": last.get("seconds"), "history": history,
    }
    if segment:
        report.update({k: last.get(k) for k in ("val_dice", "val_iou", "val_hd95")})
    else:
        report.update({k: last.get(k) for k in ("val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_macro_auc")})
        report.update(calibration)
        if clinical:
            report["clinical"] = clinical
    return report


def _check_resume(meta: dict[str, Any], config: TrainConfig, data: LabelledImages) -> None:
    saved = meta["config"]
    now = config.to_dict()
    changed = {k: (saved.get(k), now[k]) for k in now if k not in TrainConfig._RESUMABLE and saved.get(k) != now[k]}
    if changed:
        detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise InputError(f"cannot resume: options differ from the interrupted run ({detail}); "
                         "use the run's options (the CLI takes them from the checkpoint) or start without --resume")
    if meta["dataset"] != data.fingerprint():
        raise InputError("cannot resume: the dataset differs from the interrupted run's (ids, labels or image size); "
                         "resume on the same data or start without --resume")
    if config.epochs != saved["epochs"]:
        log.warning("resuming with %d epochs instead of %d: the learning-rate schedule is stretched from here on",
                    config.epochs, saved["epochs"])


def predict_logits(model: Any, batches: list[dict[str, Any]]) -> np.ndarray:
    """Eval-mode fp32 logits of the model over a list of keyword-input batches."""
    import torch

    model.eval()
    with torch.no_grad():
        return np.concatenate([model(**batch).float().cpu().numpy() for batch in batches])


# -- command line (shared by `edgederm train` and `python -m edgederm.train`) ---------------
def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from CLI options; with --resume, the run's stored options (only --epochs/--threads may change)."""
    if args.resume is not None:
        # only the config here (no tensors): train() reads and verifies the whole state
        base = TrainConfig.from_dict(_training_state_json(args.resume)[1]["config"])
    else:
        base = TrainConfig()
    values = base.to_dict()
    for name in ("model", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "schedule", "loss",
                 "label_smoothing", "bf16", "augment", "target_sensitivity", "seed", "threads", "device"):
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    for name in ("malignant_classes", "review_classes"):
        given = getattr(args, name, None)
        if given is not None:
            values[name] = [c.strip() for c in given.split(",") if c.strip()]
    return TrainConfig.from_dict(values)


def run_cli(args: argparse.Namespace) -> int:
    """``edgederm train``: read the folder, train (resume), print the report."""
    from edgederm.models import create_model

    config = config_from_args(args)
    probe = create_model(config.model, **config.model_kwargs)
    input_size: Any = probe.input_size
    preprocess = pp.PreprocessConfig(input_size=tuple(input_size), color_constancy=args.color_constancy,
                                     hair_removal=args.hair_removal)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"reading {args.data} at {preprocess.input_size[0]}x{preprocess.input_size[1]} ...", file=sys.stderr)
    from edgederm.data.datasets import load_labelled_images, read_dataset

    dataset = read_dataset(args.data, layout=getattr(args, "layout", "auto"), schema=getattr(args, "schema", None))
    if rank == 0:
        print(dataset.summary(), file=sys.stderr)
    data = load_labelled_images(dataset, preprocess, masks=getattr(probe, "task", "classify") == "segment",
                                progress=rank == 0)
    _, report = train(data, config, out_dir=args.out, preprocess=preprocess, resume=args.resume)
    if rank == 0:
        metric = "val_dice" if "val_dice" in report else "val_accuracy"
        print(f"checkpoint written to {args.out} ({metric.replace('_', ' ')} {report.get(metric, float('nan')):.3f})")
        if args.json:
            print(json.dumps({k: v for k, v in report.items() if k not in ("step_losses", "rank_samples")}, indent=2, default=str))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from edgederm.runtime.errors import EdgeDermError

    parser = argparse.ArgumentParser(
        prog="python -m edgederm.train",
        description="Train a registered model (one process, or N with `torchrun --nproc_per_node=N -m edgederm.train`). "
                    "Same options as `edgederm train`.")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_cli(args)
    except EdgeDermError as exc:
        print(f"edgederm train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

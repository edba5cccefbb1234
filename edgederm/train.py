"""Training on an image folder with labels (PyTorch); ``edgederm train`` and
``torchrun --nproc_per_node=N -m edgederm.train`` call this.

This module is the loop; its parts live in ``edgederm.training`` (config and
schedule, options, resumable state, distributed set-up, clinical calibration) and the
data it trains on in ``edgederm.data`` (readers, augmentation, splits). Pixels reach
the model through ``edgederm.runtime.preprocess`` - the code the device runs - so
training and deployment see the same inputs.

Decisions:

* Optimiser: AdamW; the learning rate warms up linearly for ``warmup_epochs`` then
  follows a cosine or polynomial (``(1 - t)^0.9``) decay to 0
  (``edgederm.training.config.lr_factor``).
* Losses (``edgederm.losses``): label-smoothed CE, or class-balanced focal loss for
  rare classes; segmenters 0.5 CE + 0.5 Dice. A model's own ``training_loss`` hook
  (SGMC-Net's self-contrastive guidance, CFFormer's Dice + CE, RemixFormer's modality
  drop-out) is the paper's recipe and takes precedence over ``loss``.
* Augmentation (``edgederm.data.augment``): every random parameter of a global batch
  is drawn from one seeded generator, so the data order and augmentation are the same
  whether one process or N train, and after a resume.
* Mixed precision: ``bf16=True`` runs forward and loss under ``torch.autocast`` with
  bfloat16 (no loss scaling needed: bf16 has fp32's range). Validation runs in fp32 so
  temperature scaling is fitted on full-precision logits.
* Distributed (``edgederm.training.distributed``): DistributedDataParallel (gloo on
  CPU, nccl on GPU). Each rank takes its shard of every global batch; a shard's mean
  loss is scaled by its share of the global batch, so the averaged gradient equals the
  single-process gradient exactly (up to float summation order) for models without
  BatchNorm. BatchNorm normalises per rank's shard, so those models match only
  approximately. All ranks load a checkpoint to resume (shared disk).
* Checkpoints each epoch into ``out_dir``: ``model.safetensors`` + ``config.json``
  (a complete, exportable, calibrated checkpoint), the per-epoch metrics and the
  resumable ``training_state/`` (``edgederm.training.state``). A resumed run restores
  every piece of state, so k epochs + resume to N equals N epochs straight.
* Calibration (``edgederm.training.clinical``) is fitted on the validation split each
  epoch and stored in the checkpoint's ``clinical`` section.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgederm.data.augment import AugmentParams, augment, draw_augment
from edgederm.data.labelled import LabelledImages
from edgederm.data.splits import split_indices
from edgederm.runtime import preprocess as pp
from edgederm.runtime.errors import InputError
from edgederm.training import distributed
from edgederm.training.clinical import calibrate, reference_stats
from edgederm.training.config import TrainConfig, lr_factor
from edgederm.training.distributed import DistContext, shard_rows
from edgederm.training.options import add_train_arguments, config_from_args
from edgederm.training.state import (
    check_resume, read_training_state, restore_training_state, save_training_state, write_metrics,
)

log = logging.getLogger(__name__)


def _progress_line(text: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r" + text.ljust(79))
        sys.stderr.flush()


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
    from edgederm.runtime.probabilities import softmax
    from edgederm.runtime.safety import fit_image_reference

    config.validate()
    resumed = read_training_state(resume) if resume is not None else None
    if resumed is not None:
        check_resume(resumed[0], config, data)
    if config.threads:
        torch.set_num_threads(config.threads)
    ctx = distributed.setup_distributed(config.device)
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
        start_epoch, step, elapsed, history = restore_training_state(resumed, model, optimizer, rng, device)
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
        image_reference = fit_image_reference(reference_stats(data, train_idx, preprocess) or [])

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
            global_loss = distributed.global_mean_loss(loss.detach().float() * len(rows), len(idx), ctx)
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
        distributed.barrier(ctx)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, history[-1] if history else entry)
    report = _report(config, data, train_idx, val_idx, history, calibration, clinical, ctx, segment)
    report["step_losses"] = step_losses
    report["rank_samples"] = rank_samples
    if calibration and ctx.main:
        say(f"temperature {calibration['temperature']:.3f}: validation ECE {calibration['val_ece_before']:.3f} -> {calibration['val_ece_after']:.3f}")
    distributed.shutdown(ctx)
    return model.eval(), report


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


def predict_logits(model: Any, batches: list[dict[str, Any]]) -> np.ndarray:
    """Eval-mode fp32 logits of the model over a list of keyword-input batches."""
    import torch

    model.eval()
    with torch.no_grad():
        return np.concatenate([model(**batch).float().cpu().numpy() for batch in batches])



# -- command line (shared by `edgederm train` and `python -m edgederm.train`) ---------------
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
    from edgederm.data import load_labelled_images, read_dataset

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

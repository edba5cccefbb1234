"""Options of ``edgederm train`` and ``python -m edgederm.train``; no torch at import."""
from __future__ import annotations

import argparse
from pathlib import Path

from edgederm.training.config import SCHEDULES, TrainConfig

# Options that override the TrainConfig field of the same name when given.
_CONFIG_OPTIONS = ("model", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "schedule", "loss",
                   "label_smoothing", "bf16", "augment", "target_sensitivity", "seed", "threads", "device")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``edgederm train``; defaults None mean "TrainConfig's, or the resumed run's"."""
    p.add_argument("data", type=Path, help="dataset folder (or CSV file): labels.csv + images/, or a public layout (see --layout)")
    p.add_argument("--layout", default="auto",
                   help="dataset layout: auto (detect), edgederm, isic (2018/2019), ham10000, pad_ufes_20, derm7pt, "
                        "isic_segmentation, ph2, folder (one folder per class), csv (your own CSV)")
    p.add_argument("--schema", default=None,
                   help="metadata schema (bundled name or JSON file) to validate the metadata with (default: the layout's own)")
    p.add_argument("--model", default=None, help="registered model name (see `edgederm models`; default hifuse_tiny)")
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder to write (each epoch)")
    p.add_argument("--resume", type=Path, default=None, metavar="CKPT",
                   help="continue an interrupted run from its checkpoint folder (options come from it)")
    p.add_argument("--epochs", type=int, default=None, help="default 6")
    p.add_argument("--batch-size", type=int, default=None, help="global batch over all processes (default 32)")
    p.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate (default 2e-3)")
    p.add_argument("--weight-decay", type=float, default=None, help="default 0.05")
    p.add_argument("--warmup", type=float, default=None, dest="warmup_epochs", help="warm-up epochs (default 0.5)")
    p.add_argument("--schedule", choices=SCHEDULES, default=None, help="decay after warm-up (default cosine)")
    p.add_argument("--loss", choices=("ce", "focal"), default=None,
                   help="ce (label-smoothed) or focal (class-balanced, for rare classes); default ce")
    p.add_argument("--label-smoothing", type=float, default=None, help="default 0.1")
    p.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast for forward and loss")
    p.add_argument("--no-augment", action="store_false", dest="augment", default=None, help="turn augmentation off")
    p.add_argument("--target-sensitivity", type=float, default=None,
                   help="sensitivity on malignant classes that sets the possible_malignancy threshold (default 0.95)")
    p.add_argument("--malignant-classes", default=None, help="comma-separated class names (default: known malignant names)")
    p.add_argument("--review-classes", default=None, help="comma-separated classes always reviewed near the top")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: torch's choice)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    p.add_argument("--color-constancy", choices=["none", "gray_world", "gwsd"], default="none")
    p.add_argument("--hair-removal", action="store_true")
    p.add_argument("--json", action="store_true", help="print the training report as JSON")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from CLI options; with --resume, the run's stored options (only --epochs/--threads may change)."""
    if args.resume is not None:
        from edgederm.training.state import training_state_json

        # only the config here (no tensors): train() reads and verifies the whole state
        base = TrainConfig.from_dict(training_state_json(args.resume)[1]["config"])
    else:
        base = TrainConfig()
    values = base.to_dict()
    for name in _CONFIG_OPTIONS:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    for name in ("malignant_classes", "review_classes"):
        given = getattr(args, name, None)
        if given is not None:
            values[name] = [c.strip() for c in given.split(",") if c.strip()]
    return TrainConfig.from_dict(values)

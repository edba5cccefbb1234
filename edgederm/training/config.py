"""What a training run computes, as one JSON-able record, and its learning-rate schedule."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from edgederm.runtime.errors import InputError

SCHEDULES = ("cosine", "poly")


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


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine", power: float = 0.9) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based).

    Set from the step count alone, so the schedule's whole state is one integer.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return (1 - progress) ** power

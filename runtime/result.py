"""The Result a prediction returns: the public contract (``docs/architecture.md``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Result:
    label: str | None
    probabilities: dict[str, float]
    needs_review: bool
    review_reasons: list[str]
    backend: str
    precision: str
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds per step
    mask: np.ndarray | None = None  # segmenters: H x W uint8 at input resolution
    heatmap: np.ndarray | None = None  # H x W float32 in [0, 1] at input resolution
    memory_peak_bytes: int | None = None
    notes: list[str] = field(default_factory=list)  # fallbacks and ignored inputs, never silent

    def to_dict(self, include_arrays: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "label": self.label,
            "probabilities": self.probabilities,
            "needs_review": self.needs_review,
            "review_reasons": self.review_reasons,
            "backend": self.backend,
            "precision": self.precision,
            "timings_ms": {k: round(v, 3) for k, v in self.timings.items()},
            "memory_peak_bytes": self.memory_peak_bytes,
            "notes": self.notes,
        }
        if self.mask is not None:
            out["mask_shape"] = list(self.mask.shape)
            out["mask_fraction"] = float((self.mask > 0).mean())
            if include_arrays:
                out["mask"] = self.mask.tolist()
        return out

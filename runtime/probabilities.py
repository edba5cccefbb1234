"""Logits -> probabilities, in float64 where it matters for ranking near ties."""
from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, temperature: float = 1.0, axis: int = -1) -> np.ndarray:
    """Temperature-scaled softmax; ``temperature`` is checked (> 0, finite) when the bundle is read."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


def tile_probabilities(logits: np.ndarray) -> np.ndarray:
    """``N x K x T x T`` logits -> probabilities in float32: softmax over K, or sigmoid for K = 1."""
    x = np.asarray(logits, dtype=np.float32)
    if x.shape[1] == 1:
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32, copy=False)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    e /= e.sum(axis=1, keepdims=True)
    return e

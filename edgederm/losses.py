"""Training losses: label-smoothed cross-entropy, class-balanced focal loss, CE + Dice.

Decisions:

* Class-balanced weights follow Cui et al., "Class-Balanced Loss Based on Effective
  Number of Samples" (CVPR 2019): the effective number of a class with ``n`` images is
  ``(1 - beta**n) / (1 - beta)``, its weight the inverse of that, and the weights are
  rescaled to sum to the number of classes so that the loss has the scale of plain CE
  (the paper does the same). ``beta = 0.999`` by default (the paper's choice for
  long-tailed sets of thousands of images); ``beta -> 0`` gives equal weights and
  ``beta -> 1`` inverse frequency. A class with no training image gets the largest
  weight of the others rather than infinity, since it can still be predicted.
* Focal loss (Lin et al., 2017) multiplies the per-sample CE by ``(1 - p_y) ** gamma``;
  ``gamma = 2`` (the paper's default). The per-sample terms are averaged over the
  batch (not divided by the sum of weights), so data-parallel ranks that each average
  their shard and then average gradients get exactly the single-process loss.
* Segmentation: 0.5 cross-entropy + 0.5 soft Dice over the foreground classes, Dice
  pooled over the whole batch with +1 smoothing (CFFormer's recipe; a batch with no
  lesion pixel then does not produce a 0/0).
* Everything here is batch-mean, so the trainer can weight a shard's loss by its
  share of the global batch (see ``edgederm.train``).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

LOSSES = ("ce", "focal")


def class_balanced_weights(counts: Sequence[int] | np.ndarray, beta: float = 0.999) -> np.ndarray:
    """Cui et al. (2019) weights ``(1 - beta) / (1 - beta**n_c)``, summing to the number of classes."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or len(counts) == 0 or (counts < 0).any():
        raise ValueError(f"class counts must be a non-empty list of non-negative integers; got {counts.tolist()}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1); got {beta} (0.999 is the paper's choice, 0 gives equal weights)")
    present = counts > 0
    if not present.any():
        raise ValueError("class counts are all zero; there is nothing to weight")
    weights = np.zeros(len(counts))
    weights[present] = (1.0 - beta) / (1.0 - np.power(beta, counts[present]))  # 1 / effective number
    weights[~present] = weights[present].max()
    return weights / weights.sum() * len(counts)


def focal_loss(logits: Any, target: Any, gamma: float = 2.0, weight: Any = None, label_smoothing: float = 0.0) -> Any:
    """Mean over the batch of ``-w_y (1 - p_y)^gamma log p_y`` (Lin et al., 2017).

    With ``label_smoothing`` the log term is the smoothed cross-entropy, the focal
    factor still uses the probability of the true class.
    """
    from torch.nn import functional as F

    logp = F.log_softmax(logits.float(), dim=1)
    logp_true = logp.gather(1, target[:, None])[:, 0]
    if label_smoothing > 0:
        ce = -(1 - label_smoothing) * logp_true - label_smoothing * logp.mean(dim=1)
    else:
        ce = -logp_true
    factor = (1 - logp_true.exp()).clamp(min=0).pow(gamma)
    loss = factor * ce
    if weight is not None:
        loss = loss * weight.to(loss.device, loss.dtype)[target]
    return loss.mean()


def cross_entropy(logits: Any, target: Any, label_smoothing: float = 0.0, weight: Any = None) -> Any:
    """Batch-mean cross-entropy (per-sample class weights, not torch's weighted mean)."""
    from torch.nn import functional as F

    loss = F.cross_entropy(logits.float(), target, reduction="none", label_smoothing=label_smoothing)
    if weight is not None:
        loss = loss * weight.to(loss.device, loss.dtype)[target]
    return loss.mean()


def dice_ce_loss(logits: Any, target: Any) -> Any:
    """0.5 cross-entropy + 0.5 soft Dice over foreground classes (CFFormer's recipe)."""
    import torch
    from torch.nn import functional as F

    logits = logits.float()
    ce = F.cross_entropy(logits, target)
    if logits.shape[1] == 1:
        return ce + torch.zeros(())
    probs = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    union = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    dice = (2 * inter + 1.0) / (union + 1.0)
    return 0.5 * ce + 0.5 * (1 - dice[1:]).mean()


def make_classification_loss(name: str, class_counts: Sequence[int] | np.ndarray, label_smoothing: float = 0.0,
                             gamma: float = 2.0, beta: float = 0.999) -> Callable[[Any, Any], Any]:
    """``"ce"``: label-smoothed CE; ``"focal"``: class-balanced focal loss for rare classes."""
    import torch

    if name == "ce":
        return lambda logits, target: cross_entropy(logits, target, label_smoothing)
    if name == "focal":
        weight = torch.tensor(class_balanced_weights(class_counts, beta), dtype=torch.float32)
        return lambda logits, target: focal_loss(logits, target, gamma, weight, label_smoothing)
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")

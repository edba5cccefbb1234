"""Train/validation splits that keep a lesion's (or patient's) images on one side."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from edgederm.runtime.errors import InputError


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

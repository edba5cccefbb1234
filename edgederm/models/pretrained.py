"""Loading standard pretrained weights through explicit, strict key maps.

A key map turns a reference checkpoint's names (timm or torchvision) into ours. The
load is strict both ways: every key of the reference state dict must be used (or be
listed as deliberately dropped, e.g. a classifier head) and every parameter of ours
must be filled, otherwise :class:`PretrainedMismatchError` names the keys. Nothing
is downloaded: pass a state dict or a local .safetensors / .pth file that you have.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from edgederm.runtime.errors import EdgeDermError


class PretrainedMismatchError(EdgeDermError):
    pass


KeyMap = Callable[[str], str | None]  # reference key -> our key, or None to drop it on purpose


def read_state_dict(source: str | Path | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict from a mapping, a .safetensors file, or a torch file (weights only)."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # weights_only=True: tensors and containers only, never arbitrary pickled objects.
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return dict(state)


def load_mapped(module: nn.Module, source: str | Path | Mapping[str, torch.Tensor], key_map: KeyMap,
                ignore_ours: Iterable[str] = ()) -> list[str]:
    """Load ``source`` into ``module`` through ``key_map``, strictly. Returns dropped keys.

    ``ignore_ours``: regexes of our keys that the reference does not have (e.g. a
    module the paper adds on top of a backbone) and may stay at their init.
    """
    reference = read_state_dict(source)
    ours = module.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    dropped, unknown, bad_shape = [], [], []
    for key, value in reference.items():
        target = key_map(key)
        if target is None:
            dropped.append(key)
            continue
        if target not in ours:
            unknown.append(f"{key} -> {target}")
            continue
        if ours[target].shape != value.shape:
            bad_shape.append(f"{key} {tuple(value.shape)} -> {target} {tuple(ours[target].shape)}")
            continue
        mapped[target] = value
    patterns = [re.compile(p) for p in ignore_ours]
    unfilled = [k for k in ours if k not in mapped and not any(p.search(k) for p in patterns)
                and not k.endswith("num_batches_tracked")]
    if unknown or bad_shape or unfilled:
        raise PretrainedMismatchError(
            f"pretrained weights do not fit {type(module).__name__}: "
            f"{len(unknown)} reference keys map to no parameter {unknown[:5]}, "
            f"{len(bad_shape)} shape mismatches {bad_shape[:5]}, "
            f"{len(unfilled)} of our parameters left unfilled {unfilled[:5]}"
        )
    module.load_state_dict(mapped, strict=False)
    return dropped


def resnet_key_map(key: str) -> str | None:
    """torchvision / timm ResNet -> ResNetEncoder: same names, classifier dropped."""
    return None if key.startswith("fc.") else key


def load_resnet(encoder: nn.Module, source: str | Path | Mapping[str, torch.Tensor]) -> list[str]:
    return load_mapped(encoder, source, resnet_key_map)

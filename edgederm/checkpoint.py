"""Checkpoints: safetensors weights + a JSON config that rebuilds the model. No pickle.

A checkpoint is a folder::

    model.safetensors   weights (state dict)
    config.json         {"model_name", "model_kwargs", "class_names", "preprocess",
                         "clinical", "metrics", ...}

Both are written through temp files and renamed, the config last, so a checkpoint
with a config always has complete weights.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import json

from edgederm.runtime.bundle import write_json_atomic
from edgederm.runtime.errors import EdgeDermError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(EdgeDermError):
    pass


def save_checkpoint(model: Any, directory: str | os.PathLike[str], **config: Any) -> Path:
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out / f".{WEIGHTS}.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, out / WEIGHTS)
    meta = {
        "model_name": getattr(model, "model_name", None),
        "model_kwargs": getattr(model, "model_kwargs", {}),
        "class_names": list(getattr(model, "class_names", [])),
        **config,
    }
    write_json_atomic(out / CONFIG, meta)
    return out


def read_checkpoint_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: no {CONFIG} (expected a folder written by `edgederm train`)")
    return json.loads(path.read_text())


def load_checkpoint(directory: str | os.PathLike[str]) -> tuple[Any, dict[str, Any]]:
    """Rebuild the model named in config.json and load its weights strictly."""
    from safetensors.torch import load_file

    from edgederm.models import create_model

    config = read_checkpoint_config(directory)
    weights = Path(directory) / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {directory} has {CONFIG} but no {WEIGHTS}")
    if not config.get("model_name"):
        raise CheckpointError(f"{directory}/{CONFIG} does not name the model (model_name)")
    kwargs = dict(config.get("model_kwargs") or {})
    model = create_model(config["model_name"], **kwargs)
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {directory} does not fit {config['model_name']}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if config.get("tiling"):
        model.tiling = dict(config["tiling"])  # export_bundle writes it into the manifest
    return model.eval(), config

"""What a run leaves in its checkpoint folder besides the model, and resuming from it.

``training_state/epoch-NNNN.safetensors`` holds the weights, the AdamW moments and
step counts and the torch RNG; ``training_state/state.json`` the epoch, scheduler
step, the numpy generator's state, optimiser hyper-parameters, history, config,
dataset fingerprint and the tensor file's sha256. The tensor file is complete before
``state.json`` points at it (temp file + rename), older tensor files are deleted
after; nothing is pickled. ``metrics.json`` / ``metrics.csv`` have one row per epoch.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgederm.runtime.bundle import sha256_file, write_bytes_atomic, write_json_atomic
from edgederm.runtime.errors import InputError
from edgederm.training.config import TrainConfig

if TYPE_CHECKING:
    from edgederm.data.labelled import LabelledImages

log = logging.getLogger(__name__)

STATE_DIR = "training_state"
STATE_JSON = "state.json"


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


def training_state_json(path: str | Path) -> tuple[Path, dict[str, Any]]:
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

    json_path, meta = training_state_json(path)
    tensor_path = json_path.parent / meta["tensors"]
    if not tensor_path.is_file() or sha256_file(tensor_path) != meta["sha256"]:
        raise InputError(f"cannot resume from {json_path}: {tensor_path.name} is missing or does not match its sha256; "
                         "the training state is damaged, restart without --resume")
    return meta, load_file(str(tensor_path))


def restore_training_state(resumed: tuple[dict[str, Any], dict[str, Any]], model: Any, optimizer: Any,
                           rng: np.random.Generator, device: Any) -> tuple[int, int, float, list[dict[str, Any]]]:
    """Load :func:`read_training_state`'s result into the run; (epoch, step, seconds, history) to continue from."""
    import torch

    meta, saved = resumed
    model.load_state_dict({k[len("model."):]: v for k, v in saved.items() if k.startswith("model.")})
    optimizer.load_state_dict(_optimizer_from_flat(saved, meta["optimizer"]))
    rng.bit_generator.state = meta["numpy_rng"]
    torch.set_rng_state(saved["rng.torch"])
    if "rng.cuda" in saved and device.type == "cuda":
        torch.cuda.set_rng_state(saved["rng.cuda"])
    return meta["epoch"], meta["step"], meta["seconds"], meta["history"]


def check_resume(meta: dict[str, Any], config: TrainConfig, data: LabelledImages) -> None:
    """Refuse to resume with options or data that would change what the run computes."""
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

"""``edgederm export-triton``: a bundle as a Triton model repository.

Written per bundle (``NAME`` is the bundle's model name):

- ``NAME/``: the whole pipeline (preprocessing, tiling, every stage, calibration,
  review) as a Python-backend model that runs the EdgeDerm runtime on a copy of
  the bundle (``NAME/1/bundle``); the same inputs and outputs as ``edgederm serve``.
- ``NAME_<stage>/``: each stage graph as an ``onnxruntime`` model, for clients
  that run tiling themselves (or a remote backend). A graph whose first axis is
  dynamic gets ``max_batch_size`` and dynamic batching, so Triton can merge
  tile batches of concurrent requests.
- ``NAME_<stage>_tensorrt_<precision>/``: each TensorRT engine the bundle holds,
  as a ``tensorrt_plan`` model (it runs only on the GPU and TensorRT it was built
  for, which the engine's ``target`` in manifest.json names).

Every config.pbtxt is a ``ModelConfig`` message written by protobuf's text format
from the protocol's published definitions, so Triton parses exactly what was
meant. Each model folder is written beside the repository and renamed into place:
an interrupted export leaves no half-written model that Triton would try to load.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from edgederm.runtime.bundle import MANIFEST, Manifest, read_manifest
from edgederm.runtime.backends.remote import safe_model_name
from edgederm.runtime.errors import InputError
from edgederm.runtime.staging import commit, make_staging

from . import protocol

DEFAULT_MAX_BATCH = 16
MODEL_TEMPLATE = Path(__file__).with_name("triton_model.py")


def config_text(config: dict[str, Any]) -> str:
    """config.pbtxt from a config dict, through model_config.proto (unknown fields are an error)."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.MessageToString(json_format.ParseDict(config, model_config_pb2.ModelConfig()))


def _engine_max_batch(entry: Mapping[str, Any]) -> int:
    profiles = entry.get("profiles") or {}
    batches = [int(p["max"][0]) for p in profiles.values() if isinstance(p, dict) and p.get("max")]
    return min(batches) if batches else DEFAULT_MAX_BATCH


def export_triton(bundle: str | os.PathLike[str], out: str | os.PathLike[str], name: str | None = None,
                  instances: int = 1, kind: str = "KIND_CPU", precision: str = "fp32", overwrite: bool = False,
                  say: Callable[[str], None] = lambda m: None) -> list[dict[str, Any]]:
    """Write the repository; returns one row per model written (name, platform, folder)."""
    if instances < 1:
        raise InputError(f"instances={instances}; expected at least 1")
    manifest = read_manifest(Path(bundle), verify=True)
    if precision not in manifest.precisions():
        raise InputError(f"bundle {manifest.root} has no {precision!r} graphs; it has {manifest.precisions()}")
    model_info = manifest.model
    pipeline = safe_model_name(name or model_info.name or "model")
    repo = Path(out)
    repo.mkdir(parents=True, exist_ok=True)
    written: list[dict[str, Any]] = []

    def write_model(model_name: str, config: dict[str, Any], files: Callable[[Path], None], platform: str) -> None:
        final = repo / model_name
        if final.exists() and not overwrite:
            raise InputError(f"{final} exists; pass --overwrite to replace it, or choose another --out")
        staging = make_staging(repo, f".{model_name}.partial-")
        try:
            (staging / "1").mkdir()
            files(staging / "1")
            (staging / "config.pbtxt").write_text(config_text(config), encoding="utf-8")
            commit(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        written.append({"model": model_name, "platform": platform, "path": str(final)})
        say(f"wrote {final} ({platform})")

    def copier(source: Path, name: str) -> Callable[[Path], None]:
        def copy(folder: Path) -> None:
            shutil.copyfile(source, folder / name)
        return copy

    stages = {s.name: s for s in manifest.stages}
    for stage in manifest.stages:
        model_name = f"{pipeline}_{stage.name}"
        write_model(model_name, protocol.stage_config(model_name, stage, instances, kind, "onnxruntime"),
                    copier(manifest.graph_path(stage, precision), "model.onnx"), "onnxruntime")
    for entry in manifest.engines:
        if entry.get("stage") not in stages:
            continue
        model_name = f"{pipeline}_{entry['stage']}_tensorrt_{entry['precision']}"
        config = protocol.stage_config(model_name, stages[entry["stage"]], instances, "KIND_GPU", "tensorrt_plan",
                                       _engine_max_batch(entry))
        write_model(model_name, config, copier(manifest.root / entry["file"], "model.plan"), "tensorrt_plan")

    def pipeline_files(folder: Path) -> None:
        shutil.copyfile(MODEL_TEMPLATE, folder / "model.py")
        _copy_bundle(manifest, folder / "bundle")

    limits = protocol.Limits()
    config = protocol.model_config(pipeline, model_info.task, model_info.modalities, model_info.class_names, limits,
                                   backend="python")
    config["parameters"]["precision"] = {"string_value": precision}
    config["instance_group"] = [{"count": instances, "kind": "KIND_CPU"}]
    write_model(pipeline, config, pipeline_files, "python")
    return written


def _copy_bundle(manifest: Manifest, dest: Path) -> None:
    """manifest.json and every file it names (the file table holds every graph); nothing else travels."""
    dest.mkdir()
    names = [MANIFEST] + sorted(manifest.files) + [str(e["file"]) for e in manifest.engines]
    for relative in dict.fromkeys(names):
        source = manifest.root / relative
        if source.is_file():
            (dest / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest / relative)


def run_cli(args: Any) -> int:
    rows = export_triton(args.bundle, args.out, name=args.name, instances=args.instances, kind=args.kind,
                         precision=args.precision, overwrite=args.overwrite,
                         say=(lambda m: None) if args.json else print)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0

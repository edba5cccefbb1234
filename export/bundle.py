"""Write a bundle from an in-memory torch model: ``export_bundle(model, out_dir)``.

All-or-nothing: graphs and the manifest are written into a hidden staging folder
next to ``out_dir`` and the folder is renamed into place only after every stage has
exported and passed its parity check. An interrupted export leaves no bundle that
loads (at most a ``.<name>.partial-*`` folder, removed by the next export once its
writer is gone: runtime/staging.py).
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from torch import nn

import edgederm
from edgederm.models.base import EdgeDermModel
from edgederm.runtime.bundle import (DEFAULT_BLEND, DEFAULT_OVERLAP, DEFAULT_TILE_BATCH, FORMAT, FORMAT_VERSION, MANIFEST,
                                     Manifest, parse_manifest, sha256_file, write_manifest)
from edgederm.runtime.preprocess import PreprocessConfig
from edgederm.runtime.staging import commit, make_staging
from edgederm.runtime.targets import load_target

from .onnx import DEFAULT_OPSET, ExportError, ParityReport, check_parity, export_stage_onnx
from .target_forms import rewrite_file_for_target
from .failures import explain_export_failure
from .wrap import as_edgederm_model

log = logging.getLogger(__name__)


def default_preprocess(model: EdgeDermModel) -> PreprocessConfig:
    """The model's own preprocessing when it carries one (a wrapped timm model's
    pretrained_cfg), else resize to its input size with mean/std 0.5 (HiFuse's recipe)."""
    own = getattr(model, "preprocess", None)
    if isinstance(own, PreprocessConfig):
        return own
    return PreprocessConfig(input_size=tuple(model.input_size))  # type: ignore[arg-type]


def _tensor_spec(name: str, shape: tuple[int, ...], dtype: str, dynamic: dict[int, str]) -> dict[str, Any]:
    return {"name": name, "shape": [dynamic.get(i, d) for i, d in enumerate(shape)], "dtype": dtype}


def file_table(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every regular file in the bundle except the manifest."""
    table = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST and not path.name.startswith("."):
            rel = path.relative_to(root).as_posix()
            table[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return table


def export_bundle(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    preprocess: PreprocessConfig | None = None,
    clinical: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    rtol: float = 1e-4,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    profile_memory: bool = True,
    target: str | None = None,
    task: str | None = None,
    input_size: int | tuple[int, int] | None = None,
    class_names: list[str] | None = None,
    modalities: tuple[str, ...] | None = None,
    metadata_schema: dict[str, Any] | None = None,
    output: str | None = None,
    output_key: str | int | None = None,
) -> Path:
    """Export every stage of ``model`` to ONNX and write a verified bundle to ``out_dir``.

    ``verify`` runs ONNX Runtime against torch at batch 1 and 5 for each stage and
    refuses (ExportError) a graph whose relative error exceeds ``rtol``.
    ``profile_memory`` (default True) measures the memory line (fixed + per-tile slope)
    of the profiled stage (tiles, windows, or a classifier's whole images) in
    subprocesses (export/memory_profile.py) and stores it as the manifest's "memory",
    so a memory budget can be planned for every bundle; False leaves it out.
    ``target`` (a profile name, edgederm.runtime.targets) rewrites each graph into the
    forms that target's TensorRT parser takes (export/target_forms.py) before the parity
    check, and records the target in the manifest; `edgederm lint` checks the result.

    ``model`` is an EdgeDerm model, or any ``nn.Module`` together with ``task``,
    ``input_size`` and ``class_names`` (and optionally ``modalities``,
    ``metadata_schema``, ``output``, ``output_key``): it is then wrapped as one stage
    (export/wrap.py).
    """
    model = as_edgederm_model(model, task=task, input_size=input_size, class_names=class_names,
                              modalities=modalities, metadata_schema=metadata_schema, output=output,
                              output_key=output_key)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda msg: log.info(msg))
    profile = load_target(target) if target is not None else None
    target_forms: dict[str, dict[str, Any]] = {}
    model = model.eval()
    staging = make_staging(out.parent, f".{out.name}.partial-")
    try:
        stages_json = []
        parity: dict[str, dict] = {}
        for stage in model.export_stages():
            say(f"exporting stage {stage.name} (opset {opset})")
            try:
                path = export_stage_onnx(stage, staging / f"{stage.name}.fp32.onnx", opset=opset)
            except ExportError as exc:
                typed = explain_export_failure(stage.name, exc.__cause__) if exc.__cause__ is not None else None
                if typed is None:
                    raise
                raise typed from exc.__cause__
            if profile is not None:
                forms = rewrite_file_for_target(path, profile)
                target_forms[stage.name] = forms.to_dict()
                say(f"  for {profile.name}: opset {forms.opset}, " + (", ".join(f"{n} x {k}" for k, n in forms.rewrites.items()) or "no rewrites"))
            if verify:
                report: ParityReport = check_parity(stage, path, rtol=rtol)
                say(f"  parity vs torch: max rel diff {report.max_rel_diff:.2e} (batch {report.batch_sizes}, rtol {rtol:g})")
                if not report.passed:
                    raise ExportError(
                        f"stage {stage.name!r}: ONNX Runtime differs from torch by {report.max_rel_diff:.3e} relative "
                        f"(limit {rtol:g}); the graph was not bundled"
                    )
                parity[stage.name] = report.to_dict()
            example = stage.module(*stage.inputs.values())
            outs = [example] if not isinstance(example, (tuple, list)) else list(example)
            stages_json.append({
                "name": stage.name,
                "inputs": [
                    _tensor_spec(n, tuple(t.shape), str(t.dtype).replace("torch.", ""), stage.dynamic_axes.get(n, {}))
                    | {"source": stage.sources[n]}
                    for n, t in stage.inputs.items()
                ],
                "outputs": [_tensor_spec(n, tuple(o.shape), "float32", {0: "batch"}) for n, o in zip(stage.outputs, outs)],
                "graphs": {"fp32": {"file": path.relative_to(staging).as_posix()}},  # sha256: from files below
            })
        model_section = {
            "name": getattr(model, "model_name", type(model).__name__),
            "architecture": type(model).__name__,
            "kwargs": _jsonable(getattr(model, "model_kwargs", {})),
            "task": model.task,
            "modalities": list(model.modalities),
            "class_names": list(model.class_names),
            "input_size": list(model.input_size),
            "metadata_schema": getattr(model, "metadata_schema", None),
        }
        finish_bundle(staging, out, model=model_section, preprocess=preprocess or default_preprocess(model),
                      stages=stages_json,
                      export={"exporter": "torch.onnx dynamo",
                              "opset": min((f["opset"] for f in target_forms.values()), default=opset),
                              "torch": _torch_version(), "parity": parity},
                      tiling=tiling_section(model), clinical=clinical, profile_memory=profile_memory, say=say,
                      extra={"target": None if profile is None else {
                          "name": profile.name, "tensorrt": profile.tensorrt, "max_opset": profile.max_opset,
                          "stages": target_forms}, **(extra or {})})
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"bundle written to {out}")
    return out


def finish_bundle(staging: Path, out: Path, *, model: dict[str, Any], preprocess: PreprocessConfig,
                  stages: list[dict[str, Any]], export: dict[str, Any], tiling: dict[str, Any] | None,
                  clinical: dict[str, Any] | None, extra: dict[str, Any] | None, profile_memory: bool,
                  say: Callable[[str], None]) -> None:
    """Hash the staged graphs, measure memory, write the manifest and move ``staging`` to ``out``.

    The one place a new bundle's manifest is put together (``export_bundle`` and
    ``edgederm import``); each stage's ``graphs.fp32.file`` must already be in ``staging``.
    """
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sdk_version": edgederm.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "preprocess": preprocess.to_dict(),
        "stages": stages,
        "export": export,
        "tiling": tiling,
        "memory": None,
        "calibration": None,
        "clinical": {"temperature": 1.0, "review_threshold": 0.5, "review_classes": [], **(clinical or {})},
        **(extra or {}),
        "files": file_table(staging),
    }
    for entry in stages:  # each graph hashed once, by file_table
        graph = entry["graphs"]["fp32"]
        graph["sha256"] = manifest["files"][graph["file"]]["sha256"]
    if profile_memory:
        from .memory_profile import measure_memory_profile

        manifest["memory"] = measure_memory_profile(parse_manifest(manifest, staging), say=say)
    if tiling is not None and "batch_size" not in tiling:
        tiling["batch_size"] = default_tile_batch(parse_manifest(manifest, staging))
    write_manifest(staging, manifest)
    commit(staging, out)


def tiling_section(model: nn.Module) -> dict[str, Any] | None:
    """The manifest's "tiling": the model's own ``tiling`` dict, plus defaults.

    Segmenters: tile = the input size, overlap 0.25, gaussian blending. Models with a
    ``window_size`` (hierarchical window -> region classifiers): the window side and
    the window grid (rows, cols) the region stage was exported for.
    """
    tiling = dict(getattr(model, "tiling", None) or {})
    if getattr(model, "task", None) == "segment":
        tiling.setdefault("tile", int(model.input_size[0]))  # type: ignore[union-attr, index]
        tiling.setdefault("overlap", DEFAULT_OVERLAP)
        tiling.setdefault("blend", DEFAULT_BLEND)
    window = getattr(model, "window_size", None)
    if isinstance(window, int):
        tiling.setdefault("window", window)
        tiling.setdefault("grid", [int(v) for v in getattr(model, "window_grid")])
    return tiling or None


EXPORT_PLAN_BUDGET = "1.5GiB"  # the smallest Jetson's share for one app: the default batch fits it
EXPORT_PLAN_SIDE = 2048
EXPORT_MAX_BATCH = 16


def default_tile_batch(bundle: Manifest) -> int:
    """Tile batch the planner picks for a 2048^2 image under 1.5 GiB (an Orin Nano's
    share); the runtime's batch when no memory_budget is given. Without a measured
    profile: :data:`DEFAULT_TILE_BATCH`."""
    from edgederm.runtime.errors import MemoryBudgetError
    from edgederm.runtime.memory import parse_size, plan

    if bundle.memory is None:
        return DEFAULT_TILE_BATCH
    try:
        return plan(bundle, parse_size(EXPORT_PLAN_BUDGET), EXPORT_PLAN_SIDE, EXPORT_PLAN_SIDE,
                    max_batch=EXPORT_MAX_BATCH).batch_size
    except MemoryBudgetError:
        return 1


def _torch_version() -> str:
    import torch

    return torch.__version__


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def model_from_checkpoint_or_name(source: str) -> tuple[EdgeDermModel, PreprocessConfig | None, dict[str, Any] | None]:
    """A checkpoint folder (trained weights) or a registered name (random weights)."""
    from edgederm.checkpoint import load_checkpoint
    from edgederm.models import create_model

    if Path(source).is_dir():
        model, config = load_checkpoint(source)
        preprocess = PreprocessConfig.from_dict(config["preprocess"]) if config.get("preprocess") else None
        return model, preprocess, config.get("clinical")
    log.warning("%s is not a checkpoint folder; exporting registered model %r with random weights", source, source)
    return create_model(source), None, None

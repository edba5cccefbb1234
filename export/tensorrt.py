"""TensorRT engines from a bundle's ONNX graphs: ``build_engines(bundle, precision="fp16"|"int8")``.

One engine per stage, recorded in the manifest with what it is bound to (GPU name,
compute capability, SM count, TensorRT version), its precision, its optimisation
profile and its sha256. Decisions (``docs/architecture.md``):

- One code path for TensorRT 8.5+ and 10.x: the ONNX parser, ``set_memory_pool_limit``,
  optimisation profiles and the tensor-name API exist in both; version-specific
  knobs are probed with ``hasattr``. ``EXPLICIT_BATCH`` is set on 8.x only (10.x
  networks are always explicit-batch), ``STRONGLY_TYPED`` is offered on 10.x only.
- INT8 is explicit quantization from the bundle's QDQ graph (``graphs["int8"]``,
  written by `edgederm quantize`): implicit calibrators are deprecated in 10.1 and
  removed in 11. For TensorRT 8.5 targets without a QDQ graph, a calibration cache
  (calibration/trt_cache.py) drives implicit calibration from the fp32 graph. INT8
  builds also set FP16, so layers left out of INT8 (LayerNorm, Softmax, GELU) run in
  fp16 rather than fp32 unless the network is strongly typed.
- FP16 builds parse the fp32 graph and set the FP16 flag: TensorRT keeps fp32 IO and
  chooses per layer. A strongly typed fp16 build uses the bundle's fp16 graph.
- Profiles: batch min 1, opt = max = the tile batch the memory plan needs (the
  runtime never sends more; a larger max only costs activation memory on a 4 GB
  device). Non-batch dimensions must be static.
- Memory: the WORKSPACE pool and, on 8.6+, TACTIC_DRAM are limited from the budget;
  cuBLAS/cuBLASLt/cuDNN tactic sources are disabled on 8.x (their handles cost up
  to ~500 MB on Jetson); ``max_aux_streams = 0`` (aux streams keep activation
  blocks alive).
- Timing cache persisted per TensorRT version and device (file name holds both), so
  a rebuild on the same device skips most tactic timing.
- The build runs in a child process (``python -m edgederm.export.tensorrt --job``):
  the OOM killer takes the builder, not the app that asked for it. The engine is
  written under a temporary name and renamed; the manifest is replaced atomically.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from edgederm.runtime.backends.cuda import DeviceInfo, query_device
from edgederm.runtime.backends.engines import ENGINE_PRECISIONS, engine_cache_key, version_tuple
from edgederm.runtime.backends.tensorrt import trt
from edgederm.runtime.bundle import (MANIFEST, Manifest, Stage, read_manifest, resolve_inside, sha256_file,
                                     write_bytes_atomic, write_manifest)
from edgederm.runtime.memory import parse_size, plan
from edgederm.runtime.optional import import_tensorrt
from edgederm.runtime.errors import BundleError, EdgeDermError, InputError, MissingDependencyError
from edgederm.runtime.optional import INSTALL_HINTS

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE = 1 << 30  # 1 GiB without a budget
MIN_WORKSPACE = 32 << 20
ENGINE_DIR = "engines"


class EngineBuildError(EdgeDermError):
    """TensorRT could not build an engine (parser error, out of memory, killed)."""


# -- pure planning (no TensorRT) --------------------------------------------------------------------
def require_tensorrt() -> None:
    """Raise the install hint when TensorRT is missing, without importing it into this process."""
    spec = importlib.util.find_spec("tensorrt")
    # A namespace package (origin None) is what type stubs alone leave behind.
    if spec is None or spec.origin in (None, "namespace"):
        raise MissingDependencyError(
            f"TensorRT is not installed (needed for `edgederm build`). Fix: {INSTALL_HINTS['tensorrt']}. "
            "Without it, the bundle's ONNX graphs run on ONNX Runtime (CPU, CUDA or its TensorRT provider)"
        )


def memory_limits(memory_budget: int | str | None, workspace: int | str | None) -> tuple[int, int | None]:
    """``(workspace_bytes, tactic_dram_bytes)`` from a budget.

    Without a budget: 1 GiB workspace, TensorRT's default tactic memory. With one:
    workspace = budget / 4 (at least 32 MiB, at most 1 GiB) and tactic memory =
    budget / 2, because the builder, its CUDA context and the network's weights
    must fit in the rest on a device whose CPU and GPU share DRAM.
    """
    budget = parse_size(memory_budget) if memory_budget is not None else None
    explicit = parse_size(workspace) if workspace is not None else None
    if budget is None:
        return explicit or DEFAULT_WORKSPACE, None
    ws = explicit or max(MIN_WORKSPACE, min(DEFAULT_WORKSPACE, budget // 4))
    if ws >= budget:
        raise InputError(f"workspace {ws} bytes does not fit the memory budget {budget} bytes; "
                         "pass a smaller --workspace or a larger --memory-budget")
    return ws, budget // 2


def planned_batch(manifest: Manifest, stage: Stage, memory_budget: int | str | None = None,
                  image_size: int = 2048) -> tuple[int, str]:
    """The tile batch the runtime will send ``stage``, and where the number came from.

    The tiled stage under ``memory_budget``: the runtime's own plan
    (``runtime.memory.plan``, from the profile measured at export) for an
    ``image_size`` square image; a budget it cannot meet is refused
    (MemoryBudgetError). Otherwise the bundle's ``tiling.batch_size``.
    """
    tiled = manifest.tiled_stage
    if memory_budget is not None and manifest.memory is not None and tiled is not None and tiled.name == stage.name:
        batch = plan(manifest, parse_size(memory_budget), image_size, image_size).batch_size
        return batch, f"memory plan for {memory_budget} at {image_size}x{image_size}"
    return manifest.tiling.batch_size, "bundle tiling.batch_size"


def stage_profiles(stage: Stage, batch: int) -> dict[str, dict[str, list[int]]]:
    """min/opt/max shapes per input: batch 1..``batch``, other dimensions from the manifest (must be static)."""
    profiles = {}
    for spec in stage.inputs:
        rest = spec.static(1)
        if rest is None:
            raise BundleError(
                f"stage {stage.name!r} input {spec.name!r} has shape {list(spec.shape)}; TensorRT profiles need every "
                "dimension but the batch to be static. Re-export with fixed input sizes"
            )
        profiles[spec.name] = {"min": [1, *rest], "opt": [batch, *rest], "max": [batch, *rest]}
    return profiles


def timing_cache_path(cache_dir: str | os.PathLike[str] | None, device: DeviceInfo) -> Path:
    """``<dir>/timing-trt<version>-<gpu>-sm<cc>x<count>.cache``: one per TensorRT version and device."""
    if cache_dir is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        cache_dir = os.path.join(base, "edgederm", "tensorrt")
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", device.gpu_name).strip("-").lower() or "gpu"
    version = ".".join(str(v) for v in version_tuple(device.tensorrt_version))
    return Path(cache_dir) / f"timing-trt{version}-{gpu}-sm{device.compute_capability}x{device.sm_count}.cache"


def _graph_for(manifest: Manifest, stage: Stage, precision: str, calibration_cache: str | None,
               strongly_typed: bool) -> tuple[Path, str]:
    graphs = stage.graphs
    if precision == "fp16":
        if strongly_typed:
            if "fp16" not in graphs:
                raise BundleError(f"a strongly typed fp16 engine needs the stage's fp16 graph; stage {stage.name!r} "
                                  f"has {sorted(graphs)}. Fix: `edgederm quantize {manifest.root} --precision fp16`")
            return manifest.graph_path(stage, "fp16"), "none (fp16 graph, strongly typed)"
        return manifest.graph_path(stage, "fp32"), "none (fp16 flag)"
    if "int8" in graphs and calibration_cache is None:
        return manifest.graph_path(stage, "int8"), "explicit (QDQ graph)"
    if calibration_cache is not None:
        if strongly_typed:
            raise InputError("a calibration cache (implicit INT8) cannot be combined with a strongly typed network")
        return manifest.graph_path(stage, "fp32"), "implicit (calibration cache)"
    raise BundleError(
        f"stage {stage.name!r} has no int8 (QDQ) graph (has {sorted(graphs)}); TensorRT INT8 needs one. "
        f"Fix: `edgederm quantize {manifest.root} --calib DIR --precision int8`, or pass a TensorRT 8.5 "
        "calibration cache (--calibration-cache) for implicit calibration"
    )


# -- the build (runs in the child process) --------------------------------------------------------
def build_engine_file(job: Mapping[str, Any], say: Callable[[str], None] = print) -> dict[str, Any]:
    """Build one engine as ``job`` describes and write it to ``job["engine_path"]``; returns facts for the manifest.

    Imports TensorRT; normally runs in a child process (see :func:`build_engines`).
    """
    import_tensorrt("`edgederm build`")
    device = query_device(tensorrt_version=str(trt.__version__))
    major = version_tuple(trt.__version__)[0]
    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if major < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if job["strongly_typed"]:
        if major < 10 or not hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            raise EngineBuildError(f"strongly typed networks need TensorRT 10; this is {trt.__version__}")
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    say(f"  parsing {Path(job['onnx_path']).name}")
    if not parser.parse_from_file(str(job["onnx_path"])):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(
            f"TensorRT {trt.__version__} could not parse {job['onnx_path']}: {' | '.join(errors) or 'no details'}. "
            "TensorRT 8.5 has no LayerNormalization: export with `--opset 16`/`17` for JetPack 5 targets"
        )
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(names) != sorted(job["profiles"]):
        raise EngineBuildError(f"graph inputs {names} do not match the manifest's {sorted(job['profiles'])}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(job["workspace_bytes"]))
    if job.get("tactic_dram_bytes") and hasattr(trt.MemoryPoolType, "TACTIC_DRAM"):  # 8.6+
        config.set_memory_pool_limit(trt.MemoryPoolType.TACTIC_DRAM, int(job["tactic_dram_bytes"]))
    if major < 10:
        # cuBLAS/cuBLASLt/cuDNN handles cost up to ~500 MB at run time on 8.5/8.6.
        sources = config.get_tactic_sources()
        for name in ("CUBLAS", "CUBLAS_LT", "CUDNN"):
            if hasattr(trt.TacticSource, name):
                sources &= ~(1 << int(getattr(trt.TacticSource, name)))
        config.set_tactic_sources(sources)
    if hasattr(config, "max_aux_streams"):  # 8.6+
        config.max_aux_streams = 0
    precision = job["precision"]
    if not job["strongly_typed"]:
        if not builder.platform_has_fast_fp16:
            say(f"  note: {device.gpu_name} has no fast fp16; the engine may be slower than expected")
        config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    if job.get("calibration_cache"):
        from edgederm.calibration.trt_cache import make_entropy_calibrator

        config.int8_calibrator = make_entropy_calibrator(job["calibration_cache"])
    if job.get("dla") is not None:
        dla = int(job["dla"])
        if dla >= builder.num_DLA_cores:
            raise EngineBuildError(f"DLA core {dla} requested; this device has {builder.num_DLA_cores} "
                                   "(Orin NX: 1-2, AGX Orin: 2, Orin Nano: none). Drop --dla")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers DLA cannot run stay on the GPU

    profile = builder.create_optimization_profile()
    for name, shapes in job["profiles"].items():
        profile.set_shape(name, trt.Dims(shapes["min"]), trt.Dims(shapes["opt"]), trt.Dims(shapes["max"]))
    config.add_optimization_profile(profile)

    cache_path = timing_cache_path(job.get("timing_cache_dir"), device)
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    timing_cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(timing_cache, False)

    say(f"  building {precision} engine for {device.gpu_name} (TensorRT {trt.__version__}, "
        f"workspace {int(job['workspace_bytes']) >> 20} MiB); this takes minutes")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(
            f"TensorRT could not build the {precision} engine for {job['onnx_path']} (see the log above); "
            "on a 4 GB device try a smaller --workspace or --memory-budget, or build with fewer apps running"
        )
    write_bytes_atomic(Path(job["engine_path"]), memoryview(plan))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(cache_path, memoryview(config.get_timing_cache().serialize()))

    # Activation memory at the largest profile, for the runtime's memory planner.
    engine = trt.Runtime(logger).deserialize_cuda_engine(memoryview(plan))
    activation = None
    if engine is not None:
        activation = int(engine.device_memory_size_v2 if hasattr(engine, "device_memory_size_v2")
                         else engine.device_memory_size)
    return {
        "target": {
            "gpu_name": device.gpu_name, "compute_capability": device.compute_capability,
            "sm_count": device.sm_count, "tensorrt_version": str(trt.__version__), "integrated": device.integrated,
        },
        "activation_bytes": activation,
        "timing_cache": str(cache_path),
        "build_seconds": round(time.perf_counter() - started, 1),
    }


# -- the parent: plan, spawn, record ---------------------------------------------------------------
def _run_child(job: dict[str, Any], isolate: bool, say: Callable[[str], None], timeout: float | None) -> dict[str, Any]:
    if not isolate:
        return build_engine_file(job, say)
    with tempfile.TemporaryDirectory(prefix="edgederm-build-") as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job))
        cmd = [sys.executable, "-m", "edgederm.export.tensorrt", "--job", str(job_path), "--result", str(result_path)]
        try:
            proc = subprocess.run(cmd, timeout=timeout)  # stdout/stderr pass through: progress and TensorRT's log
        except subprocess.TimeoutExpired as exc:
            raise EngineBuildError(f"engine build for stage {job['stage']!r} ran past {timeout} s and was stopped") from exc
        result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        raise EngineBuildError(
            f"the engine builder for stage {job['stage']!r} was killed by {sig}"
            + (" (out of memory?)" if sig == "SIGKILL" else "")
            + "; this process is unaffected. Fix: lower --workspace / --memory-budget or close other apps"
        )
    if proc.returncode != 0 or "error" in result:
        raise EngineBuildError(f"engine build for stage {job['stage']!r} failed: {result.get('error', f'exit {proc.returncode}')}")
    return result


def build_engines(
    bundle: str | os.PathLike[str],
    precision: str = "fp16",
    workspace: int | str | None = None,
    dla: int | None = None,
    timing_cache: str | os.PathLike[str] | None = None,
    memory_budget: int | str | None = None,
    *,
    calibration_cache: str | os.PathLike[str] | None = None,
    strongly_typed: bool = False,
    batch: int | None = None,
    isolate: bool = True,
    timeout: float | None = None,
    say: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Build a TensorRT engine per stage of ``bundle`` on this machine's GPU and record them in the manifest.

    ``workspace``/``memory_budget``: bytes or sizes like ``"512MiB"``; ``dla``: DLA core
    (Orin NX/AGX); ``timing_cache``: folder for timing caches (default
    ``~/.cache/edgederm/tensorrt``); ``calibration_cache``: TensorRT 8.5 implicit INT8
    from the fp32 graph instead of the QDQ graph; ``batch``: override the planned
    tile batch; ``isolate``: build in a child process (default). Returns the new
    manifest entries.
    """
    if precision not in ENGINE_PRECISIONS:
        raise InputError(f"engine precision {precision!r} is not supported; choose one of {', '.join(ENGINE_PRECISIONS)}")
    if dla is not None and (not isinstance(dla, int) or dla < 0):
        raise InputError(f"--dla {dla!r} must be a DLA core number (0 or 1)")
    if batch is not None and (not isinstance(batch, int) or batch < 1):
        raise InputError(f"batch {batch!r} must be a positive integer")
    manifest = read_manifest(bundle)
    workspace_bytes, tactic_bytes = memory_limits(memory_budget, workspace)
    cache_file = str(Path(calibration_cache).resolve()) if calibration_cache is not None else None
    if cache_file is not None and not Path(cache_file).is_file():
        raise InputError(f"calibration cache {calibration_cache!s} does not exist; write one with "
                         "edgederm.calibration.trt_cache.calibration_cache_from_onnx")
    plans = []
    for stage in manifest.stages:  # everything checkable is checked before TensorRT is needed
        onnx_path, quantization = _graph_for(manifest, stage, precision, cache_file, strongly_typed)
        stage_batch, batch_source = (batch, "requested") if batch else planned_batch(manifest, stage, memory_budget)
        plans.append((stage, onnx_path, quantization, stage_batch, batch_source, stage_profiles(stage, stage_batch)))
    require_tensorrt()

    root = manifest.root
    (root / ENGINE_DIR).mkdir(exist_ok=True)
    entries = []
    for stage, onnx_path, quantization, stage_batch, batch_source, profiles in plans:
        say(f"stage {stage.name}: {precision}, quantization {quantization}, tile batch {stage_batch} ({batch_source})")
        staged = root / ENGINE_DIR / f".{stage.name}.{precision}.{os.getpid()}.building"
        job = {
            "stage": stage.name, "precision": precision, "onnx_path": str(onnx_path), "engine_path": str(staged),
            "profiles": profiles, "workspace_bytes": workspace_bytes, "tactic_dram_bytes": tactic_bytes,
            "dla": dla, "timing_cache_dir": str(timing_cache) if timing_cache is not None else None,
            "calibration_cache": cache_file, "strongly_typed": strongly_typed,
        }
        try:
            result = _run_child(job, isolate, say, timeout)
            target = result["target"]
            onnx_sha = sha256_file(onnx_path)
            key = engine_cache_key(onnx_sha, target["tensorrt_version"], target["gpu_name"], target["sm_count"],
                                   precision, profiles, target["compute_capability"])
            name = f"{ENGINE_DIR}/{stage.name}.{precision}.{key[:12]}.engine"
            os.replace(staged, root / name)
        finally:
            staged.unlink(missing_ok=True)
        entry = {
            "stage": stage.name, "precision": precision, "file": name, "sha256": sha256_file(root / name),
            "bytes": (root / name).stat().st_size, "cache_key": key,
            "onnx": {"file": onnx_path.relative_to(root.resolve()).as_posix() if onnx_path.is_relative_to(root.resolve())
                     else onnx_path.name, "sha256": onnx_sha},
            "quantization": quantization, "strongly_typed": strongly_typed,
            "target": target, "profiles": profiles, "batch_source": batch_source,
            "workspace_bytes": workspace_bytes, "tactic_dram_bytes": tactic_bytes, "dla_core": dla,
            "activation_bytes": result.get("activation_bytes"), "build_seconds": result.get("build_seconds"),
            "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        _record_engine(root, entry)
        say(f"  wrote {name} ({entry['bytes'] / 2**20:.1f} MiB, {result.get('build_seconds')} s)")
        entries.append(entry)
    return entries


def _record_engine(root: Path, entry: dict[str, Any]) -> None:
    """Add ``entry`` to the manifest in one atomic replace; an engine for the same stage, precision and target is superseded."""
    path = root / MANIFEST
    data = json.loads(path.read_text(encoding="utf-8"))
    same = ("stage", "precision")
    engines, dropped = [], []
    for old in data.get("engines") or []:
        if all(old.get(k) == entry[k] for k in same) and old.get("target") == entry["target"]:
            dropped.append(old["file"])
        else:
            engines.append(old)
    engines.append(entry)
    data["engines"] = engines
    data.setdefault("files", {})[entry["file"]] = {"sha256": entry["sha256"], "bytes": entry["bytes"]}
    for name in dropped:
        if name != entry["file"]:
            data["files"].pop(name, None)
    write_manifest(root, data)
    for name in dropped:  # unreferenced now; removed after the manifest moved on
        if name != entry["file"]:
            resolve_inside(root, name).unlink(missing_ok=True)


# -- child entry point ---------------------------------------------------------------------------------
def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build one TensorRT engine (child process of `edgederm build`).")
    parser.add_argument("--job", required=True, type=Path)
    parser.add_argument("--result", required=True, type=Path)
    args = parser.parse_args(argv)
    job = json.loads(args.job.read_text())
    try:
        result = build_engine_file(job, say=lambda m: print(m, file=sys.stderr, flush=True))
    except EdgeDermError as exc:
        args.result.write_text(json.dumps({"error": str(exc)}))
        return 1
    args.result.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main())

"""``edgederm bench --all-models``: every zoo model end to end, the SDK against PyTorch, in one run.

Per model (default: one paper-size variant per family, :data:`DEFAULT_MODELS`):

* Seeded weights: the registered model built after ``torch.manual_seed(seed)``, saved
  as a checkpoint (edgederm.checkpoint), exported from that checkpoint as
  ``edgederm export`` does, then quantized by the SDK's own ``quantize`` to static
  ``int8`` and ``int8_dynamic`` on a small seeded synthetic calibration set
  (``--calib-images``, default 4 images of 512 px plus 2 held out for the fidelity
  report: small for time; INT8 ranges from so few images are less stable than from
  the 32+ ``quantize`` recommends, and the output says so). Everything is cached
  under ``--work`` and reused when its stamp (model, seed, SDK and calibration
  settings) matches, so a re-run measures without rebuilding.
* Input: a dermoscopy JPEG (2048x2048 for the tiled segmenters and the windowed
  models, the model's own input size for single-image classifiers; ``--size``
  overrides), plus a 512x512 clinical JPEG and metadata for models that take them.
* Engines: ``edgederm:<precision>`` for each precision the bundle holds
  (``predict_file``: decode, preprocessing, tiles/windows, every stage, review), and
  the PyTorch peers ``torch:fp32`` (eager), ``torch:bf16`` (eager under
  ``torch.autocast("cpu", bfloat16)``) and ``torch:compile`` (``torch.compile`` of each
  stage module, inductor), which run the very same runtime pipeline with PyTorch as the
  stage predictor (``DeployedModel(stage_backends=...)`` with
  :class:`edgederm.bench.TorchStageBackend`): only what runs the stages differs. A peer
  that fails to build (torch.compile without a C++ toolchain, say) is recorded with the
  reason and the run goes on.

Decisions:

* One worker process per engine, persistent for the model's rounds, so each engine's
  peak RSS (``VmHWM``) is its own. Each worker loads and runs one untimed prediction
  (its first-prediction time is reported); then the parent asks the workers for one
  timed prediction each, in turn, for ``--rounds`` rounds, rotating the order every
  round, with a short pause between engines (a finished engine's spinning threads
  must not tax the next). Latency = the median of the rounds; a load change on the
  machine then hits every engine alike.
* Same weights: before timing, each stage's torch module and the bundle's fp32 graph
  run the same input (the first stage: one real tile/window of the benchmark image;
  later stages: their export example inputs); the maximum difference is reported.
* Decisions against ``edgederm:fp32`` on the benchmark input: label agreement and the
  largest probability difference (classifiers), Dice of the masks (segmenters); the
  quantize fidelity report (agreement on its held-out images) is shown beside it.
* Peaks: :func:`edgederm.bench.matmul_peaks` at the start and at the end of the run,
  best of both per precision. Each stage's FLOPs are counted on its fp32 graph
  (``count_graph_flops``, per tile/window/image) times the units the run fed it; its
  time is the runtime's own per-stage timing; achieved / the peak of the stage's
  precision (fp32 graphs, torch fp32 and compile: fp32; int8 graphs: int8, although
  their float ops run at fp32 speed; torch bf16: bf16) is its fraction.
* Cold start (bundles only): ``load()`` + the first prediction in a fresh process with
  an empty optimised-graph cache (``EDGEDERM_CACHE``) is "cold"; the timing worker then
  starts from the cache that run filled, which is "warm". Both beside the steady state.
"""
from __future__ import annotations

import json
import math
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["ZooBenchConfig", "DEFAULT_MODELS", "run_zoo_bench", "format_zoo_report", "plot_zoo_report",
           "TORCH_ENGINES", "parse_models",
           "parse_torch_engines", "calibration_folder", "prepare_model"]

DEFAULT_MODELS = ("hifuse_t", "sgmcnet_50", "transxv2s_net", "cfformer_s", "remixformer_pp")
TORCH_ENGINES = ("torch:fp32", "torch:bf16", "torch:compile")
QUANTIZED = ("int8", "int8_dynamic")
WINDOWED_SIZE = 2048  # the dermoscopy side for tiled and windowed models
CLINICAL_SIZE = 512
PAUSE_S = 0.3  # between two engines' timed runs
TARGET_FACTOR = 0.8  # the targets' "0.8 R"


@dataclass
class ZooBenchConfig:
    work: Path
    models: Sequence[str] = DEFAULT_MODELS
    rounds: int = 3
    size: int | None = None  # dermoscopy side for every model (default: per model)
    clinical_size: int = CLINICAL_SIZE
    calib_images: int = 4
    calib_eval_images: int = 2
    calib_size: int = 512
    precisions: Sequence[str] = QUANTIZED  # added by quantize beside fp32
    torch_engines: Sequence[str] = TORCH_ENGINES
    cold_start: bool = True
    threads: int = 2
    seed: int = 0
    timeout: float = 3600.0  # per worker request
    compile_timeout: float = 900.0  # torch.compile's load + first prediction (it compiles then)
    peak_n: int = 2048
    extra: dict[str, Any] = field(default_factory=dict)


def parse_models(text: str) -> list[str]:
    """``a,b,...`` -> registered model names (InputError naming the unknown ones)."""
    from edgederm.models import list_models
    from edgederm.runtime.errors import InputError

    names = [n.strip() for n in text.split(",") if n.strip()]
    known = set(list_models())
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise InputError(f"--models {text!r}: unknown {unknown or 'empty list'}; expected registered names, e.g. "
                         f"{','.join(DEFAULT_MODELS)} (see `edgederm models --all`)")
    return names


def parse_torch_engines(text: str) -> list[str]:
    """``torch:fp32,torch:bf16,torch:compile`` (any subset), or ``none``."""
    from edgederm.runtime.errors import InputError

    if text.strip().lower() == "none":
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in TORCH_ENGINES]
    if unknown:
        raise InputError(f"--torch-engines {text!r}: unknown {unknown}; expected a subset of {','.join(TORCH_ENGINES)} "
                         "or none")
    return names


# --------------------------------------------------------------------------- artifacts


def _stamp_matches(path: Path, want: dict[str, Any]) -> bool:
    try:
        return json.loads(path.read_text()) == want
    except (OSError, ValueError):
        return False


def calibration_folder(config: ZooBenchConfig, say: Callable[[str], None]) -> Path:
    """The seeded synthetic calibration set (``generate_dataset``), made once per settings."""
    from edgederm.data.synthetic import CLASS_NAMES, generate_dataset
    from edgederm.runtime.bundle import write_json_atomic

    images = config.calib_images + config.calib_eval_images
    per_class = math.ceil(images / len(CLASS_NAMES))
    folder = config.work / f"calibration-{per_class * len(CLASS_NAMES)}x{config.calib_size}-seed{config.seed}"
    want = {"per_class": per_class, "size": config.calib_size, "seed": config.seed}
    if not _stamp_matches(folder / "stamp.json", want):
        say(f"generating {per_class * len(CLASS_NAMES)} synthetic calibration images of {config.calib_size} px")
        generate_dataset(folder, per_class, size=config.calib_size, seed=config.seed)
        write_json_atomic(folder / "stamp.json", want)
    return folder


def prepare_model(name: str, config: ZooBenchConfig, calib: Path, say: Callable[[str], None]) -> tuple[Path, Path]:
    """Seeded checkpoint -> bundle -> quantized precisions, reused when their stamps match.

    Returns (checkpoint folder, bundle folder).
    """
    import shutil

    import torch

    import edgederm
    from edgederm.calibration import quantize_bundle
    from edgederm.checkpoint import save_checkpoint
    from edgederm.export import export_bundle
    from edgederm.export.bundle import model_from_checkpoint_or_name
    from edgederm.models import create_model
    from edgederm.runtime.bundle import read_manifest, write_json_atomic

    folder = config.work / name
    checkpoint, bundle = folder / "checkpoint", folder / "bundle"
    want = {"model": name, "seed": config.seed, "edgederm": edgederm.__version__, "torch": torch.__version__}
    if not _stamp_matches(folder / "stamp.json", want) or not (bundle / "manifest.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        say(f"{name}: building with seed {config.seed}, saving the checkpoint and exporting the bundle")
        torch.manual_seed(config.seed)
        save_checkpoint(create_model(name), checkpoint, seed=config.seed)
        model, preprocess, clinical = model_from_checkpoint_or_name(str(checkpoint))
        export_bundle(model, bundle, preprocess=preprocess, clinical=clinical, progress=lambda m: say(f"  {m}"))
        del model
        write_json_atomic(folder / "stamp.json", want)
    held = read_manifest(bundle).precisions()
    for precision in config.precisions:
        quant_want = {"precision": precision, "calibration": calib.name, "images": config.calib_images,
                      "seed": config.seed}
        stamp = folder / f"quantize-{precision}.json"
        if precision in held and _stamp_matches(stamp, quant_want):
            continue
        say(f"{name}: edgederm quantize --precision {precision} on {config.calib_images} calibration images "
            f"({config.calib_size} px; few, for time)")
        t0 = time.perf_counter()
        quantize_bundle(bundle, calib, precision=precision, max_images=config.calib_images, seed=config.seed,
                        say=lambda m: say(f"  {m}"), threads=config.threads)
        say(f"  quantize {precision}: {time.perf_counter() - t0:.0f} s")
        write_json_atomic(stamp, quant_want)
    return checkpoint, bundle


def benchmark_inputs(name: str, manifest: Any, config: ZooBenchConfig) -> dict[str, Any]:
    """The dermoscopy (and clinical) JPEG files and the metadata of one model's benchmark case."""
    import cv2

    from edgederm.data.synthetic import generate_case

    staged_windows = manifest.tiling.window is not None and manifest.tiling.grid is not None
    if config.size:
        side = config.size
    elif manifest.model.task == "segment" or staged_windows:
        side = WINDOWED_SIZE
    else:
        side = max(manifest.preprocess.input_size)
    folder = config.work / "inputs"
    folder.mkdir(parents=True, exist_ok=True)

    def jpeg(seed: int, size: int) -> tuple[Path, dict[str, Any]]:
        path = folder / f"case{seed}_{size}.jpg"
        case = generate_case(seed=seed, size=min(size, 1024))
        if not path.is_file():
            picture = case.image if size == case.image.shape[0] else \
                cv2.resize(case.image, (size, size), interpolation=cv2.INTER_LINEAR)
            ok, data = cv2.imencode(".jpg", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
            if not ok:
                raise OSError(f"could not encode the benchmark image {path}")
            from edgederm.runtime.bundle import write_bytes_atomic

            write_bytes_atomic(path, data.tobytes())
        return path, dict(case.metadata)

    dermoscopy, metadata = jpeg(config.seed, side)
    out: dict[str, Any] = {"dermoscopy": str(dermoscopy), "dermoscopy_side": side, "clinical": None, "metadata": None}
    if "clinical" in manifest.model.modalities:
        out["clinical"] = str(jpeg(config.seed + 1, config.clinical_size)[0])
        out["clinical_side"] = config.clinical_size
    if "metadata" in manifest.model.modalities and manifest.model.metadata_schema is not None:
        from edgederm.runtime.metadata import load_schema

        # the generator's fields that this model's schema reads (predict refuses the others)
        out["metadata"] = load_schema(manifest.model.metadata_schema).select(metadata)
    return out


# --------------------------------------------------------------------------- same weights, FLOPs


def weights_check(checkpoint: Path, manifest: Any, inputs: dict[str, Any],
                  threads: int) -> tuple[dict[str, float], dict[str, float]]:
    """Max |torch - fp32 graph| per stage, absolute and relative to max |fp32 graph| (the
    measure of the export's parity check): the first stage on one real tile/window of the
    benchmark image, later stages on their export example inputs (batch 1)."""
    import torch

    from edgederm.checkpoint import load_checkpoint
    from edgederm.runtime import preprocess as pp
    from edgederm.runtime.backends.onnxruntime import cpu_session
    from edgederm.runtime.imageio import read_image
    from edgederm.runtime.pipeline import image_windows

    model, _ = load_checkpoint(checkpoint)
    modules = {s.name: s for s in model.export_stages(batch=1)}
    image = read_image(inputs["dermoscopy"])
    config = manifest.preprocess
    diffs: dict[str, float] = {}
    relative: dict[str, float] = {}
    for k, stage in enumerate(manifest.stages):
        export = modules[stage.name]
        feed = {n: t.numpy() for n, t in export.inputs.items()}
        if k == 0:
            first = stage.inputs[0]
            if first.source == "dermoscopy_windows":
                window, rows, cols = manifest.window_layout
                feed[first.name] = image_windows(image, config, window, rows, cols)[:1]
            elif manifest.model.task == "segment":
                tile = manifest.tile_size
                crop = np.ascontiguousarray(image[:tile, :tile])
                tile_config = config if config.input_size == (tile, tile) else \
                    __import__("dataclasses").replace(config, input_size=(tile, tile))
                feed[first.name] = pp.preprocess_batch(crop[None], tile_config, pp.image_color_stats(image, config))
            elif first.source == "dermoscopy":
                size = first.static(2)
                use = __import__("dataclasses").replace(config, input_size=tuple(size)) if size else config
                feed[first.name] = pp.preprocess(image, use)[None]
        session = cpu_session(manifest.graph_path(stage, "fp32"), threads)
        names = [i.name for i in session.get_inputs()]
        expected = session.run(None, {n: np.ascontiguousarray(feed[n], dtype=np.float32)
                                      if feed[n].dtype == np.float64 else feed[n] for n in names})
        with torch.no_grad():
            got = export.module(*(torch.from_numpy(np.asarray(feed[n])) for n in export.inputs))
        got = got if isinstance(got, (tuple, list)) else (got,)
        diffs[stage.name] = float(max(np.abs(g.float().numpy() - e).max() for g, e in zip(got, expected)))
        relative[stage.name] = diffs[stage.name] / (float(max(np.abs(e).max() for e in expected)) + 1e-12)
    return diffs, relative


def stage_flops(manifest: Any) -> dict[str, float | None]:
    """FLOPs of one unit (tile, window or image) of each stage, counted on its fp32 graph."""
    from edgederm.bench import count_graph_flops

    return {s.name: count_graph_flops(manifest.graph_path(s, "fp32")) for s in manifest.stages}


def stage_units(manifest: Any, run: dict[str, Any]) -> dict[str, int]:
    """How many units (tiles, windows, images) each stage ran in one prediction."""
    units: dict[str, int] = {}
    for stage in manifest.stages:
        if manifest.model.task == "segment":
            units[stage.name] = int(run.get("tiles", 0))
        elif any(i.source == "dermoscopy_windows" for i in stage.inputs):
            units[stage.name] = int(run.get("windows", 0))
        elif stage.name in run.get("stages_run", [stage.name]):
            units[stage.name] = 1
        else:
            units[stage.name] = 0
    return units


def stage_ms(manifest: Any, timings: dict[str, float]) -> dict[str, float]:
    """Time inside each stage's graph (ms) from a Result's timings: the backend's runs of
    the stage (``inference:<stage>``, runtime/timings.py)."""
    return {s.name: timings[f"inference:{s.name}"] for s in manifest.stages if f"inference:{s.name}" in timings}


def peak_kind(engine: str) -> str:
    """Which matmul peak an engine's stages are measured against."""
    if engine.startswith("edgederm:int8"):
        return "int8"
    if engine == "torch:bf16":
        return "bf16"
    return "fp32"


# --------------------------------------------------------------------------- workers


class Worker:
    """One engine in its own process, answering JSON requests one line at a time."""

    def __init__(self, engine: str, setup: dict[str, Any], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.engine = engine
        full_env = {**os.environ, **(env or {})}
        full_env.setdefault("OMP_NUM_THREADS", str(setup["threads"]))
        # Idle engines wait in their own processes; OpenMP threads that spin-wait there take
        # the cores from the engine being timed (measured: torch eager 30x slower on 2 cores).
        full_env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "edgederm.bench_zoo", "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True, env=full_env)
        self.setup = self.ask({"op": "setup", **setup}, timeout=setup.get("timeout", 3600.0))

    def ask(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        if self.proc.poll() is not None:
            return {"error": f"worker exited ({self.proc.returncode}): {self._tail()}"}
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {"error": f"worker exited: {self._tail()}"}
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()  # a worker past its time is stuck, or too slow to be measured here
            self.proc.wait()
            return {"error": f"no answer within {timeout:.0f} s (request {request.get('op')!r}); the worker was stopped"}
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            return {"error": f"worker exited ({self.proc.returncode}): {self._tail()}"}
        return json.loads(line)

    def _tail(self) -> str:
        self._log.flush()
        try:
            lines = [x for x in self.log_path.read_text(errors="replace").strip().splitlines() if x.strip()]
        except OSError:
            lines = []
        return " | ".join(lines[-3:]) or "no output"

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _build_model(args: dict[str, Any]) -> Any:
    """The engine's DeployedModel: the bundle's graphs, or torch running the stages."""
    engine = args["engine"]
    kind, _, variant = engine.partition(":")
    if kind == "edgederm":
        from edgederm.runtime import load

        return load(args["bundle"], precision=variant, threads=args["threads"])
    import torch

    from edgederm.bench import TorchStageBackend
    from edgederm.checkpoint import load_checkpoint
    from edgederm.runtime.bundle import read_manifest
    from edgederm.runtime.model import DeployedModel

    torch.set_num_threads(args["threads"])
    manifest = read_manifest(args["bundle"])
    model, _ = load_checkpoint(args["checkpoint"])
    modules = {s.name: s.module.eval() for s in model.export_stages(batch=1)}
    if variant == "compile":
        modules = {name: torch.compile(m) for name, m in modules.items()}
    backends = {s.name: TorchStageBackend(modules[s.name], s, bf16=variant == "bf16") for s in manifest.stages}
    return DeployedModel(manifest, precision="fp32", threads=args["threads"], stage_backends=backends)


def _predict(model: Any, args: dict[str, Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    result = model.predict_file(args["dermoscopy"], metadata=args.get("metadata"), clinical=args.get("clinical"))
    return result, time.perf_counter() - t0


def _describe(model: Any, result: Any, latency: float) -> dict[str, Any]:
    run = {k: v for k, v in model.last_run.items() if k != "logits" and not isinstance(v, np.ndarray)}
    out = {"latency_s": latency, "timings_ms": result.timings, "run": run, "label": result.label,
           "probabilities": result.probabilities}
    return out


def worker_main() -> None:
    """``python -m edgederm.bench_zoo --worker``: JSON requests on stdin, answers on stdout."""
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever a library prints goes to the log, not into the answers
    from edgederm.runtime.rss import current_rss_bytes, peak_rss_bytes

    model: Any = None
    args: dict[str, Any] = {}
    for line in sys.stdin:
        request = json.loads(line)
        op = request.get("op")
        reply: dict[str, Any]
        try:
            if op == "setup":
                args = request
                t0 = time.perf_counter()
                model = _build_model(args)
                load_s = time.perf_counter() - t0
                result, first = _predict(model, args)
                reply = {"load_s": load_s, "first_predict_s": first, "first": _describe(model, result, first),
                         "rss_after_first_bytes": current_rss_bytes(), "precision": result.precision,
                         "backend": result.backend, "cache_hits": dict(getattr(model, "cache_hits", {}) or {})}
            elif op == "predict":
                result, latency = _predict(model, args)
                reply = _describe(model, result, latency)
                if request.get("mask_out") and result.mask is not None:
                    np.save(request["mask_out"], result.mask)
                    reply["mask"] = request["mask_out"]
            elif op == "stats":
                reply = {"peak_rss_bytes": peak_rss_bytes(), "rss_bytes": current_rss_bytes()}
            elif op == "quit":
                break
            else:
                reply = {"error": f"unknown request {op!r}"}
        except Exception as exc:  # reported to the parent, which records the engine as failed
            import traceback

            traceback.print_exc()
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            reply = {"error": f"{type(exc).__name__}: {first_line[:300]}"}
        answer.write(json.dumps(reply, default=float) + "\n")
        answer.flush()


# --------------------------------------------------------------------------- driver


def _progress(say: Callable[[str], None], model: str, engine: str, k: int, rounds: int, left_s: float | None) -> None:
    eta = f", about {left_s / 60:.1f} min left for this model" if left_s is not None else ""
    say(f"  {model}: {engine} round {k}/{rounds}{eta}")


def run_zoo_bench(config: ZooBenchConfig, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Prepare, measure and summarise every model; returns the report (``--json``)."""
    from edgederm.bench import matmul_peaks
    from edgederm.runtime.cpu import this_cpu
    from edgederm.runtime.bundle import read_manifest

    say = say or (lambda m: print(m, file=sys.stderr, flush=True))
    config.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    say(f"measuring this machine's fp32, bf16 and int8 matmul peaks ({config.threads} threads) ...")
    peaks_start = matmul_peaks(config.threads, n=config.peak_n)
    calib = calibration_folder(config, say)
    report: dict[str, Any] = {
        "command": "edgederm bench --all-models", "threads": config.threads, "rounds": config.rounds,
        "seed": config.seed, "cpu_features": this_cpu().describe(),
        "calibration": {"images": config.calib_images, "held_out": config.calib_eval_images,
                        "size": config.calib_size, "note": "a small seeded synthetic set, for time; quantize "
                        "recommends 32+ images"},
        "models": [],
    }
    for name in config.models:
        t_model = time.perf_counter()
        try:
            checkpoint, bundle = prepare_model(name, config, calib, say)
        except Exception as exc:  # one model's failure must not lose the others' figures
            say(f"{name}: preparation failed: {type(exc).__name__}: {exc}")
            report["models"].append({"model": name, "error": f"preparation failed: {type(exc).__name__}: {exc}"})
            continue
        manifest = read_manifest(bundle)
        entry = _bench_model(name, checkpoint, bundle, manifest, config, say)
        entry["seconds"] = round(time.perf_counter() - t_model, 1)
        report["models"].append(entry)
    say("measuring the matmul peaks again (the best of start and end is kept) ...")
    peaks_end = matmul_peaks(config.threads, n=config.peak_n)
    report["machine_peak"] = _best_peaks(peaks_start, peaks_end)
    for entry in report["models"]:
        if "engines" in entry:
            _summarise_model(entry, report["machine_peak"])
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def _best_peaks(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"start": a, "end": b}
    for key, path in (("fp32_gflops", None), ("bf16_gflops", "bf16_path"), ("int8_gops", "int8_path")):
        pick = max((a, b), key=lambda p: p.get(key) or 0.0)
        out[key] = pick.get(key)
        if path:
            out[path] = pick.get(path)
    out["R"] = out["int8_gops"] / out["fp32_gflops"] if out["int8_gops"] and out["fp32_gflops"] else None
    return out


def _bench_model(name: str, checkpoint: Path, bundle: Path, manifest: Any, config: ZooBenchConfig,
                 say: Callable[[str], None]) -> dict[str, Any]:
    inputs = benchmark_inputs(name, manifest, config)
    entry: dict[str, Any] = {"model": name, "task": manifest.model.task, "bundle": str(bundle),
                             "checkpoint": str(checkpoint), "inputs": inputs, "stages": [s.name for s in manifest.stages],
                             "precisions": manifest.precisions(), "engines": {}, "skipped": {}}
    entry["flops_per_unit"] = stage_flops(manifest)
    say(f"{name}: same-weights check (torch vs the fp32 graph)")
    try:
        entry["weights_max_abs_diff"], entry["weights_max_rel_diff"] = weights_check(checkpoint, manifest, inputs,
                                                                                      config.threads)
    except Exception as exc:
        entry["weights_max_abs_diff"] = entry["weights_max_rel_diff"] = None
        entry["weights_check_error"] = f"{type(exc).__name__}: {exc}"
    entry["fidelity"] = {p: _fidelity(manifest, p) for p in manifest.precisions() if p != "fp32"}
    engines = [f"edgederm:{p}" for p in ["fp32", *[p for p in manifest.precisions() if p != "fp32"]]]
    engines += list(config.torch_engines)
    base = {"bundle": str(bundle), "checkpoint": str(checkpoint), "threads": config.threads,
            "dermoscopy": inputs["dermoscopy"], "clinical": inputs["clinical"], "metadata": inputs["metadata"],
            "timeout": config.timeout}
    logs = config.work / name / "logs"
    caches = Path(tempfile.mkdtemp(prefix=f"edgederm-bench-cache-{name}-", dir=config.work))
    workers: dict[str, Worker] = {}
    try:
        for engine in engines:
            env = None
            if engine.startswith("edgederm:"):
                cache = caches / engine.split(":")[1]
                env = {"EDGEDERM_CACHE": str(cache)}
                if config.cold_start:
                    say(f"{name}: {engine} cold start (fresh process, empty optimised-graph cache)")
                    cold = Worker(engine, {**base, "engine": engine}, logs / f"{engine.replace(':', '_')}.cold.log", env)
                    cold.close()
                    entry.setdefault("cold_start", {})[engine] = _start_figures(cold.setup, cache_state="empty")
            say(f"{name}: starting {engine} (load + one untimed prediction)")
            setup_timeout = config.compile_timeout if engine == "torch:compile" else config.timeout
            worker = Worker(engine, {**base, "engine": engine, "timeout": setup_timeout},
                            logs / f"{engine.replace(':', '_')}.log", env)
            if "error" in worker.setup:
                say(f"  {engine} skipped: {worker.setup['error']}")
                entry["skipped"][engine] = worker.setup["error"]
                worker.close()
                continue
            workers[engine] = worker
            if engine.startswith("edgederm:") and config.cold_start:
                entry["cold_start"][engine]["warm"] = _start_figures(worker.setup, cache_state="populated")
        times: dict[str, list[dict[str, Any]]] = {e: [] for e in workers}
        order = list(workers)
        masks = config.work / name / "masks"
        masks.mkdir(parents=True, exist_ok=True)
        for r in range(config.rounds):
            shift = r % max(1, len(order))
            for engine in order[shift:] + order[:shift]:
                if engine not in workers:
                    continue
                done = sum(len(v) for v in times.values())
                total = config.rounds * len(order)
                spent = [t["latency_s"] for v in times.values() for t in v]
                left = statistics.mean(spent) * (total - done) if spent else None
                _progress(say, name, engine, r + 1, config.rounds, left)
                request: dict[str, Any] = {"op": "predict"}
                if r == 0 and manifest.model.task == "segment":
                    request["mask_out"] = str(masks / f"{engine.replace(':', '_')}.npy")
                answer = workers[engine].ask(request, config.timeout)
                if "error" in answer:
                    say(f"  {engine} failed: {answer['error']}")
                    entry["skipped"][engine] = answer["error"]
                    workers.pop(engine).close()
                    times.pop(engine, None)
                    continue
                answer["order"] = r * 1000 + len([t for v in times.values() for t in v if t.get("round") == r])
                answer["round"] = r
                times[engine].append(answer)
                time.sleep(PAUSE_S)
        for engine, worker in workers.items():
            stats = worker.ask({"op": "stats"}, 60.0)
            entry["engines"][engine] = {"rounds": times[engine], "setup": worker.setup, **stats}
    finally:
        for worker in workers.values():
            worker.close()
        import shutil

        shutil.rmtree(caches, ignore_errors=True)
    entry["order"] = [(t["round"], e) for e, v in entry["engines"].items() for t in v["rounds"]]
    entry["order"].sort(key=lambda x: (x[0], next(t["order"] for t in entry["engines"][x[1]]["rounds"]
                                                    if t["round"] == x[0])))
    _decisions(entry, manifest)
    return entry


def _start_figures(setup: dict[str, Any], cache_state: str) -> dict[str, Any]:
    if "error" in setup:
        return {"error": setup["error"], "cache": cache_state}
    return {"cache": cache_state, "load_s": setup["load_s"], "first_predict_s": setup["first_predict_s"],
            "load_and_first_s": setup["load_s"] + setup["first_predict_s"], "cache_hits": setup.get("cache_hits")}


def _fidelity(manifest: Any, precision: str) -> dict[str, Any]:
    report = dict(manifest.calibration.get(precision, {}).get("fidelity") or {})
    keep = ("decision_agreement", "dice_mean", "dice_min", "images", "held_out")
    return {k: report[k] for k in keep if k in report}


def _decisions(entry: dict[str, Any], manifest: Any) -> None:
    """Each engine's decisions against ``edgederm:fp32`` on the benchmark input."""
    from edgederm.metrics import dice_score

    ref = entry["engines"].get("edgederm:fp32")
    if ref is None or not ref["rounds"]:
        return
    ref_first = ref["rounds"][0]
    ref_mask = np.load(ref_first["mask"]) if ref_first.get("mask") else None
    for engine, data in entry["engines"].items():
        first = data["rounds"][0] if data["rounds"] else None
        if first is None:
            continue
        if manifest.model.task == "segment":
            if ref_mask is not None and first.get("mask"):
                data["dice_vs_fp32"] = float(dice_score(ref_mask, np.load(first["mask"])))
        else:
            labels = [t["label"] for t in data["rounds"]]
            data["agreement_vs_fp32"] = float(np.mean([lbl == ref_first["label"] for lbl in labels]))
            data["max_probability_diff_vs_fp32"] = max(
                abs(first["probabilities"][k] - ref_first["probabilities"][k]) for k in ref_first["probabilities"])


def _summarise_model(entry: dict[str, Any], peak: dict[str, Any]) -> None:
    """Medians, per-stage fractions of the matching peak, and the ratios the targets read."""
    peaks = {"fp32": peak["fp32_gflops"], "bf16": peak["bf16_gflops"], "int8": peak["int8_gops"]}
    flops = entry["flops_per_unit"]
    from edgederm.runtime.bundle import read_manifest

    manifest = read_manifest(entry["bundle"], verify=False)
    for engine, data in entry["engines"].items():
        rounds = data["rounds"]
        data["latency_s"] = statistics.median(t["latency_s"] for t in rounds)
        data["latency_min_s"] = min(t["latency_s"] for t in rounds)
        data["n_rounds"] = len(rounds)
        units = stage_units(manifest, rounds[0]["run"])
        per_stage: dict[str, Any] = {}
        for stage in entry["stages"]:
            found = [stage_ms(manifest, t["timings_ms"]).get(stage) for t in rounds]
            ms_values = [v for v in found if v is not None and math.isfinite(v)]
            if not ms_values:
                continue
            ms = statistics.median(ms_values)
            row: dict[str, Any] = {"ms": ms, "units": units.get(stage, 0), "flops_per_unit": flops.get(stage)}
            kind = peak_kind(engine)
            if flops.get(stage) and units.get(stage) and ms > 0:
                row["achieved_gflops"] = flops[stage] * units[stage] / (ms / 1000) / 1e9
                row["peak"] = kind
                row["peak_gflops"] = peaks[kind]
                row["fraction_of_peak"] = row["achieved_gflops"] / peaks[kind] if peaks[kind] else None
            per_stage[stage] = row
        data["stages"] = per_stage
        overheads = {k: statistics.median(t["timings_ms"].get(k, 0.0) for t in rounds)
                     for k in ("decode", "preprocess", "color_stats", "total")}
        data["timings_median_ms"] = overheads
    engines = entry["engines"]
    sdk = {e: d["latency_s"] for e, d in engines.items() if e.startswith("edgederm:")}
    torch_lat = {e: d["latency_s"] for e, d in engines.items() if e.startswith("torch:")}
    R = peak.get("R")
    ratios: dict[str, Any] = {"R": R, "target_0.8R": TARGET_FACTOR * R if R else None}
    if sdk:
        best = min(sdk, key=lambda e: sdk[e])
        ratios["sdk_fastest"] = best
        if "torch:fp32" in torch_lat:
            ratios["sdk_fastest_vs_torch_fp32"] = torch_lat["torch:fp32"] / sdk[best]
        if torch_lat:
            fastest_torch = min(torch_lat, key=lambda e: torch_lat[e])
            ratios["torch_fastest"] = fastest_torch
            ratios["sdk_fastest_vs_torch_fastest"] = torch_lat[fastest_torch] / sdk[best]
        int8 = {e: v for e, v in sdk.items() if e.split(":")[1] in QUANTIZED}
        if int8 and "edgederm:fp32" in sdk:
            best_int8 = min(int8, key=lambda e: int8[e])
            ratios["best_int8"] = best_int8
            ratios["best_int8_vs_fp32_graph"] = sdk["edgederm:fp32"] / int8[best_int8]
            fp32_stage = sum(s["ms"] for s in engines["edgederm:fp32"]["stages"].values())
            int8_stage = sum(s["ms"] for s in engines[best_int8]["stages"].values())
            ratios["best_int8_vs_fp32_graph_stages_only"] = fp32_stage / int8_stage if int8_stage else None
    for engine, cold in (entry.get("cold_start") or {}).items():
        steady = engines.get(engine, {}).get("latency_s")
        if steady and "load_and_first_s" in cold:
            cold["cold_over_steady"] = cold["load_and_first_s"] / steady
            warm = cold.get("warm") or {}
            if "load_and_first_s" in warm:
                warm["warm_over_steady"] = warm["load_and_first_s"] / steady
    entry["ratios"] = ratios


# --------------------------------------------------------------------------- output


def _f(value: Any, fmt: str = ".2f") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def format_zoo_report(report: dict[str, Any]) -> str:
    peak = report["machine_peak"]
    lines = [
        f"edgederm bench --all-models: {report['threads']} threads, {report['rounds']} rounds (median), "
        f"round robin, one process per engine",
        f"CPU features: {report.get('cpu_features')}",
        f"matmul peaks (best of start/end, n={peak['start']['n']}): fp32 {_f(peak['fp32_gflops'], '.0f')} GFLOP/s, "
        f"bf16 {_f(peak['bf16_gflops'], '.0f')} GFLOP/s ({peak.get('bf16_path')}), int8 {_f(peak['int8_gops'], '.0f')} "
        f"GOP/s ({peak.get('int8_path')}); R = int8/fp32 = {_f(peak['R'])}, 0.8 R = {_f((peak['R'] or 0) * 0.8)}",
        f"calibration: {report['calibration']['images']} synthetic images of {report['calibration']['size']} px "
        f"(+{report['calibration']['held_out']} held out) - few, for time",
    ]
    for entry in report["models"]:
        lines.append("")
        if "error" in entry:
            lines.append(f"== {entry['model']}: {entry['error']}")
            continue
        inputs = entry["inputs"]
        what = f"{inputs['dermoscopy_side']}^2 dermoscopy JPEG"
        if inputs.get("clinical"):
            what += f" + {inputs['clinical_side']}^2 clinical"
        if inputs.get("metadata"):
            what += " + metadata"
        diffs = entry.get("weights_max_abs_diff") or {}
        relative = entry.get("weights_max_rel_diff") or {}
        lines.append(f"== {entry['model']} ({entry['task']}; {what}); same weights: max |torch - fp32 graph| "
                     + (", ".join(f"{k} {v:.1e} ({relative[k]:.1e} relative)" for k, v in diffs.items())
                        or entry.get("weights_check_error", "-")))
        header = (f"{'engine':<22} {'latency s':>9} {'min s':>7} {'n':>2} {'first s':>8} {'peak MiB':>8} "
                  f"{'decision':>9} {'quant fid':>9} {'vs torch32':>10}  stages (ms, achieved G/s, % of peak)")
        lines += [header, "-" * len(header)]
        torch32 = entry["engines"].get("torch:fp32", {}).get("latency_s")
        for engine, data in entry["engines"].items():
            decision = data.get("dice_vs_fp32", data.get("agreement_vs_fp32"))
            dec_txt = (f"D{decision:.4f}" if "dice_vs_fp32" in data else f"{decision:.3f}") if decision is not None \
                else "-"
            fid = entry["fidelity"].get(engine.split(":")[1], {}) if engine.startswith("edgederm:") else {}
            fid_val = fid.get("decision_agreement", fid.get("dice_mean"))
            stages = "; ".join(
                f"{s} {_f(v['ms'], '.0f')} ms {_f(v.get('achieved_gflops'), '.0f')} "
                f"{_f((v.get('fraction_of_peak') or float('nan')) * 100, '.0f')}% {v.get('peak', '')}"
                for s, v in data["stages"].items())
            lines.append(
                f"{engine:<22} {data['latency_s']:>9.3f} {data['latency_min_s']:>7.3f} {data['n_rounds']:>2} "
                f"{data['setup']['first_predict_s']:>8.2f} {data['peak_rss_bytes'] / 2**20:>8.0f} {dec_txt:>9} "
                f"{_f(fid_val, '.3f'):>9} {_f(torch32 / data['latency_s'] if torch32 else None):>10}  {stages}")
        for engine, why in entry["skipped"].items():
            lines.append(f"{engine:<22} skipped: {why}")
        r = entry.get("ratios", {})
        lines.append(
            f"fastest SDK {r.get('sdk_fastest')}: {_f(r.get('sdk_fastest_vs_torch_fp32'))}x torch fp32, "
            f"{_f(r.get('sdk_fastest_vs_torch_fastest'))}x PyTorch's fastest ({r.get('torch_fastest')}); "
            f"best INT8 {r.get('best_int8')}: {_f(r.get('best_int8_vs_fp32_graph'))}x the fp32 graph end to end "
            f"({_f(r.get('best_int8_vs_fp32_graph_stages_only'))}x inside the stages); 0.8 R = {_f(r.get('target_0.8R'))}")
        for engine, cold in (entry.get("cold_start") or {}).items():
            if "error" in cold:
                lines.append(f"cold start {engine}: {cold['error']}")
                continue
            warm = cold.get("warm") or {}
            lines.append(
                f"cold start {engine}: load {_f(cold['load_s'])} s + first {_f(cold['first_predict_s'])} s = "
                f"{_f(cold.get('cold_over_steady'))}x steady (empty cache); warm cache: load {_f(warm.get('load_s'))} s"
                f" + first {_f(warm.get('first_predict_s'))} s = {_f(warm.get('warm_over_steady'))}x steady")
    lines += ["", "latency = median of the rounds of one prediction from the image file (decode, preprocessing, "
              "tiles/windows, every stage, review); first = the first prediction after load; decision = label "
              "agreement with edgederm:fp32 on the benchmark input (D = Dice of the masks); quant fid = quantize's "
              "agreement (Dice for segmenters) on its held-out images; vs torch32 = torch:fp32 latency / this "
              "engine's; % of peak = achieved over the matmul peak of the stage's precision"]
    return "\n".join(lines)


def plot_zoo_report(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Speed-up over PyTorch fp32 per model and engine, with the 0.8 R line (PNG, atomic)."""
    from edgederm.bench import pyplot, save_figure

    plt = pyplot()
    entries = [e for e in report["models"] if e.get("engines")]
    engines = sorted({e for entry in entries for e in entry["engines"]})
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(entries) + 2), 4.5))
    width = 0.8 / max(1, len(engines))
    for k, engine in enumerate(engines):
        values = []
        for entry in entries:
            torch32 = entry["engines"].get("torch:fp32", {}).get("latency_s")
            data = entry["engines"].get(engine)
            values.append(torch32 / data["latency_s"] if torch32 and data else 0.0)
        ax.bar([i + k * width for i in range(len(entries))], values, width, label=engine)
    R = report["machine_peak"].get("R")
    if R:
        ax.axhline(TARGET_FACTOR * R, color="k", linestyle="--", linewidth=1, label=f"0.8 R = {TARGET_FACTOR * R:.2f}")
    ax.set_xticks([i + width * (len(engines) - 1) / 2 for i in range(len(entries))])
    ax.set_xticklabels([e["model"] for e in entries])
    ax.set(ylabel="speed-up over PyTorch fp32 (whole pipeline)",
           title=f"edgederm bench --all-models, {report['threads']} threads, median of {report['rounds']} rounds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


if __name__ == "__main__":  # the per-engine worker: python -m edgederm.bench_zoo --worker
    if sys.argv[1:] == ["--worker"]:
        worker_main()
    else:
        print("usage: edgederm bench --all-models (this module's main is the internal worker)", file=sys.stderr)
        sys.exit(2)

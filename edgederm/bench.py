"""``edgederm bench BUNDLE --sizes 1024,2048,4096``: the runtime against its peers, in one run.

Per image size it measures, for each engine, the latency of one prediction, tiles
(or windows) per second, the process peak RSS, and the achieved GFLOP/s of the
tiled stage against this machine's fp32 matrix-multiply peak measured in the same
run. Engines:

* ``edgederm``: ``edgederm.runtime.load(bundle).predict(image)`` (ONNX Runtime).
* ``torch``: the same weights in PyTorch eager. Segmenters: the same tiler
  (``runtime.tiling.sliding_window``, same tiles, overlap, blending, batch) with
  torch as the predictor. Classifiers: the model's forward on the same
  preprocessed input.
* ``monai`` (segmenters): MONAI's ``sliding_window_inference`` on the
  preprocessed full image with the same tile, overlap, gaussian blending
  (sigma_scale 0.125, as the runtime's) and batch, reflect padding, torch model
  as the predictor, probabilities blended as the runtime blends them.

Decisions:

* Honest peaks: every (size, engine) pair runs in its own fresh process and
  reports its own ``VmHWM``; the image is generated once in the parent
  (``generate_case`` at <= 1024 px, resized) and handed over as a ``.npy`` file, so
  the generator's temporaries are in no engine's peak. Each engine first runs a
  warm-up prediction on a one-tile image, then the timed one.
* Same weights: a bundle holds ONNX graphs, whose initializers are renamed and
  folded (BatchNorm into Conv), so torch weights cannot be rebuilt from them.
  The peers therefore need the training checkpoint (``--checkpoint CKPT``, the
  folder ``edgederm train`` writes), or ``--torch-model module:callable`` for a
  model outside the registry; without either they are skipped and the output
  says so. Before timing, each peer runs one tile through torch and through the
  bundle's fp32 graph; the maximum difference is reported, and a peer whose
  weights do not match (> 1e-3) is marked ``same_weights: false``.
* GFLOP/s: FLOPs of the tiled stage are counted on the fp32 ONNX graph (Conv,
  ConvTranspose, MatMul, Gemm; 2 per multiply-add) and divided by the time spent
  inside the graph (``inference``) and by the end-to-end latency. The peak is
  the best of numpy ``float32`` matmul and an ONNX Runtime MatMul (2048^3, the
  runtime's thread count) measured at the start of the run.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgederm.metrics import dice_score
from edgederm.runtime.backends.base import Backend, TensorInfo
from edgederm.runtime.bundle import Stage

__all__ = ["BenchConfig", "run_bench", "matmul_peak", "matmul_peaks", "count_graph_flops", "format_report", "plot_report",
           "TorchStageBackend"]

ENGINES = ("edgederm", "torch", "monai")


@dataclass
class BenchConfig:
    bundle: Path
    sizes: Sequence[int] = (1024, 2048, 4096)
    engines: Sequence[str] = ENGINES
    checkpoint: Path | None = None
    torch_model: str | None = None  # "module:callable" building the torch model with the bundle's weights
    precision: str = "auto"
    memory_budget: str | None = None
    threads: int | None = None
    seed: int = 0
    timeout: float = 1800.0
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- machine peak


def matmul_peak(threads: int | None = None, n: int = 2048, repeats: int = 5) -> dict[str, Any]:
    """fp32 matrix-multiply GFLOP/s on this machine: numpy (BLAS) and ONNX Runtime (MLAS)."""
    threads = threads or min(2, os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flops = 2.0 * n**3
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    out: dict[str, Any] = {"n": n, "threads": threads, "numpy_gflops": flops / best / 1e9,
                           "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE")}
    try:
        best_ort = _ort_matmul_seconds("float32", "float32", n, threads, repeats)
        out["onnxruntime_gflops"] = flops / best_ort / 1e9
    except ImportError:
        out["onnxruntime_gflops"] = None
    out["peak_gflops"] = max(v for v in (out["numpy_gflops"], out["onnxruntime_gflops"]) if v is not None)
    return out


def _ort_matmul_seconds(a_type: str, b_type: str, n: int, threads: int, repeats: int) -> float:
    """Best seconds of one ``n x n`` ONNX Runtime MatMul (float) or MatMulInteger (8-bit).

    The 8-bit product takes B as a constant, as a quantized graph's weights are (ONNX
    Runtime packs constant B once, at session start); the float one feeds both.
    """
    from onnx import TensorProto, helper, numpy_helper

    from edgederm.runtime.backends.onnxruntime import cpu_session

    rng = np.random.default_rng(0)
    types = {"float32": TensorProto.FLOAT, "uint8": TensorProto.UINT8, "int8": TensorProto.INT8}

    def sample(dtype: str) -> np.ndarray:
        if dtype == "float32":
            return rng.standard_normal((n, n), dtype=np.float32)
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max + 1, (n, n)).astype(dtype)

    a, b = sample(a_type), sample(b_type)
    inputs = [helper.make_tensor_value_info("a", types[a_type], [n, n])]
    if a_type == "float32":
        node, out_type, initializers = helper.make_node("MatMul", ["a", "b"], ["c"]), TensorProto.FLOAT, []
        inputs.append(helper.make_tensor_value_info("b", types[b_type], [n, n]))
        feed = {"a": a, "b": b}
    else:
        node, out_type = helper.make_node("MatMulInteger", ["a", "b"], ["c"]), TensorProto.INT32
        initializers = [numpy_helper.from_array(b, "b")]
        feed = {"a": a}
    graph = helper.make_graph([node], "mm", inputs, [helper.make_tensor_value_info("c", out_type, [n, n])],
                              initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = min(model.ir_version, 10)
    session = cpu_session(model, threads)
    session.run(None, feed)
    return min(_timed(lambda: session.run(None, feed)) for _ in range(repeats))


def matmul_peaks(threads: int | None = None, n: int = 2048, repeats: int = 5) -> dict[str, Any]:
    """This machine's matrix-multiply peaks per precision (2 operations per multiply-add).

    * ``fp32``: the best of :func:`matmul_peak` (numpy's BLAS, ONNX Runtime's MLAS) and
      ``torch.matmul`` (oneDNN/MKL), so no engine's fraction is taken of a slow library's peak.
    * ``bf16``: ``torch.matmul`` of bfloat16 matrices (oneDNN; AVX-512 BF16 or AMX where
      the CPU has them, emulated otherwise).
    * ``int8``: the faster of ONNX Runtime ``MatMulInteger`` u8s8 and s8s8 (MLAS: VNNI
      where the CPU has it) and ``torch._int_mm`` s8s8; ``int8_path`` says which.

    ``R`` is int8 / fp32: what an INT8 graph could gain over fp32 if it were all matmul.
    """
    threads = threads or min(2, os.cpu_count() or 1)
    flops = 2.0 * n**3
    fp32 = matmul_peak(threads, n, repeats)
    out: dict[str, Any] = {"n": n, "threads": threads, "fp32": fp32, "fp32_gflops": fp32["peak_gflops"]}
    int8: dict[str, float | str] = {}
    for name, a_type in (("onnxruntime_matmulinteger_u8s8", "uint8"), ("onnxruntime_matmulinteger_s8s8", "int8")):
        try:
            int8[name] = flops / _ort_matmul_seconds(a_type, "int8", n, threads, repeats) / 1e9
        except Exception as exc:  # an ORT build without this kernel: say so, measure the others
            int8[name] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
    try:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(n, n, generator=gen).to(torch.bfloat16)
            y = torch.randn(n, n, generator=gen).to(torch.bfloat16)
            torch.matmul(x, y)
            out["bf16_gflops"] = flops / min(_timed(lambda: torch.matmul(x, y)) for _ in range(repeats)) / 1e9
            out["bf16_path"] = "torch.matmul bfloat16"
            xf, yf = x.float(), y.float()
            torch.matmul(xf, yf)
            fp32["torch_gflops"] = flops / min(_timed(lambda: torch.matmul(xf, yf)) for _ in range(repeats)) / 1e9
            out["fp32_gflops"] = max(fp32["peak_gflops"], fp32["torch_gflops"])
            try:
                xi = torch.randint(-128, 128, (n, n), generator=gen, dtype=torch.int8)
                yi = torch.randint(-128, 128, (n, n), generator=gen, dtype=torch.int8)
                torch._int_mm(xi, yi)
                int8["torch_int_mm_s8s8"] = flops / min(_timed(lambda: torch._int_mm(xi, yi))
                                                        for _ in range(repeats)) / 1e9
            except Exception as exc:  # not every torch build has a CPU _int_mm
                int8["torch_int_mm_s8s8"] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
        finally:
            torch.set_num_threads(before)
    except ImportError:
        out["bf16_gflops"], out["bf16_path"] = None, "torch is not installed"
    measured = {k: v for k, v in int8.items() if isinstance(v, float)}
    out["int8_paths"] = int8
    out["int8_path"] = max(measured, key=lambda k: measured[k]) if measured else None
    out["int8_gops"] = max(measured.values()) if measured else None
    out["R"] = out["int8_gops"] / out["fp32_gflops"] if out["int8_gops"] else None
    return out


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- FLOPs


def count_graph_flops(path: str | os.PathLike[str]) -> float | None:
    """FLOPs of one batch-1 run of an ONNX graph (Conv, ConvTranspose, MatMul, Gemm), or None."""
    try:
        import onnx
        from onnx import shape_inference
    except ImportError:
        return None
    model = onnx.load(str(path))
    for value in list(model.graph.input) + list(model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.dim_value = 1
    del model.graph.value_info[:]
    try:
        model = shape_inference.infer_shapes(model)
    except Exception:
        return None
    shapes: dict[str, list[int]] = {}
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in value.type.tensor_type.shape.dim]
        shapes[value.name] = dims
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    total = 0.0
    for node in model.graph.node:
        try:
            if node.op_type == "Conv":
                w, out = shapes[node.input[1]], shapes[node.output[0]]
                total += 2.0 * math.prod(out) * math.prod(w[1:])
            elif node.op_type == "ConvTranspose":
                w, x = shapes[node.input[1]], shapes[node.input[0]]
                # weight (Cin, Cout/group, kh, kw): each input value feeds Cout/group * kh * kw outputs.
                total += 2.0 * math.prod(x) * w[1] * math.prod(w[2:])
            elif node.op_type in ("MatMul", "Gemm"):
                a, out = shapes[node.input[0]], shapes[node.output[0]]
                trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
                k = a[-2] if (node.op_type == "Gemm" and trans_a) else a[-1]
                total += 2.0 * math.prod(out) * k
        except (KeyError, IndexError):
            continue
    return total


# --------------------------------------------------------------------------- workers


def _load_torch_model(checkpoint: str | None, factory: str | None = None) -> Any:
    """The peer's torch model: a training checkpoint, or ``module:callable`` (models outside
    the registry, e.g. in tests), optionally with the checkpoint's weights loaded into it."""
    if factory:
        from edgederm.export.wrap import load_factory

        model = load_factory(factory)
        if checkpoint:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(Path(checkpoint) / "model.safetensors")))
        return model.eval()
    from edgederm.checkpoint import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    return model.eval()


class TorchStageBackend(Backend):
    """A stage run by PyTorch (the benchmarks' peer), behind the runtime's backend interface.

    ``bf16``: under ``torch.autocast("cpu", bfloat16)``; outputs come back as float32,
    the dtype the bundle's graphs return, so the pipeline after the stage is the same.
    """

    name = "torch"

    def __init__(self, module: Any, stage: Stage, bf16: bool = False) -> None:
        self.module = module
        self.bf16 = bf16
        self._inputs = [TensorInfo(s.name, s.shape, s.dtype) for s in stage.inputs]
        self._outputs = [TensorInfo(s.name, s.shape, s.dtype) for s in stage.outputs]

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.module(*(torch.from_numpy(feed[i.name]) for i in self._inputs))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {info.name: t.float().numpy() for info, t in zip(self._outputs, outs)}


def _weights_check(torch_module: Any, manifest: Any, stage: Any, x: np.ndarray) -> float:
    """Max |torch - ONNX fp32| on one input of the tiled stage."""
    import torch

    from edgederm.runtime.backends.onnxruntime import OnnxRuntimeBackend

    graph = OnnxRuntimeBackend(manifest.graph_path(stage, "fp32"))
    expected = graph.run({stage.inputs[0].name: x})[stage.outputs[0].name]
    with torch.no_grad():
        got = torch_module(torch.from_numpy(x)).numpy()
    return float(np.abs(got - expected).max())


def _worker(args: dict[str, Any]) -> dict[str, Any]:
    """One (engine, size) measurement; runs in its own process."""
    from edgederm.runtime.rss import current_rss_bytes, peak_rss_bytes

    engine = args["engine"]
    image = np.load(args["image"])
    threads = args["threads"]
    out: dict[str, Any] = {"engine": engine, "image_shape": list(image.shape[:2])}
    if engine == "edgederm":
        from edgederm.runtime import load

        model = load(args["bundle"], precision=args["precision"], memory_budget=args["memory_budget"], threads=threads)
        side = model.tile_size if model.task == "segment" else 64
        model.predict(dermoscopy=np.ascontiguousarray(image[:side, :side]))
        rss_before = current_rss_bytes()
        t0 = time.perf_counter()
        result = model.predict(dermoscopy=image)
        latency = time.perf_counter() - t0
        out.update(latency_s=latency, timings_ms=result.timings, precision=result.precision, run=model.last_run,
                   rss_before_bytes=rss_before, load_ms=model.load_ms)
        count = model.last_run.get("tiles", model.last_run.get("windows", 0))
        mask = result.mask
        if model.task != "segment":
            out["label"] = result.label
            out["probabilities"] = result.probabilities
    else:
        import torch

        from edgederm.runtime import preprocess as pp
        from edgederm.runtime.bundle import read_manifest

        torch.set_num_threads(threads)
        manifest = read_manifest(args["bundle"])
        model = _load_torch_model(args["checkpoint"], args.get("torch_model"))
        config = manifest.preprocess
        tiling = manifest.tiling
        mask = None
        if manifest.model.task == "segment":
            stage = manifest.stages[0]
            tile = manifest.tile_size
            overlap, blend = tiling.overlap, tiling.blend
            batch = int(args.get("batch_size") or tiling.batch_size)
            stats = pp.image_color_stats(image, config)
            probe = pp.preprocess_batch(image[None, :tile, :tile] if min(image.shape[:2]) >= tile else
                                        np.zeros((1, tile, tile, 3), np.uint8), config, stats)
            out["weights_max_abs_diff"] = _weights_check(model, manifest, stage, probe)

            if engine == "torch":
                # The runtime's own stage pipeline (tiles, blending, reduction to a mask), with
                # PyTorch eager in place of the ONNX graph: only the engine differs.
                from edgederm.runtime.memory import plan
                from edgederm.runtime.pipeline import Pipeline

                backend = TorchStageBackend(model, stage)
                pipeline = Pipeline(manifest, {stage.name: backend},
                                    lambda h, w: dataclasses.replace(plan(manifest, None, h, w), batch_size=batch))
                pipeline.segment(np.ascontiguousarray(image[:tile, :tile]), {})
                rss_before = current_rss_bytes()
                t0 = time.perf_counter()
                run = pipeline.segment(image, {})
                latency = time.perf_counter() - t0
                mask, count = run.mask, run.info["tiles"]
            else:  # monai
                from monai.inferers import sliding_window_inference

                def monai_predict(x: torch.Tensor) -> torch.Tensor:
                    with torch.no_grad():
                        logits = model(x)
                        return torch.softmax(logits, dim=1) if logits.shape[1] > 1 else torch.sigmoid(logits)

                def run_monai(picture: np.ndarray) -> torch.Tensor:
                    corrected = pp.apply_color_constancy(picture, config.color_constancy, stats,
                                                         config.gwsd_target_mean, config.gwsd_target_std)
                    x = torch.from_numpy(pp.normalize(corrected, config.mean, config.std)[None])
                    with torch.no_grad():
                        return sliding_window_inference(x, (tile, tile), batch, monai_predict, overlap=overlap,
                                                        mode=blend, sigma_scale=0.125, padding_mode="reflect")

                run_monai(np.ascontiguousarray(image[:tile, :tile]))
                rss_before = current_rss_bytes()
                t0 = time.perf_counter()
                probs = run_monai(image)
                mask = probs[0].argmax(dim=0).numpy().astype(np.uint8)
                latency = time.perf_counter() - t0
                grid_y = _monai_tiles(image.shape[0], tile, overlap)
                grid_x = _monai_tiles(image.shape[1], tile, overlap)
                count = grid_y * grid_x
        else:
            # Classifier: forward of the whole model on the same preprocessed input.
            with torch.no_grad():
                model(dermoscopy=torch.from_numpy(pp.preprocess(image[:64, :64], config)[None]))
                rss_before = current_rss_bytes()
                t0 = time.perf_counter()
                x = torch.from_numpy(pp.preprocess(image, config)[None])
                logits = model(dermoscopy=x)
                latency = time.perf_counter() - t0
            from edgederm.runtime.probabilities import softmax

            probs = softmax(logits.numpy()[0])
            out["probabilities"] = {n: float(p) for n, p in zip(manifest.model.class_names, probs)}
            grid = tiling.grid
            count = grid[0] * grid[1] if grid else 1
        out.update(latency_s=latency, rss_before_bytes=rss_before)
    out["count"] = int(count)
    out["per_s"] = count / latency if latency > 0 else None
    out["peak_rss_bytes"] = peak_rss_bytes()
    if mask is not None:
        np.save(args["mask_out"], mask)
        out["mask"] = args["mask_out"]
    return out


def _monai_tiles(length: int, tile: int, overlap: float) -> int:
    # MONAI's scan interval: int(tile * (1 - overlap)), ceil((length - tile) / interval) + 1 positions.
    if length <= tile:
        return 1
    interval = max(1, int(tile * (1 - overlap)))
    return int(math.ceil((length - tile) / interval)) + 1


def _run_worker(args: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(args["threads"]))
    proc = subprocess.run([sys.executable, "-m", "edgederm.bench", "--worker", json.dumps(args)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:] if proc.stderr.strip() else ["no output"]
        return {"engine": args["engine"], "error": " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- driver


def run_bench(config: BenchConfig, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every size x engine; returns the report (also what ``--json`` prints)."""
    import cv2

    from edgederm.data.synthetic import generate_case
    from edgederm.runtime.bundle import read_manifest

    say = say or (lambda m: print(m, file=sys.stderr))
    manifest = read_manifest(config.bundle)
    task = manifest.model.task
    threads = config.threads or min(2, os.cpu_count() or 1)
    engines = [e for e in config.engines if e in ENGINES]
    skipped: dict[str, str] = {}
    if task != "segment" and "monai" in engines:
        engines.remove("monai")
        skipped["monai"] = "MONAI's sliding_window_inference is a segmentation peer; this bundle classifies"
    if config.checkpoint is None and config.torch_model is None:
        for peer in ("torch", "monai"):
            if peer in engines:
                engines.remove(peer)
                skipped[peer] = ("needs the same weights in PyTorch: pass --checkpoint CKPT (the folder "
                                 "`edgederm train` wrote); ONNX graphs fold BatchNorm, so torch weights cannot be "
                                 "rebuilt from the bundle")
    say(f"measuring this machine's fp32 matmul peak ({threads} threads) ...")
    peak = matmul_peak(threads)
    stage = manifest.tiled_stage or manifest.stages[0]
    flops = count_graph_flops(manifest.graph_path(stage, "fp32"))
    report: dict[str, Any] = {
        "bundle": str(config.bundle), "model": manifest.model.name, "task": task,
        "tiling": dataclasses.asdict(manifest.tiling),
        "memory_profile": dataclasses.asdict(manifest.memory) if manifest.memory else None,
        "threads": threads, "machine_peak": peak, "tiled_stage": stage.name, "flops_per_tile": flops,
        "skipped": skipped, "results": [],
    }
    with tempfile.TemporaryDirectory(prefix="edgederm-bench-") as tmp:
        for size in config.sizes:
            picture = generate_case(seed=config.seed, size=min(size, 1024)).image
            if size != picture.shape[0]:
                picture = cv2.resize(picture, (size, size), interpolation=cv2.INTER_LINEAR)
            image_path = os.path.join(tmp, f"image_{size}.npy")
            np.save(image_path, picture)
            del picture
            rows: dict[str, dict[str, Any]] = {}
            batch = None
            for engine in engines:
                say(f"  {size}x{size}: {engine} ...")
                args = {"engine": engine, "image": image_path, "bundle": str(config.bundle), "threads": threads,
                        "precision": config.precision, "memory_budget": config.memory_budget,
                        "checkpoint": str(config.checkpoint) if config.checkpoint else None,
                        "torch_model": config.torch_model,
                        "mask_out": os.path.join(tmp, f"mask_{size}_{engine}.npy"), "batch_size": batch}
                row = _run_worker(args, config.timeout)
                if engine == "edgederm" and "run" in row:
                    batch = row["run"].get("batch_size")  # peers use the same batch
                rows[engine] = row
            _summarise(rows, flops, peak["peak_gflops"], task)
            for engine, row in rows.items():
                row.pop("mask", None)
                report["results"].append({"size": size, **row})
            Path(image_path).unlink(missing_ok=True)
    return report


def _summarise(rows: dict[str, dict[str, Any]], flops: float | None, peak_gflops: float, task: str) -> None:
    ours = rows.get("edgederm", {})
    ours_mask = np.load(ours["mask"]) if ours.get("mask") else None
    for engine, row in rows.items():
        if "error" in row:
            continue
        if flops and row.get("count"):
            total = flops * row["count"]
            row["gflops_end_to_end"] = total / row["latency_s"] / 1e9
            inference_ms = (row.get("timings_ms") or {}).get("inference")
            if engine == "edgederm" and inference_ms:
                row["gflops_inference"] = total / (inference_ms / 1000) / 1e9
                row["inference_fraction_of_peak"] = row["gflops_inference"] / peak_gflops
            row["fraction_of_peak"] = row["gflops_end_to_end"] / peak_gflops
        if engine != "edgederm" and "latency_s" in ours:
            row["speedup_of_edgederm"] = row["latency_s"] / ours["latency_s"]
            row["memory_ratio_edgederm_over_peer"] = ours["peak_rss_bytes"] / row["peak_rss_bytes"]
            if "weights_max_abs_diff" in row:
                row["same_weights"] = row["weights_max_abs_diff"] <= 1e-3
            if ours_mask is not None and row.get("mask"):
                row["dice_vs_edgederm"] = dice_score(ours_mask, np.load(row["mask"]))
            if task != "segment" and "probabilities" in ours and "probabilities" in row:
                row["max_probability_diff"] = max(abs(ours["probabilities"][k] - row["probabilities"][k])
                                                  for k in ours["probabilities"])


def format_report(report: dict[str, Any]) -> str:
    peak = report["machine_peak"]
    lines = [
        f"bundle {report['bundle']} ({report['model']}, {report['task']}), {report['threads']} threads",
        f"fp32 matmul peak: numpy {peak['numpy_gflops']:.1f} GFLOP/s, onnxruntime "
        f"{peak['onnxruntime_gflops'] or float('nan'):.1f} GFLOP/s (n={peak['n']})",
        f"tiled stage {report['tiled_stage']}: {(report['flops_per_tile'] or 0) / 1e9:.3f} GFLOP per tile/window",
    ]
    for peer, why in report["skipped"].items():
        lines.append(f"peer {peer} skipped: {why}")
    header = f"{'size':>6} {'engine':<9} {'latency s':>9} {'tiles/s':>8} {'peak MiB':>9} {'GFLOP/s':>8} " \
             f"{'%peak':>6} {'x faster':>8} {'mem ratio':>9} {'dice':>6}"
    lines += ["", header, "-" * len(header)]
    for row in report["results"]:
        if "error" in row:
            lines.append(f"{row['size']:>6} {row['engine']:<9} error: {row['error']}")
            continue
        gflops = row.get("gflops_inference", row.get("gflops_end_to_end"))
        frac = row.get("inference_fraction_of_peak", row.get("fraction_of_peak"))
        lines.append(
            f"{row['size']:>6} {row['engine']:<9} {row['latency_s']:>9.3f} {row.get('per_s') or 0:>8.1f} "
            f"{row['peak_rss_bytes'] / 2**20:>9.1f} {gflops or float('nan'):>8.1f} "
            f"{(frac or float('nan')) * 100:>5.1f}% "
            f"{row.get('speedup_of_edgederm', float('nan')):>8.2f} "
            f"{row.get('memory_ratio_edgederm_over_peer', float('nan')):>9.2f} "
            f"{row.get('dice_vs_edgederm', float('nan')):>6.4f}"
        )
    lines.append("")
    lines.append("x faster = peer latency / edgederm latency; mem ratio = edgederm peak / peer peak; "
                 "GFLOP/s for edgederm = inside the graph (%peak of the matmul peak), peers end to end")
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Latency and peak memory against megapixels, one line per engine (PNG, atomic)."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    engines = sorted({r["engine"] for r in report["results"] if "error" not in r})
    for engine in engines:
        rows = sorted((r for r in report["results"] if r["engine"] == engine and "error" not in r),
                      key=lambda r: r["size"])
        mp = [r["size"] ** 2 / 1e6 for r in rows]
        left.plot(mp, [r["latency_s"] for r in rows], marker="o", label=engine)
        right.plot(mp, [r["peak_rss_bytes"] / 2**20 for r in rows], marker="o", label=engine)
    left.set(xlabel="megapixels", ylabel="latency (s)", title="latency")
    right.set(xlabel="megapixels", ylabel="peak RSS (MiB)", title="process peak memory")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{report['model']} ({report['task']}), {report['threads']} threads")
    return save_figure(fig, path)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (the benchmarks' plots)."""
    from edgederm.runtime.optional import optional_import

    matplotlib = optional_import("matplotlib", "edgederm bench --plot")
    matplotlib.use("Agg")
    return optional_import("matplotlib.pyplot", "edgederm bench --plot")


def save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as a PNG atomically (nothing half-written is left) and close it."""
    from edgederm.runtime.bundle import write_bytes_atomic

    plt = pyplot()
    png = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(png, format="png", dpi=110)
    finally:
        plt.close(fig)
    return write_bytes_atomic(path, png.getvalue())


def parse_sizes(text: str) -> list[int]:
    from edgederm.runtime.errors import InputError

    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InputError(f"--sizes {text!r}: expected comma-separated image sides in pixels, e.g. 1024,2048,4096") from None
    if not sizes or any(s < 8 or s > 32768 for s in sizes):
        raise InputError(f"--sizes {text!r}: each side must be in 8..32768 px, e.g. 1024,2048,4096")
    return sizes


if __name__ == "__main__":  # the per-measurement worker: python -m edgederm.bench --worker JSON
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(json.loads(sys.argv[2])), default=str))
    else:
        print("usage: edgederm bench BUNDLE --sizes 1024,2048 (this module's main is the internal worker)",
              file=sys.stderr)
        sys.exit(2)

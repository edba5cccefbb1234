"""CPU precision benchmark of the window encoder: which INT8 form is fastest at equal decisions.

``edgederm bench-precision`` runs this. The target: INT8 window encoder
(ViT-S/16 on 256x256 windows, batch 8, 2 threads) at >= 2x the fp32 throughput of
ONNX Runtime with >= 99% decision agreement; reference points PyTorch fp32 and
PyTorch bf16 autocast on the same machine, same run.

Decisions:
- Model: RemixFormer++'s window encoder at paper size (edgederm.models.remixformer
  WindowEncoder: ViT-S/16 384/12/6 + texture attention), seeded random weights (no
  checkpoint can be downloaded here), or a trained one from ``--checkpoint``.
  Exported with the SDK's exporter on every run (a graph left in ``--out`` by an
  earlier run may hold other weights).
- Data: synthetic dermoscopy cases (edgederm.data.synthetic) cut into windows by the
  runtime's own window code (``edgederm.runtime.pipeline.image_windows``); calibration and
  evaluation images are disjoint.
- "Decision": an encoder has no decision of its own, so a linear probe (ridge
  regression, one-vs-rest over the synthetic classes) is fitted on the fp32
  embeddings of the calibration windows and applied to every variant's embeddings
  of the evaluation windows; agreement = equal argmax. The cosine similarity of the
  embeddings to fp32 is reported too (a decision-free figure).
- Throughput: windows/s of one fixed batch, timed round robin in blocks (per round
  and variant: one untimed batch, then three timed) and the median per variant
  kept: the machine is shared, and a load change then hits every variant alike
  instead of whichever was being timed.
"""
from __future__ import annotations

import copy
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Variant:
    name: str
    kind: str  # "ort" | "torch"
    build: Callable[[Path], Path] | None = None  # fp32 graph -> variant graph
    note: str = ""


def _windows(seeds: range, size: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    from edgederm.data.synthetic import generate_case
    from edgederm.runtime.pipeline import image_windows
    from edgederm.runtime.preprocess import PreprocessConfig

    config = PreprocessConfig(input_size=(size, size))
    xs, ys = [], []
    grid = size // window
    for seed in seeds:
        case = generate_case(seed=seed, size=size)
        xs.append(image_windows(case.image, config, window, grid, grid))
        ys += [case.label] * grid * grid
    return np.concatenate(xs), np.array(ys)


def _probe(embeddings: np.ndarray, labels: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean, std = embeddings.mean(0), embeddings.std(0) + 1e-6
    z = (embeddings - mean) / std
    targets = np.eye(classes)[labels]
    ridge = 1.0 * len(z)
    w = np.linalg.solve(z.T @ z + ridge * np.eye(z.shape[1]), z.T @ targets)
    return mean, std, w


def compare_to_reference(outputs: np.ndarray, reference: np.ndarray,
                         probe: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[float, np.ndarray]:
    """Decision agreement (share of windows whose probe decision equals the reference's)
    and the cosine similarity of each window's embedding to the reference's."""
    mean, std, w = probe
    decided = (((outputs - mean) / std) @ w).argmax(1)
    expected = (((reference - mean) / std) @ w).argmax(1)
    cos = np.sum(outputs * reference, 1) / (np.linalg.norm(outputs, axis=1) * np.linalg.norm(reference, axis=1) + 1e-12)
    return float((decided == expected).mean()), cos


def _trained_window_encoder(checkpoint: str | os.PathLike[str]) -> tuple[Any, int]:
    from edgederm.checkpoint import load_checkpoint
    from edgederm.runtime.errors import InputError

    model, config = load_checkpoint(checkpoint)
    encoder = getattr(model, "window_encoder", None)
    if encoder is None:
        raise InputError(f"checkpoint {checkpoint} holds {config.get('model_name')!r}, which has no window encoder; "
                         "expected a RemixFormer++ checkpoint (remixformer_pp, remixformer_tiny), e.g. the output "
                         "of `edgederm train --model remixformer_pp`")
    return encoder.eval(), int(model.window_size)


def run_benchmark(out_dir: str | os.PathLike[str] | None = None, *, batch: int = 8, threads: int = 2,
                  window: int = 256, calib_images: int = 8, eval_images: int = 32, seconds: float = 6.0,
                  variants: list[str] | None = None, say: Callable[[str], None] = print, seed: int = 0,
                  small: bool = False, checkpoint: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Measure every variant; returns one row per variant (name, windows/s, speed-up, agreement, cosine).

    ``checkpoint``: a RemixFormer++ checkpoint folder (``edgederm train`` output); its
    trained window encoder and window size replace the seeded random one.
    """
    import torch

    from edgederm.calibration.graphs import QuantSettings, prepare_graph, quantize_dynamic_graph, quantize_graph, save_model
    from edgederm.export.onnx import export_stage_onnx
    from edgederm.models.base import ExportStage
    from edgederm.models.remixformer import WindowEncoder
    from edgederm.runtime.backends.onnxruntime import cpu_session

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    if checkpoint is not None:
        encoder, window = _trained_window_encoder(checkpoint)
    else:
        dims: dict[str, Any] = dict(dim=64, depth=2, heads=2, templates=8, scales=(1, 2)) if small else {}
        encoder = WindowEncoder(window, 16, **dims).eval()
    work = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="edgederm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    fp32_path = work / "window_encoder.fp32.onnx"
    say(f"exporting the window encoder ({sum(p.numel() for p in encoder.parameters()) / 1e6:.1f} M parameters, "
        f"{window}x{window} windows) to {fp32_path}")
    stage = ExportStage("window_encoder", encoder, {"windows": torch.randn(batch, 3, window, window)},
                        ["window_embeddings"], image_inputs=["windows"])
    export_stage_onnx(stage, fp32_path)
    prepared_path = work / "window_encoder.prepared.onnx"
    prepared_path.unlink(missing_ok=True)  # an earlier run's, from other weights
    size = 2 * window
    calib_x, calib_y = _windows(range(1000 + seed, 1000 + seed + calib_images), size, window)
    eval_x, _ = _windows(range(5000 + seed, 5000 + seed + eval_images), size, window)
    feeds = [{"windows": calib_x[i:i + batch]} for i in range(0, len(calib_x), batch)]
    say(f"{len(calib_x)} calibration windows, {len(eval_x)} evaluation windows, batch {batch}, {threads} threads")

    def static(fmt: str, act: str, per_channel: bool = True, method: str = "minmax") -> Callable[[Path], Path]:
        def build(out: Path) -> Path:
            if not prepared_path.exists():  # one quant_pre_process for every static form
                prepare_graph(fp32_path, prepared_path)
            quantize_graph(prepared_path, out, feeds, prepared=True,
                           settings=QuantSettings(method=method, per_channel=per_channel, format=fmt, activation_type=act))
            return out
        return build

    def dynamic(per_channel: bool, weights_only: bool = True, fuse_gelu: bool = False) -> Callable[[Path], Path]:
        def build(out: Path) -> Path:
            quantize_dynamic_graph(fp32_path, out, per_channel=per_channel, weights_only_matmul=weights_only,
                                   fuse_gelu=fuse_gelu)
            return out
        return build

    def fp32_gelu(out: Path) -> Path:
        import onnx

        from edgederm.calibration.fusions import fuse_erf_gelu

        model = onnx.load(str(fp32_path))
        fuse_erf_gelu(model)
        save_model(model, out)
        return out

    def fp16(out: Path) -> Path:
        from edgederm.calibration.fp16 import convert_to_fp16

        convert_to_fp16(fp32_path, out)
        return out

    def fused_dynamic(out: Path) -> Path:
        # ORT's transformer optimizer (LayerNorm/GELU/attention fusions) first, then
        # dynamic MatMul quantization of the fused graph: the BERT-on-CPU recipe.
        import onnx
        from onnxruntime.transformers.optimizer import optimize_model

        fused = out.with_name(out.stem + ".fused.onnx")
        model = optimize_model(str(fp32_path), model_type="vit", num_heads=int(getattr(encoder.vit.blocks[0].attn, "heads")),
                               hidden_size=encoder.vit.dim, opt_level=1)
        model.save_model_to_file(str(fused))
        graph = onnx.load(str(fused))
        del graph.graph.value_info[:]
        onnx.save(graph, str(fused))
        quantize_dynamic_graph(fused, out, per_channel=True)
        return out

    def nbits8(out: Path) -> Path:
        # Weight-only int8 in blocks of 32 (MatMulNBits) with accuracy_level 4: the
        # activations are quantized to int8 per block at run time (ORT's "qnbit" kernels).
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32_path)), bits=8, block_size=32, is_symmetric=True,
                                         accuracy_level=4)
        quantizer.process()
        quantizer.model.save_model_to_file(str(out))
        return out

    catalogue = [
        Variant("ort_fp32", "ort", lambda out: fp32_path, "the exported graph, as the fp32 bundle runs it"),
        Variant("ort_fp32_gelu_fused", "ort", fp32_gelu, "fp32 with the same GELU fusion (the stricter reference)"),
        Variant("ort_int8_static_qdq_u8s8", "ort", static("qdq", "uint8")),
        Variant("ort_int8_static_qdq_u8s8_per_tensor", "ort", static("qdq", "uint8", per_channel=False)),
        Variant("ort_int8_static_qoperator_u8s8", "ort", static("qoperator", "uint8")),
        Variant("ort_int8_static_qdq_s8s8", "ort", static("qdq", "int8")),
        Variant("ort_int8_static_qoperator_s8s8", "ort", static("qoperator", "int8")),
        Variant("ort_int8_dynamic_matmul", "ort", dynamic(True), "weights per channel, MatMul with constant B only"),
        Variant("ort_int8_dynamic_matmul_per_tensor", "ort", dynamic(False)),
        Variant("ort_int8_dynamic_all_matmul", "ort", dynamic(True, weights_only=False), "attention MatMuls too"),
        Variant("ort_int8_dynamic_sdk", "ort", dynamic(True, weights_only=False, fuse_gelu=True),
                "all MatMuls + fused GELU: what `quantize --precision int8_dynamic` writes"),
        Variant("ort_fused_int8_dynamic", "ort", fused_dynamic, "ORT transformer fusions, then dynamic MatMul"),
        Variant("ort_int8_matmulnbits_acc4", "ort", nbits8, "MatMulNBits 8-bit weights, block 32, int8 compute"),
        Variant("ort_fp16", "ort", fp16, "ORT CPU has no fast fp16 GEMM on this CPU (casts inserted)"),
        Variant("torch_fp32", "torch"),
        Variant("torch_bf16_autocast", "torch"),
        Variant("torch_int8_dynamic", "torch", note="torch.ao quantize_dynamic of nn.Linear (fbgemm)"),
    ]
    if variants:
        unknown = set(variants) - {v.name for v in catalogue}
        if unknown:
            from edgederm.runtime.errors import InputError

            raise InputError(f"unknown variants {sorted(unknown)}; choose from {[v.name for v in catalogue]}")
        catalogue = [v for v in catalogue if v.name in variants or v.name == "ort_fp32"]

    bench_batch = np.ascontiguousarray(eval_x[:batch])
    rows: list[dict[str, Any]] = []
    runners: list[Callable[[np.ndarray], np.ndarray]] = []
    reference: np.ndarray | None = None
    probe = None
    calib_ref: np.ndarray | None = None
    for variant in catalogue:
        say(f"- {variant.name}")
        t0 = time.perf_counter()
        if variant.kind == "ort":
            assert variant.build is not None
            path = variant.build(work / f"window_encoder.{variant.name}.onnx")
            build_s = time.perf_counter() - t0
            session = cpu_session(path, threads)
            name = session.get_inputs()[0].name

            def infer_ort(x: np.ndarray, session: Any = session, name: str = name) -> np.ndarray:
                return session.run(None, {name: x})[0]

            infer: Callable[[np.ndarray], np.ndarray] = infer_ort

            size_mb = path.stat().st_size / 2**20
        else:
            build_s = 0.0
            autocast = variant.name.endswith("bf16_autocast")
            module = encoder
            if variant.name == "torch_int8_dynamic":
                import warnings

                from torch.ao.quantization import quantize_dynamic

                with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
                    warnings.simplefilter("ignore")
                    module = quantize_dynamic(copy.deepcopy(encoder), {torch.nn.Linear}, dtype=torch.qint8)

            def infer_torch(x: np.ndarray, autocast: bool = autocast, module: Any = module) -> np.ndarray:
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    return module(torch.from_numpy(x)).float().numpy()

            infer = infer_torch

            size_mb = float("nan")
        outputs = np.concatenate([infer(np.ascontiguousarray(eval_x[i:i + batch])) for i in range(0, len(eval_x), batch)])
        if reference is None:
            reference = outputs
            calib_ref = np.concatenate([infer(f["windows"]) for f in feeds])
            probe = _probe(calib_ref, calib_y, int(calib_y.max()) + 1)
        assert probe is not None
        agreement, cos = compare_to_reference(outputs, reference, probe)
        row = {"variant": variant.name, "agreement": round(agreement, 4),
               "cosine_mean": round(float(cos.mean()), 5), "cosine_min": round(float(cos.min()), 5),
               "build_s": round(build_s, 1), "size_mb": round(size_mb, 1), "note": variant.note}
        rows.append(row)
        runners.append(infer)
        say(f"    agreement {row['agreement']:.4f}, cosine {row['cosine_mean']:.5f} (min {row['cosine_min']:.5f})")
    # Timing round robin in blocks: per round, each variant runs one untimed batch (its
    # weights back into cache, the previous variant's spinning ORT threads gone quiet)
    # then ``per_block`` timed ones. A change in the machine's load from other work hits
    # every variant alike; the median per variant is kept. With one batch per variant
    # per round (17 sessions resident) the same graphs measured int8_dynamic 1.88x fp32
    # instead of 2.29x: each run started from caches the other sessions had evicted,
    # beside their still-spinning ORT threads, which is not how a device runs one model.
    per_block = 3
    say(f"timing: round robin in blocks of {per_block} over {len(rows)} variants, about {seconds:.0f} s each")
    times: list[list[float]] = [[] for _ in rows]
    start = time.perf_counter()
    while time.perf_counter() - start < seconds * len(rows) or min(len(t) for t in times) < 3:
        for k, run in enumerate(runners):
            run(bench_batch)  # untimed: warm this variant
            for _ in range(per_block):
                t0 = time.perf_counter()
                run(bench_batch)
                times[k].append(time.perf_counter() - t0)
        if min(len(t) for t in times) >= 60:
            break
    for row, t in zip(rows, times):
        row["windows_per_s"] = round(batch / statistics.median(t), 1)
        row["rounds"] = len(t)
    base = rows[0]["windows_per_s"]
    for row in rows:
        row["speedup_vs_ort_fp32"] = round(row["windows_per_s"] / base, 2)
    return rows


def summarize(rows: list[dict[str, Any]], target_speedup: float = 2.0, target_agreement: float = 0.99) -> list[str]:
    """The verdict lines: the fastest INT8 form at >= target agreement against each fp32
    reference that ran, and the SDK's fastest CPU path against PyTorch's fastest."""
    by_name = {r["variant"]: r for r in rows}
    ok = [r for r in rows if r["variant"].startswith("ort_int8") and r["agreement"] >= target_agreement]
    lines: list[str] = []
    if not ok:
        lines.append(f"no INT8 form reached decision agreement {target_agreement:.2f}")
    else:
        best = max(ok, key=lambda r: r["windows_per_s"])
        for ref in ("ort_fp32", "ort_fp32_gelu_fused"):
            if ref in by_name:
                ratio = best["windows_per_s"] / by_name[ref]["windows_per_s"]
                lines.append(f"fastest INT8 at agreement >= {target_agreement:.2f}: {best['variant']} "
                             f"{best['windows_per_s']} windows/s = {ratio:.2f}x {ref} (target {target_speedup:.1f}x: "
                             f"{'met' if ratio >= target_speedup else 'NOT met'})")
    torch_rows = [r for r in rows if r["variant"].startswith("torch") and r["agreement"] >= target_agreement]
    ort_rows = [r for r in rows if r["variant"].startswith("ort") and r["agreement"] >= target_agreement]
    if torch_rows:
        fastest_torch = max(torch_rows, key=lambda r: r["windows_per_s"])
        fastest_ort = max(ort_rows, key=lambda r: r["windows_per_s"])
        ratio = fastest_ort["windows_per_s"] / fastest_torch["windows_per_s"]
        lines.append(f"SDK's fastest CPU path {fastest_ort['variant']} vs PyTorch's fastest {fastest_torch['variant']}: "
                     f"{ratio:.2f}x ({'at least as fast' if ratio >= 1.0 else 'slower'})")
    return lines

"""Producing one reduced-precision ONNX graph: static INT8 (QDQ / QOperator), dynamic INT8.

Decisions:
- Static INT8 through ONNX Runtime's ``quantize_static`` (QDQ by default: the form
  TensorRT's explicit quantization and ORT's CPU/GPU kernels both take) or, for
  TensorRT targets, through nvidia-modelopt's ONNX quantization when it is installed
  (``backend="modelopt"``; imported lazily, never at module top).
- Only Conv, MatMul and Gemm inputs are quantized (``QUANTIZED_OPS``), so LayerNorm,
  Softmax, GELU (Erf arithmetic at opset 18) and output Sigmoid/Softmax stay in float;
  tests/calibration/test_calibration.py checks the graph: no DequantizeLinear feeds those ops.
- Weights int8, symmetric, per channel by default. Activations: uint8 asymmetric by
  default, the fast U8S8 kernels of x86 CPUs (ORT's S8S8 path is several times
  slower there); ``activation_type="int8"`` gives symmetric int8 activations with
  zero-point 0, the only form TensorRT accepts (use it, or modelopt, for engines).
- Dynamic INT8 (``quantize_dynamic_graph``): weights quantized offline, activations
  per batch at run time; every MatMul by default, attention products included (Conv
  stays float: ConvInteger is slow on ORT CPU), then the erf-GELU fused
  (calibration/fusions.py). A CPU-only option: TensorRT needs static QDQ. Stored
  as precision "int8_dynamic".
- ORT's QDQ quantizer shares one Q/DQ pair between all consumers of a tensor, so a
  LayerNorm or Sigmoid that reads the output of a quantized MatMul would read the
  int8-rounded value. After quantization every consumer that is not one of
  ``QUANTIZED_OPS`` is rewired to the float tensor (:func:`keep_float_consumers`),
  and a quantized graph output is restored to float: only Conv/MatMul/Gemm see INT8.
- Graphs go through ``quant_pre_process`` (shape inference + ORT basic optimisation)
  first; the prepared fp32 graph is kept by callers as the float reference for
  returning nodes to float (calibration/sensitivity.py).
- Calibration ranges are collected by :func:`calibration_ranges` (streamed, in
  sub-batches bounded in memory) and handed to ``quantize_static`` as its calibration
  cache, so ORT never holds every batch's activations.
- Every file is written to a temporary name and renamed.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from edgederm.runtime.bundle import write_bytes_atomic
from edgederm.runtime.errors import EdgeDermError, InputError
from edgederm.runtime.optional import optional_import

from .fusions import fuse_erf_gelu, remove_unused

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
FORMATS = ("qdq", "qoperator")
INT8_TYPES = ("uint8", "int8")
BACKENDS = ("onnxruntime", "modelopt")
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
PERCENTILE = 99.999
# Ops whose inputs must never come out of a DequantizeLinear (they stay float).
FLOAT_ONLY_OPS = ("LayerNormalization", "Softmax", "LogSoftmax", "Erf", "Gelu", "Sigmoid", "BatchNormalization",
                  "InstanceNormalization", "GroupNormalization")


class QuantizeError(EdgeDermError):
    """A graph could not be quantized, or a quantized graph misses its target."""


@dataclass
class QuantSettings:
    """Everything that decides how a static INT8 graph is made (stored in the bundle)."""

    method: str = "minmax"
    per_channel: bool = True
    format: str = "qdq"
    activation_type: str = "uint8"
    weight_type: str = "int8"
    backend: str = "onnxruntime"
    op_types: tuple[str, ...] = QUANTIZED_OPS
    nodes_to_exclude: list[str] = field(default_factory=list)
    # Weights within +-64: no u8 x s8 pair saturates on x86 CPUs without VNNI (runtime/cpu.py).
    reduce_range: bool = False

    def __post_init__(self) -> None:
        for key, value, allowed in (("method", self.method, METHODS), ("format", self.format, FORMATS),
                                    ("activation_type", self.activation_type, INT8_TYPES),
                                    ("weight_type", self.weight_type, INT8_TYPES), ("backend", self.backend, BACKENDS)):
            if value not in allowed:
                raise InputError(f"{key} {value!r} is not supported; choose one of {', '.join(allowed)}")
        if self.backend == "modelopt" and (self.format != "qdq" or self.activation_type != "int8"):
            raise InputError("the modelopt backend writes TensorRT QDQ (int8 activations, format qdq); "
                             "pass activation_type='int8' and format='qdq' with it")

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend, "method": self.method, "per_channel": self.per_channel,
            "format": self.format.upper() if self.format == "qdq" else "QOperator",
            "activation_type": self.activation_type, "weight_type": self.weight_type,
            "activation_symmetric": self.activation_type == "int8", "quantized_ops": list(self.op_types),
            "tensorrt_compatible": self.format == "qdq" and self.activation_type == "int8" and self.weight_type == "int8",
            "reduce_range": self.reduce_range,
        }


def _reader(feeds: Iterable[dict[str, np.ndarray]]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _Feeds(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter(feeds)

    return _Feeds()


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` through a temporary file next to ``dst`` and one rename."""
    write_bytes_atomic(dst, Path(src).read_bytes())


def save_model(model: Any, path: str | os.PathLike[str]) -> None:
    """Save an ONNX ModelProto (under 2 GB, no external data) atomically."""
    write_bytes_atomic(path, model.SerializeToString())


def prepare_graph(fp32_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """``quant_pre_process`` (shapes, basic fusions) into ``out_path``; a copy if it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = Path(out_path)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quant_pre_process(str(fp32_path), str(out), skip_symbolic_shape=True)
    except Exception as exc:  # pre-processing only helps; quantize the raw graph if it fails
        log.warning("quantization pre-processing skipped for %s: %s", Path(fp32_path).name, exc)
        shutil.copyfile(fp32_path, out)
    return out


def quantize_graph(fp32_path: str | os.PathLike[str], out_path: str | os.PathLike[str],
                   feeds: Sequence[dict[str, np.ndarray]], method: str = "minmax", per_channel: bool = True,
                   settings: QuantSettings | None = None, prepared: bool = False) -> QuantSettings:
    """Static INT8 quantization of one graph, calibrated on ``feeds`` (a list of input dicts).

    ``settings`` overrides ``method``/``per_channel``. ``prepared=True``: ``fp32_path``
    already went through :func:`prepare_graph`.
    """
    settings = settings or QuantSettings(method=method, per_channel=per_channel)
    if not feeds:
        raise QuantizeError(f"no calibration batches for {Path(fp32_path).name}; give at least one input dict")
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(fp32_path) if prepared else prepare_graph(fp32_path, Path(tmp) / "prepared.onnx")
        staged = Path(tmp) / "quantized.onnx"
        if settings.backend == "modelopt":
            _quantize_modelopt(source, staged, feeds, settings)
        else:
            _quantize_ort(source, staged, feeds, settings)
        atomic_copy(staged, out_path)
    return settings


CALIBRATION_MEMORY = 1 << 30  # bytes one calibration run may add to what the process holds


def calibration_ranges(source: str | os.PathLike[str], feeds: Iterable[dict[str, np.ndarray]], s: QuantSettings,
                       workdir: str | os.PathLike[str], memory: int = CALIBRATION_MEMORY) -> Any:
    """The activation ranges ORT's calibrator gives ``source`` on ``feeds``, streamed.

    ORT's calibration graph reports, per batch, every calibrated tensor (histogram
    methods) or its min and max (minmax, reduced inside the run). Here each batch is
    run in sub-batches sized so one run adds at most ``memory`` bytes (the first row
    is run alone and measured): a paper-size clinical encoder's calibration graph
    holds ~1.8 GB per 512x512 image, so a batch of 8 in one run needed ~15 GB.
    - minmax: the sub-batches' extremes are combined (min of mins, max of maxes), which
      gives exactly the batch's own extremes, and the batches then go to ORT's range
      computation as ``quantize_static`` would hand them (moving average: the mean of
      the per-batch extremes). Two numbers per tensor per batch are held.
    - entropy, percentile: each sub-batch goes to ORT's histogram collector, which merges
      histograms across collections; only one sub-batch's activations are held at a
      time (``quantize_static`` holds every batch's). Histogram merging re-bins, so the
      ranges are close to, not bit-equal with, the all-in-memory ones.
    ``feeds`` may be a generator.
    """
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    from .progress import peak_span

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[s.method]
    options: dict[str, Any] = {"moving_average": True} if s.method == "minmax" else {}
    if s.method == "percentile":
        options["percentile"] = PERCENTILE
    calibrator = create_calibrator(Path(source), list(s.op_types), calibrate_method=method,
                                   augmented_model_path=str(Path(workdir) / "augmented.onnx"), extra_options=options)
    session = calibrator.infer_session
    names = [o.name for o in session.get_outputs()]
    originals = set(calibrator.model_original_outputs)
    rows_per_run: list[int] = []

    def run(part: dict[str, np.ndarray]) -> list[np.ndarray] | None:
        if s.method == "minmax":
            return session.run(None, part)
        calibrator.collect_data(_reader([part]))
        return None

    def runs(feed: dict[str, np.ndarray]) -> Iterator[list[np.ndarray] | None]:
        total = len(next(iter(feed.values())))
        start = 0
        if not rows_per_run:
            with peak_span() as peak:
                before = peak()
                yield run({k: v[:1] for k, v in feed.items()})
                rows_per_run.append(max(1, int(memory // max(1, peak() - before))))
            start = 1
        step = rows_per_run[0]
        for i in range(start, total, step):
            yield run({k: v[i:i + step] for k, v in feed.items()})

    try:
        for feed in feeds:
            combined: list[Any] | None = None
            for outputs in runs(feed):
                if outputs is None:
                    continue
                if combined is None:
                    combined = list(outputs)
                    continue
                for i, name in enumerate(names):
                    if name.endswith("_ReduceMin"):
                        combined[i] = np.fmin(combined[i], outputs[i])
                    elif name.endswith("_ReduceMax"):
                        combined[i] = np.fmax(combined[i], outputs[i])
            if combined is not None:  # what MinMaxCalibrater.collect_data keeps of one batch
                calibrator.intermediate_outputs.append(
                    [None if name in originals else value for name, value in zip(names, combined)])
        if s.method == "minmax" and not calibrator.intermediate_outputs:
            raise QuantizeError(f"no calibration batches for {Path(source).name}; give at least one input dict")
        return calibrator.compute_data()
    finally:
        del calibrator, session


def _quantize_ort(source: Path, staged: Path, feeds: Sequence[dict[str, np.ndarray]], s: QuantSettings) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[s.method]
    extra: dict[str, Any] = {
        "ActivationSymmetric": s.activation_type == "int8", "WeightSymmetric": True,
        "CalibMovingAverage": s.method == "minmax",
    }
    if s.method == "percentile":
        extra["CalibPercentile"] = PERCENTILE
    # The ranges are computed here, streamed, and handed to quantize_static as its
    # calibration cache: it then skips its own (all-batches-in-memory) collection.
    cache = staged.with_name("ranges.json")
    save_tensors_data(calibration_ranges(source, feeds, s, staged.parent), cache)
    quantize_static(
        str(source), str(staged), None, calibration_cache_path=str(cache),
        quant_format=QuantFormat.QDQ if s.format == "qdq" else QuantFormat.QOperator,
        op_types_to_quantize=list(s.op_types), per_channel=s.per_channel, reduce_range=s.reduce_range,
        activation_type=types[s.activation_type], weight_type=types[s.weight_type], calibrate_method=calibrate,
        nodes_to_exclude=list(s.nodes_to_exclude), extra_options=extra,
    )
    if s.format == "qdq":
        import onnx

        model = onnx.load(str(staged))
        keep_float_consumers(model, s.op_types)
        onnx.save(model, str(staged))


def _quantize_modelopt(source: Path, staged: Path, feeds: Sequence[dict[str, np.ndarray]], s: QuantSettings) -> None:
    """TensorRT-oriented QDQ placement (per-tensor int8 activations) by nvidia-modelopt.

    Runs in a child process: modelopt patches onnxruntime.quantization's calibrators
    in place when it quantizes, which would change every later ORT quantization in
    this process (seen with modelopt 0.47 + ORT 1.31).
    """
    import multiprocessing

    optional_import("modelopt.onnx.quantization", "TensorRT-oriented INT8 QDQ (--backend modelopt)")
    if s.method == "percentile":
        raise InputError("modelopt calibrates with 'minmax' (max) or 'entropy'; percentile is ORT-only")
    names = list(feeds[0])
    data_path = staged.with_suffix(".calib.npz")
    arrays: dict[str, Any] = {n: np.concatenate([f[n] for f in feeds]) for n in names}
    np.savez(data_path, **arrays)
    child = multiprocessing.get_context("spawn").Process(
        target=_modelopt_child, args=(str(source), str(staged), str(data_path), s.method, list(s.op_types),
                                      list(s.nodes_to_exclude)))
    child.start()
    child.join()
    if child.exitcode != 0 or not staged.exists():
        raise QuantizeError(f"nvidia-modelopt failed to quantize {source.name} (exit code {child.exitcode}); "
                            "see its log above, or use --backend onnxruntime --activation-type int8")


def _modelopt_child(source: str, staged: str, data_path: str, method: str, op_types: list[str],
                    nodes_to_exclude: list[str]) -> None:
    import logging as _logging

    mq = optional_import("modelopt.onnx.quantization", "TensorRT-oriented INT8 QDQ (--backend modelopt)")
    _logging.getLogger("modelopt").setLevel(_logging.CRITICAL)  # "no GPU/NVML" noise on CPU machines
    with np.load(data_path) as archive:
        data = {k: archive[k] for k in archive.files}
    mq.quantize(
        source, quantize_mode="int8", calibration_data=data,
        calibration_method="max" if method == "minmax" else "entropy", calibration_eps=["cpu"],
        op_types_to_quantize=op_types, nodes_to_exclude=nodes_to_exclude or None,
        high_precision_dtype="fp32", output_path=staged, log_level="ERROR",
    )


def quantize_dynamic_graph(fp32_path: str | os.PathLike[str], out_path: str | os.PathLike[str], *,
                           per_channel: bool = True, weight_type: str = "int8",
                           op_types: Iterable[str] = ("MatMul",), weights_only_matmul: bool = False,
                           fuse_gelu: bool = True, reduce_range: bool = False) -> dict[str, Any]:
    """Dynamic INT8 (CPU only): int8 weights, activation ranges computed per batch at run time.

    ``weights_only_matmul=False`` (default) also quantizes the attention products
    (Q·Kᵀ, A·V), whose both inputs are activations: on the ViT-S window encoder that was
    the fastest form at equal decisions (`edgederm bench-precision`). ``fuse_gelu``
    rewrites the exporter's erf-GELU into one ORT Gelu node (calibration/fusions.py);
    the graph is ORT-CPU-only either way.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if weight_type not in INT8_TYPES:
        raise InputError(f"weight_type {weight_type!r} is not supported; choose one of {', '.join(INT8_TYPES)}")
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory() as tmp:
        import onnx

        # The exporter's value_info contradicts onnx shape inference on some graphs
        # ("inferred shape and existing shape differ", ORT 1.31); quantize_dynamic
        # re-infers shapes itself, so start from a graph without it.
        model = onnx.load(str(fp32_path))
        del model.graph.value_info[:]
        staged = Path(tmp) / "dynamic.onnx"
        with _quiet_preprocess_hint():
            quantize_dynamic(model, str(staged), op_types_to_quantize=list(op_types), per_channel=per_channel,
                             reduce_range=reduce_range,
                             weight_type=QuantType.QInt8 if weight_type == "int8" else QuantType.QUInt8,
                             # DefaultTensorType: graphs with contrib ops (ORT's fused transformer
                             # ops) leave some tensors without an inferred type; they are float.
                             extra_options={"MatMulConstBOnly": weights_only_matmul,
                                            "DefaultTensorType": onnx.TensorProto.FLOAT})
        quantized = onnx.load(str(staged))
        fused = fuse_erf_gelu(quantized) if fuse_gelu else 0
        save_model(quantized, out_path)
    return {"backend": "onnxruntime", "mode": "dynamic", "per_channel": per_channel, "weight_type": weight_type,
            "activation_type": "uint8 (per batch, at run time)", "quantized_ops": list(op_types),
            "matmul_weights_only": weights_only_matmul, "fused_gelu": fused, "tensorrt_compatible": False,
            "reduce_range": reduce_range}


@contextlib.contextmanager
def _quiet_preprocess_hint() -> Iterator[None]:
    """Drop ORT's "consider pre-processing" hint (a root-logger warning) for dynamic
    quantization: its shape pre-pass is for static calibration, and the user can do nothing with it."""
    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "pre-processing before quantization" not in record.getMessage()

    drop = _Drop()
    logging.getLogger().addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)


def float_only_violations(model: Any) -> list[str]:
    """Nodes of FLOAT_ONLY_OPS that take an input straight from a DequantizeLinear (should be none)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    bad = []
    for node in model.graph.node:
        if node.op_type in FLOAT_ONLY_OPS:
            for name in node.input:
                src = producers.get(name)
                if src is not None and src.op_type == "DequantizeLinear":
                    bad.append(f"{node.name} ({node.op_type}) <- {src.name}")
    return bad


def keep_float_consumers(model: Any, quantized_ops: Iterable[str] = QUANTIZED_OPS) -> int:
    """Rewire every non-quantized consumer of an activation Q/DQ pair to the float tensor.

    Returns the number of inputs rewired. Quantized graph outputs become Identity of
    the float tensor. Unused Q/DQ nodes are removed.
    """
    from onnx import helper

    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {i.name for i in graph.initializer}
    keep = set(quantized_ops) | {"QuantizeLinear", "DequantizeLinear"}

    def float_source(name: str) -> str | None:
        dq = producers.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in initializers:
            return None
        q = producers.get(dq.input[0])
        return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else None

    rewired = 0
    for node in graph.node:
        if node.op_type in keep:
            continue
        for i, name in enumerate(node.input):
            src = float_source(name)
            if src is not None:
                node.input[i] = src
                rewired += 1
    for out in graph.output:
        dq = producers.get(out.name)
        src = float_source(out.name)
        if dq is not None and src is not None:
            index = list(graph.node).index(dq)
            graph.node.remove(dq)
            graph.node.insert(index, helper.make_node("Identity", [src], [out.name], name=f"{out.name}_float"))
            rewired += 1
    remove_unused(model)
    return rewired

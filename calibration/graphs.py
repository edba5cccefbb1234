"""Producing one reduced-precision ONNX graph: static INT8 (QDQ / QOperator), dynamic INT8.

Decisions:
- Static INT8 through ONNX Runtime's ``quantize_static`` (QDQ by default: the form
  TensorRT's explicit quantization and ORT's CPU/GPU kernels both take) or, for
  TensorRT targets, through nvidia-modelopt's ONNX quantization when it is installed
  (``backend="modelopt"``; imported lazily, never at module top).
- The compute ops Conv, MatMul and Gemm are quantized (``QUANTIZED_OPS``), and the
  Conv-chain ops below; LayerNorm, Softmax, GELU (Erf arithmetic at opset 18) and
  output Sigmoid/Softmax stay in float; tests/calibration/test_calibration.py checks
  the graph: no DequantizeLinear feeds those ops.
- Conv chains stay int8 from Conv to Conv (:func:`conv_chain`): the Relu/Clip right
  after a Conv carries its output quantization, and a residual Add, pool or Concat
  whose inputs are all int8 Conv outputs is quantized too, because ONNX Runtime's CPU
  has no int8 convolution with a float output: a QDQ Conv whose output is read in
  float is not fused into QLinearConv and runs in float on weights dequantized at
  every run, slower than the fp32 graph (docs/int8-performance.md has the profile).
  A Conv that still cannot fuse (its output feeds a float-only op, e.g. a squeeze-
  excitation gate's Sigmoid, or is a graph output) gets its float weights back.
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
  and a quantized graph output is restored to float; the exception is a Conv chain's
  int8 output, which its other readers (a SiLU, a Reshape) read rounded so that the
  Conv fuses, unless they are ``FLOAT_ONLY_OPS``.
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
from dataclasses import dataclass, field, replace
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
# Activations a Conv's int8 output goes through before its QuantizeLinear: ONNX Runtime
# folds Relu/Clip -> QuantizeLinear into the Q's range, so Conv -> Relu -> Q fuses into one
# QLinearConv; and the ops between Convs that ORT's CPU runs in int8 (see :func:`conv_chain`).
CONV_ACTIVATIONS = ("Relu", "Clip")
CONV_CHAIN_OPS = ("Add", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool")
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


def conv_chain(model: Any, exclude: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """The nodes that keep a Conv's output in int8 until the next Conv: ``(activations, chain)``.

    ``activations``: Relu/Clip nodes that are the only reader of an int8 tensor; their
    output carries the quantization (ORT folds ``Conv -> Relu -> QuantizeLinear`` into
    one QLinearConv). ``chain``: ``CONV_CHAIN_OPS`` nodes (a residual Add, a pool, a
    Concat) all of whose activation inputs are int8 Conv-chain tensors; ORT runs them
    in int8 (QLinearAdd, QLinearConcat, uint8 MaxPool ...) in its NHWC layout, so the
    chain needs no float pass between its Convs. Anything else stays float.
    """
    skip = set(exclude)
    initializers = {i.name for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    int8: set[str] = set()
    activations: list[str] = []
    chain: list[str] = []
    for node in model.graph.node:  # graph order is topological
        if node.name in skip:
            continue
        data = [n for n in node.input if n and n not in initializers]
        if node.op_type == "Conv":
            int8.add(node.output[0])
        elif (node.op_type in CONV_ACTIVATIONS and data and data[0] in int8 and readers.get(data[0]) == 1
              and data[0] not in outputs):
            activations.append(node.name)
            int8.add(node.output[0])
        elif node.op_type in CONV_CHAIN_OPS and data and all(n in int8 for n in data):
            chain.append(node.name)
            int8.add(node.output[0])
    return activations, chain


def _quantize_ort(source: Path, staged: Path, feeds: Sequence[dict[str, np.ndarray]], s: QuantSettings) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[s.method]
    extra: dict[str, Any] = {
        "ActivationSymmetric": s.activation_type == "int8", "WeightSymmetric": True,
        "CalibMovingAverage": s.method == "minmax",
        # Relu/Clip stay in the graph (not folded into the upstream tensor, which would give
        # a pre-activation tensor the activation's name): every float tensor keeps its meaning
        # for the float rewiring below and for returning nodes to float.
        "QDQKeepRemovableActivations": True,
    }
    op_types, exclude = list(s.op_types), list(s.nodes_to_exclude)
    carriers: list[str] = []
    float_model = onnx.load(str(source))
    if s.format == "qdq" and "Conv" in op_types:
        # Conv chains stay int8 from Conv to Conv; every other Relu/Clip/Add/pool/Concat
        # stays float (a transformer's residual Adds and their LayerNorms among them).
        activations, chain = conv_chain(float_model, exclude)
        if s.activation_type != "uint8":
            # ORT folds a Relu into a QuantizeLinear only when its zero point is the type's
            # lowest value (asymmetric uint8); symmetric int8 quantizes the Conv's output itself.
            activations = []
        carriers = activations
        keep = set(activations) | set(chain)
        added = [t for t in CONV_ACTIVATIONS + CONV_CHAIN_OPS if t not in op_types]
        op_types += added
        exclude += [n.name for n in float_model.graph.node if n.op_type in added and n.name not in keep]
    if s.method == "percentile":
        extra["CalibPercentile"] = PERCENTILE
    # The ranges are computed here, streamed, and handed to quantize_static as its
    # calibration cache: it then skips its own (all-batches-in-memory) collection. The
    # conv-chain activations added above need ranges too, so they are calibrated as well.
    cache = staged.with_name("ranges.json")
    save_tensors_data(calibration_ranges(source, feeds, replace(s, op_types=tuple(op_types)), staged.parent), cache)
    quantize_static(
        str(source), str(staged), None, calibration_cache_path=str(cache),
        quant_format=QuantFormat.QDQ if s.format == "qdq" else QuantFormat.QOperator,
        op_types_to_quantize=op_types, per_channel=s.per_channel, reduce_range=s.reduce_range,
        activation_type=types[s.activation_type], weight_type=types[s.weight_type], calibrate_method=calibrate,
        nodes_to_exclude=exclude, extra_options=extra,
    )
    if s.format == "qdq":
        model = onnx.load(str(staged))
        keep_float_consumers(model, s.op_types, carriers)
        float_unfused_convs(model, float_model)
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


def gating_sigmoids(model: Any) -> set[str]:
    """Sigmoid nodes of a SiLU/Swish ``x * sigmoid(x)``: an activation, not an output or a
    normalisation, so it may read a Conv's int8 output (EfficientNet's every Conv has one)."""
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    gating = set()
    for node in model.graph.node:
        if node.op_type == "Sigmoid" and any(
                u.op_type == "Mul" and set(u.input) == {node.input[0], node.output[0]}
                for u in consumers.get(node.output[0], [])):
            gating.add(node.name)
    return gating


def float_only_violations(model: Any) -> list[str]:
    """Nodes of FLOAT_ONLY_OPS that take an input straight from a DequantizeLinear (should be
    none); the Sigmoid of a SiLU (:func:`gating_sigmoids`) is an activation and may."""
    producers = {out: node for node in model.graph.node for out in node.output}
    gating = gating_sigmoids(model)
    bad = []
    for node in model.graph.node:
        if node.op_type in FLOAT_ONLY_OPS and node.name not in gating:
            for name in node.input:
                src = producers.get(name)
                if src is not None and src.op_type == "DequantizeLinear":
                    bad.append(f"{node.name} ({node.op_type}) <- {src.name}")
    return bad


def _int8_output(producers: dict[str, Any], name: str) -> bool:
    """``name`` is the int8 output of a Conv chain: a Conv's, a quantized chain node's
    (every input through a DequantizeLinear), or the Relu/Clip right after either."""
    node = producers.get(name)
    if node is not None and node.op_type in CONV_ACTIVATIONS and node.input:
        node = producers.get(node.input[0])
    return node is not None and _int8_node(producers, node)


def _int8_node(producers: dict[str, Any], node: Any) -> bool:
    if node.op_type == "Conv":
        return True
    return node.op_type in CONV_CHAIN_OPS and all(
        producers.get(n) is not None and producers[n].op_type == "DequantizeLinear" for n in node.input if n)


def keep_float_consumers(model: Any, quantized_ops: Iterable[str] = QUANTIZED_OPS, activations: Iterable[str] = ()) -> int:
    """Rewire the non-quantized consumers of an activation Q/DQ pair to the float tensor.

    Exception, for speed: a consumer of a Conv chain's int8 output (:func:`conv_chain`;
    e.g. a SiLU, a Reshape) keeps reading its DequantizeLinear, unless it is one of
    ``FLOAT_ONLY_OPS``. ONNX
    Runtime has no int8 convolution with a float output: a Conv whose output any node
    reads in float is not fused into QLinearConv and runs in float on weights
    dequantized at every run (measured: slower than the fp32 graph). The Relu/Clip
    nodes in ``activations`` carry a Conv's (or chain node's) output quantization and
    read its float output (ORT folds ``Conv -> Relu -> QuantizeLinear`` into one QLinearConv).

    Returns the number of inputs rewired. Quantized graph outputs become Identity of
    the float tensor. Unused Q/DQ nodes are removed.
    """
    from onnx import helper

    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {i.name for i in graph.initializer}
    keep = set(quantized_ops) | {"QuantizeLinear", "DequantizeLinear"}
    gating = gating_sigmoids(model)
    carriers = set(activations)

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
        float_only = node.op_type in FLOAT_ONLY_OPS and node.name not in gating
        for i, name in enumerate(node.input):
            src = float_source(name)
            if src is None:
                continue
            carries = node.name in carriers and _int8_node(producers, producers[src])
            if _int8_output(producers, src) and not float_only and not carries:
                continue
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


def unfused_convs(model: Any) -> list[str]:
    """Conv nodes with int8 weights (a DequantizeLinear of an initializer) whose output is
    not read only by QuantizeLinear (directly or through the one Relu/Clip ORT folds):
    ONNX Runtime cannot fuse them into QLinearConv."""
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {i.name for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}

    def only_quantized(name: str, hop: bool) -> bool:
        users = consumers.get(name, [])
        if name in outputs or not users:
            return False
        if all(u.op_type == "QuantizeLinear" for u in users):
            return True
        return (hop and len(users) == 1 and users[0].op_type in CONV_ACTIVATIONS
                and only_quantized(users[0].output[0], False))

    bad = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2:
            continue
        weight = producers.get(node.input[1])
        if weight is not None and weight.op_type == "DequantizeLinear" and weight.input[0] in initializers \
                and not only_quantized(node.output[0], True):
            bad.append(node.name)
    return bad


def float_unfused_convs(model: Any, float_model: Any) -> list[str]:
    """Give float weights (no per-run DequantizeLinear) to every Conv ORT could not fuse; in place.

    Such a Conv runs in float anyway. Its input keeps reading its DequantizeLinear, so
    the Conv upstream still fuses (an SE block's second Conv would otherwise pull the
    first one out of int8)."""
    names = unfused_convs(model)
    if names:
        model.CopyFrom(return_to_float(model, float_model, names, weights_only=True))
    return names


def return_to_float(qdq_model: Any, float_model: Any, nodes: Sequence[str], weights_only: bool = False) -> Any:
    """A copy of ``qdq_model`` with ``nodes`` computing in float (the node fallback that
    calibration/sensitivity.py describes).

    ``weights_only``: only weights and biases return to float; activations keep reading
    their DequantizeLinear, so the node that produced them stays int8."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(qdq_model)
    graph = model.graph
    wanted = set(nodes)
    producers = {out: node for node in graph.node for out in node.output}
    have_init = {i.name for i in graph.initializer}
    float_nodes = {n.name: n for n in float_model.graph.node}
    float_inits = {i.name: i for i in float_model.graph.initializer}
    for node in graph.node:
        if node.name not in wanted:
            continue
        reference = float_nodes.get(node.name)
        for i, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producers.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                if not weights_only:
                    node.input[i] = q.input[0]  # activation: the float tensor before Q
                continue
            # weight / bias: the float initializer of the fp32 graph
            if reference is None or i >= len(reference.input) or reference.input[i] not in float_inits:
                raise ValueError(f"cannot return {node.name!r} input {i} to float: no float initializer for it in the "
                                 "fp32 reference graph (was the graph prepared differently?)")
            source = reference.input[i]
            # ORT gives a bias's DequantizeLinear output the bias's own name: the float
            # copy then needs a name of its own.
            target = f"{source}__float" if source in producers else source
            if target not in have_init:
                init = onnx.TensorProto()
                init.CopyFrom(float_inits[source])
                init.name = target
                graph.initializer.append(init)
                have_init.add(target)
            node.input[i] = target
    if not weights_only:
        _float_conv_readers(graph, wanted)
    remove_unused(model)
    return model


def _float_conv_readers(graph: Any, floated: set[str]) -> None:
    """Non-quantized readers of a floated Conv's int8 output (a residual Add, a SiLU) read
    it in float again: they read it through Q/DQ only so that the Conv could fuse."""
    outputs = {out for node in graph.node if node.name in floated and node.op_type == "Conv" for out in node.output}
    outputs |= {node.output[0] for node in graph.node if node.op_type in CONV_ACTIVATIONS and node.input
                and node.input[0] in outputs}
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type in QUANTIZED_OPS:
            continue
        for i, name in enumerate(node.input):
            dq = producers.get(name)
            q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in outputs:
                node.input[i] = q.input[0]

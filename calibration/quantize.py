"""INT8 (QDQ) graphs through ONNX Runtime's static quantization, with a fidelity report.

Decisions:
- QDQ format (QuantizeLinear/DequantizeLinear pairs), the form TensorRT's explicit
  quantization and ORT's CPU/GPU kernels both take;
- only Conv, MatMul and Gemm inputs are quantized, so LayerNorm, Softmax, GELU and
  output activations stay in float (specs/MODELS.md);
- weights int8 per channel (symmetric), activations uint8 (asymmetric): on x86 CPUs
  the U8S8 kernels are the fast ones (S8S8 is several times slower in ORT);
- the bundle is updated atomically: the graph is written under a temporary name and
  renamed, then the manifest is replaced in one rename. An interrupted quantize
  leaves the previous bundle intact and loadable.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgederm.runtime import preprocess as pp
from edgederm.runtime.bundle import read_manifest, sha256_file, write_json_atomic
from edgederm.runtime.errors import EdgeDermError, InputError
from edgederm.runtime.model import softmax

from .data import CalibrationSet, list_images, load_batch, select_calibration

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
QUANTIZED_OPS = ["Conv", "MatMul", "Gemm"]


class QuantizeError(EdgeDermError):
    pass


def _reader(feeds: list[dict[str, np.ndarray]]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _Feeds(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    return _Feeds()


def quantize_graph(fp32_path: Path, int8_path: Path, feeds: list[dict[str, np.ndarray]], method: str = "minmax",
                   per_channel: bool = True) -> None:
    """Static QDQ quantization of one graph, calibrated on ``feeds``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in METHODS:
        raise InputError(f"calibration method {method!r} is not supported; choose one of {', '.join(METHODS)}")
    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        except Exception as exc:  # pre-processing only helps; quantize the raw graph if it fails
            log.warning("quantization pre-processing skipped for %s: %s", fp32_path.name, exc)
            prepared = fp32_path
        staged = Path(tmp) / "int8.onnx"
        quantize_static(
            str(prepared), str(staged), _reader(feeds), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=QUANTIZED_OPS, per_channel=per_channel,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=calibrate,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                           "CalibMovingAverage": method == "minmax"},
        )
        tmp_final = int8_path.with_name(f".{int8_path.name}.tmp")
        try:  # copy next to the bundle's files first so the final step is one rename
            _copy(staged, tmp_final)
            os.replace(tmp_final, int8_path)
        finally:
            tmp_final.unlink(missing_ok=True)


def _copy(src: Path, dst: Path) -> None:
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while block := fi.read(1 << 20):
            fo.write(block)
        fo.flush()
        os.fsync(fo.fileno())


def fidelity(fp32_probs: np.ndarray, int8_probs: np.ndarray, labels: np.ndarray | None, class_names: list[str]) -> dict[str, Any]:
    """Agreement and probability drift of a reduced-precision graph against fp32."""
    from edgederm.train import expected_calibration_error

    ref, got = fp32_probs.argmax(1), int8_probs.argmax(1)
    diff = np.abs(fp32_probs - int8_probs)
    report: dict[str, Any] = {
        "images": int(len(ref)),
        "decision_agreement": float((ref == got).mean()),
        "max_probability_diff": float(diff.max()),
        "mean_probability_diff": float(diff.mean()),
    }
    if labels is not None:
        report["accuracy_fp32"] = float((ref == labels).mean())
        report["accuracy_quantized"] = float((got == labels).mean())
        recall_change = {}
        for k, name in enumerate(class_names):
            sel = labels == k
            if sel.any():
                recall_change[name] = float((got[sel] == k).mean() - (ref[sel] == k).mean())
        report["recall_change"] = recall_change
        report["ece_change"] = expected_calibration_error(int8_probs, labels) - expected_calibration_error(fp32_probs, labels)
    return report


def quantize_bundle(
    bundle: str | os.PathLike[str], calib_dir: str | os.PathLike[str], *, precision: str = "int8",
    method: str = "minmax", per_channel: bool = True, max_images: int = 64, eval_dir: str | os.PathLike[str] | None = None,
    seed: int = 0, say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Add an INT8 graph per stage to ``bundle`` and store the fidelity report."""
    if precision != "int8":
        raise InputError(f"precision {precision!r} is not supported by this SDK version yet; use int8")
    manifest = read_manifest(bundle)
    root = manifest.root
    if len(manifest.stages) != 1 or manifest.model["task"] != "classify":
        raise QuantizeError("quantize currently handles single-stage classifiers; multi-stage and segmenters come with the tiled calibration")
    config = pp.PreprocessConfig.from_dict(manifest.preprocess)
    calib: CalibrationSet = select_calibration(calib_dir, max_images=max_images, seed=seed)
    say(f"calibrating on {len(calib)} images from {calib_dir} ({method}, per-channel={per_channel})")
    x = load_batch(calib.paths, config)
    stage = manifest.stages[0]
    input_name = stage["inputs"][0]["name"]
    feeds = [{input_name: x[i:i + 8]} for i in range(0, len(x), 8)]
    fp32_path = manifest.graph_path(stage, "fp32")
    # The new graph gets a name of its own (content hash), so a graph the current
    # manifest references is never overwritten before the manifest moves on.
    staged = root / f".{stage['name']}.{precision}.staged.onnx"
    try:
        quantize_graph(fp32_path, staged, feeds, method=method, per_channel=per_channel)
        digest = sha256_file(staged)
        int8_name = f"{stage['name']}.{precision}.{digest[:12]}.onnx"
        os.replace(staged, root / int8_name)
    finally:
        staged.unlink(missing_ok=True)
    previous = stage["graphs"].get(precision, {}).get("file")

    report: dict[str, Any] = {}
    if eval_dir is not None:
        from edgederm.runtime.backends.onnxruntime import OnnxRuntimeBackend

        eval_paths, eval_labels = list_images(eval_dir)
        xe = load_batch(eval_paths, config)
        probs = {}
        for p, path in (("fp32", fp32_path), (precision, root / int8_name)):
            backend = OnnxRuntimeBackend(path)
            out = np.concatenate([backend.run({input_name: xe[i:i + 16]})[stage["outputs"][0]["name"]] for i in range(0, len(xe), 16)])
            probs[p] = softmax(out, float(manifest.clinical.get("temperature", 1.0)))
        labels = np.array(eval_labels) if eval_labels is not None else None
        report = fidelity(probs["fp32"], probs[precision], labels, manifest.model["class_names"])
        say(f"fidelity on {len(xe)} held-out images: decision agreement {report['decision_agreement']:.3f}, "
            f"max |dp| {report['max_probability_diff']:.3f}")

    data = dict(manifest.data)
    stage_json = data["stages"][0]
    stage_json["graphs"][precision] = {"file": int8_name, "sha256": digest}
    data["files"][int8_name] = {"sha256": digest, "bytes": (root / int8_name).stat().st_size}
    if previous and previous != int8_name:
        data["files"].pop(previous, None)
    data["calibration"] = {
        "precision": precision, "method": method, "per_channel": per_channel, "format": "QDQ",
        "activation_type": "uint8", "weight_type": "int8", "quantized_ops": QUANTIZED_OPS,
        "images": len(calib), "dataset_sha256": calib.sha256, "fidelity": report,
    }
    write_json_atomic(root / "manifest.json", data)
    if previous and previous != int8_name:
        (root / previous).unlink(missing_ok=True)  # no longer referenced
    say(f"added {int8_name} to {root}")
    return data["calibration"]

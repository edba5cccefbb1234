"""TensorRT calibration cache for TensorRT 8.5 implicit INT8 calibration.

JetPack 5 ships TensorRT 8.5, whose INT8 path without a QDQ graph is implicit
calibration: the builder asks an ``IInt8Calibrator`` for a calibration cache (per
tensor scales) before it asks for batches. This module writes that cache from the
activation ranges ONNX Runtime's calibrator measured on the same calibration
images the QDQ graphs use, so both INT8 paths see one calibration set.

The format (what TensorRT's calibrators read and write, text, one entry a line)::

    TRT-8502-EntropyCalibration2
    input: 3c010204
    /stem/conv/Conv_output_0: 3d4ccccd

Line 1 is ``TRT-<version>-<algorithm>``; the version number is TensorRT's
``NV_TENSORRT_VERSION`` (8.x: major*1000 + minor*100 + patch; 10.x: major*10000 +
minor*100 + patch). Each further line is ``<tensor name>: <hex>``, the hex being the
IEEE-754 float32 bit pattern of the tensor's scale, lower case, without ``0x`` or
padding. Tensor names are the ONNX value names (TensorRT's ONNX parser keeps them).
The name is everything before the LAST ``": "``, so names with colons survive.

Decisions where the format is silent:
- scale = max(|lowest|, |highest|) / 127 (TensorRT INT8 is symmetric);
- a tensor whose range is all zero gets scale 1/127 (range +-1): any scale
  represents 0 exactly, and a zero scale would divide by zero in TensorRT;
- the file is written atomically (temp file + rename) like every bundle writer.

The calibrator subclass (:func:`make_entropy_calibrator`) exists only when TensorRT
is importable: ``trt.IInt8EntropyCalibrator2`` cannot be a base class otherwise, so
the class is created inside the function.
"""
from __future__ import annotations

import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from edgederm.runtime.backends.cuda import cuda_check, import_cudart
from edgederm.runtime.backends.engines import version_tuple
from edgederm.runtime.backends.tensorrt import trt
from edgederm.runtime.optional import import_tensorrt
from edgederm.runtime.bundle import write_bytes_atomic
from edgederm.runtime.errors import InputError

ALGORITHM = "EntropyCalibration2"
DEFAULT_TENSORRT_VERSION = "8.5.2"  # JetPack 5.1.x


class CalibrationCacheError(InputError):
    """A calibration cache file is malformed."""


def version_number(tensorrt_version: str) -> int:
    """TensorRT's ``NV_TENSORRT_VERSION`` for ``"8.5.2"`` (8502) or ``"10.3.0"`` (100300)."""
    parts = (list(version_tuple(tensorrt_version)) + [0, 0, 0])[:3]
    major, minor, patch = parts
    if major <= 0:
        raise InputError(f"TensorRT version {tensorrt_version!r} is not understood; expected e.g. '8.5.2' or '10.3.0'")
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch


def header(tensorrt_version: str = DEFAULT_TENSORRT_VERSION, algorithm: str = ALGORITHM) -> str:
    return f"TRT-{version_number(tensorrt_version)}-{algorithm}"


def float_to_hex(value: float) -> str:
    """float32 bit pattern as TensorRT writes it: ``1/127`` -> ``"3c010204"``."""
    return format(struct.unpack("<I", struct.pack("<f", value))[0], "x")


def hex_to_float(text: str) -> float:
    bits = int(text, 16)
    if not 0 <= bits <= 0xFFFFFFFF:
        raise ValueError(f"{text!r} is not a 32-bit pattern")
    return float(struct.unpack("<f", struct.pack("<I", bits))[0])


def scales_from_ranges(ranges: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """Symmetric INT8 scale per tensor: ``absmax / 127`` (all-zero range: 1/127)."""
    scales = {}
    for name, (low, high) in ranges.items():
        absmax = max(abs(float(low)), abs(float(high)))
        if not math.isfinite(absmax):
            raise InputError(f"tensor {name!r} has a non-finite calibration range ({low}, {high}); "
                             "check the calibration images and the fp32 graph for NaN/inf")
        scales[name] = (absmax if absmax > 0 else 1.0) / 127.0
    return scales


def format_cache(scales: Mapping[str, float], tensorrt_version: str = DEFAULT_TENSORRT_VERSION,
                 algorithm: str = ALGORITHM) -> str:
    lines = [header(tensorrt_version, algorithm)]
    for name, scale in scales.items():
        if "\n" in name:
            raise InputError(f"tensor name {name!r} contains a newline; the cache format cannot store it")
        if not (math.isfinite(scale) and scale > 0):
            raise InputError(f"scale of tensor {name!r} is {scale}; expected a positive finite number")
        lines.append(f"{name}: {float_to_hex(scale)}")
    return "\n".join(lines) + "\n"


def parse_cache(text: str) -> tuple[str, dict[str, float]]:
    """``(header, {tensor: scale})`` from cache text; raises :class:`CalibrationCacheError` on bad lines."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("TRT-") or lines[0].count("-") < 2:
        first = lines[0] if lines else ""
        raise CalibrationCacheError(f"calibration cache starts with {first[:60]!r}; expected a header like "
                                    f"'{header()}'")
    scales = {}
    for number, line in enumerate(lines[1:], start=2):
        name, sep, value = line.rpartition(": ")
        try:
            if not sep or not name:
                raise ValueError("no ': ' separator")
            scales[name] = hex_to_float(value.strip())
        except ValueError as exc:
            raise CalibrationCacheError(f"calibration cache line {number} {line[:80]!r} is not "
                                        f"'<tensor>: <float32 hex>' ({exc})") from exc
    return lines[0], scales


def write_calibration_cache(path: str | os.PathLike[str], scales: Mapping[str, float],
                            tensorrt_version: str = DEFAULT_TENSORRT_VERSION, algorithm: str = ALGORITHM) -> Path:
    """Write the cache atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    text = format_cache(scales, tensorrt_version, algorithm)
    return write_bytes_atomic(path, text.encode("utf-8"))


def read_calibration_cache(path: str | os.PathLike[str]) -> tuple[str, dict[str, float]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationCacheError(f"cannot read calibration cache {str(path)!r}: {exc}") from exc
    return parse_cache(text)


def onnx_ranges(onnx_path: str | os.PathLike[str], feeds: Iterable[Mapping[str, np.ndarray]], method: str = "entropy",
                op_types: Sequence[str] | None = None) -> dict[str, tuple[float, float]]:
    """Activation ranges of every calibrated tensor of an fp32 ONNX graph, by ONNX Runtime's calibrator.

    ``method``: ``minmax``, ``entropy`` (the closest to TensorRT's EntropyCalibration2)
    or ``percentile``. Ranges are symmetric-ready: the cache takes ``max(|lo|, |hi|)``.
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise InputError(f"calibration method {method!r} is not supported; choose one of {', '.join(methods)}")
    iterator: Iterator[Mapping[str, np.ndarray]] = iter(feeds)

    class _Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            item = next(iterator, None)
            return dict(item) if item is not None else None

    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(
            str(onnx_path), list(op_types) if op_types else None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=methods[method], extra_options={"symmetric": True} if method != "minmax" else {},
        )
        calibrator.collect_data(_Reader())
        data = calibrator.compute_data()
    ranges: dict[str, tuple[float, float]] = {}
    for name, tensor in data.items():
        low, high = tensor.range_value
        ranges[name] = (float(np.asarray(low).min()), float(np.asarray(high).max()))
    return ranges


def calibration_cache_from_onnx(onnx_path: str | os.PathLike[str], feeds: Iterable[Mapping[str, np.ndarray]],
                                cache_path: str | os.PathLike[str], method: str = "entropy",
                                tensorrt_version: str = DEFAULT_TENSORRT_VERSION) -> dict[str, float]:
    """Measure ranges with ONNX Runtime on ``feeds`` and write a TensorRT calibration cache; returns the scales."""
    scales = scales_from_ranges(onnx_ranges(onnx_path, feeds, method))
    write_calibration_cache(cache_path, scales, tensorrt_version)
    return scales


def make_entropy_calibrator(cache_path: str | os.PathLike[str], batches: Iterable[Mapping[str, np.ndarray]] = (),
                            batch_size: int = 1) -> trt.IInt8EntropyCalibrator2:
    """An ``IInt8EntropyCalibrator2`` that reads (and writes) ``cache_path``.

    When the cache exists TensorRT takes the scales from it and never asks for a
    batch (the usual case: the cache was written by :func:`calibration_cache_from_onnx`).
    Otherwise ``batches`` are copied to the GPU one at a time through cuda-python and
    TensorRT's own entropy calibration writes the cache.
    """
    import_tensorrt("TensorRT implicit INT8 calibration")  # the install hint before the base class is touched
    path = Path(cache_path)
    iterator: Iterator[Mapping[str, np.ndarray]] = iter(batches)

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            # pybind11 base classes must be initialised explicitly (TensorRT's docs).
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._cudart: Any = None
            self._device: dict[str, tuple[int, int]] = {}  # name -> (pointer, bytes)

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names: list[str]) -> list[int]:
            batch = next(iterator, None)
            if batch is None:
                return []  # no more batches
            if self._cudart is None:
                self._cudart = import_cudart()
            cudart, pointers = self._cudart, []
            for name in names:
                array = np.ascontiguousarray(batch[name], dtype=np.float32)
                ptr, size = self._device.get(name, (0, 0))
                if size < array.nbytes:
                    if ptr:
                        cudart.cudaFree(ptr)
                    ptr = int(cuda_check(cudart.cudaMalloc(array.nbytes), "cudaMalloc"))
                    self._device[name] = (ptr, array.nbytes)
                cuda_check(cudart.cudaMemcpy(ptr, array.ctypes.data, array.nbytes,
                                             cudart.cudaMemcpyKind.cudaMemcpyHostToDevice), "cudaMemcpy")
                pointers.append(ptr)
            return pointers

        # None (documented by TensorRT) means "no cache: calibrate".
        def read_calibration_cache(self) -> bytes | None:
            return path.read_bytes() if path.is_file() else None

        def write_calibration_cache(self, cache: Any) -> None:
            header_line, scales = parse_cache(bytes(cache).decode("utf-8"))
            algorithm = header_line.split("-", 2)[2]
            version = str(trt.__version__)
            write_calibration_cache(path, scales, version, algorithm)

        def __del__(self) -> None:
            if self._cudart is not None:
                for ptr, _ in self._device.values():
                    self._cudart.cudaFree(ptr)

    calibrator: trt.IInt8EntropyCalibrator2 = EntropyCalibrator()
    return calibrator

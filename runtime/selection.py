"""Backend and precision choice: a pure function of the bundle, the request and the
machine's facts (providers present, engines that match), returning the choice and
the notes that explain every fallback.

Order for ``backend="auto"``: TensorRT engines (checked against the device) >
ONNX Runtime CUDA > ONNX Runtime CPU. ``precision="auto"``: the engines' precision
on TensorRT; on a GPU provider fp16 > int8 > fp32; on a CPU the measured speed-up
(see :func:`fastest_measured_on_cpu`; measured at load by runtime/latency.py), else int8 > int8_dynamic > fp32.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

from .backends.engines import ENGINE_PRECISIONS
from .backends.remote import SCHEME as REMOTE_SCHEME
from .bundle import Manifest
from .errors import BundleError, InputError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt")
CPU_REDUCED = ("int8", "int8_dynamic")
SPEEDUP_MARGIN = 1.05  # a reduced precision must beat fp32 by more than this (median) to be chosen
CPU = ("CPUExecutionProvider",)
CUDA = ("CUDAExecutionProvider", "CPUExecutionProvider")

EngineChoice = Tuple[Optional[Mapping[str, Mapping[str, Any]]], str]  # (engine entry per stage, reason when None)


@dataclass(frozen=True)
class Choice:
    backend: str  # "tensorrt", "onnxruntime-cuda", "onnxruntime-cpu" or a "triton://HOST:PORT" server
    providers: tuple[str, ...]  # ONNX Runtime providers (empty for TensorRT)
    precision: str
    engines: Mapping[str, Mapping[str, Any]] | None = None  # TensorRT: the engine entry per stage
    notes: tuple[str, ...] = ()


def wants_engines(backend: str, precision: str) -> bool:
    """Whether the choice looks at TensorRT engines (the caller then selects them)."""
    return backend in ("auto", "tensorrt") and (precision == "auto" or precision in ENGINE_PRECISIONS)


def choose(bundle: Manifest, backend: str, precision: str, providers_available: list[str],
           engines: EngineChoice | None = None) -> Choice:
    """The backend and precision to load; ``engines``: ``select_engines``'s answer when
    :func:`wants_engines` (None otherwise)."""
    if backend.startswith(REMOTE_SCHEME):  # stage graphs on a KServe v2 server; no local provider
        from .backends.remote import parse_url

        parse_url(backend)
        return Choice(backend, (), choose_precision(bundle, precision, "cpu"))
    if backend not in BACKENDS:
        raise InputError(f"backend {backend!r} is not supported; choose one of {', '.join(BACKENDS)} "
                         f"or {REMOTE_SCHEME}HOST:PORT")
    notes: list[str] = []
    if backend in ("auto", "tensorrt"):
        if engines is not None and engines[0] is not None:
            chosen = engines[0]
            return Choice("tensorrt", (), str(next(iter(chosen.values()))["precision"]), chosen)
        reason = engines[1] if engines is not None else \
            f"TensorRT engines are fp16/int8 and precision {precision!r} was requested"
        if backend == "tensorrt" or bundle.engines:
            notes.append(f"{reason}; using ONNX Runtime")
        backend = "auto"
    if backend in ("onnxruntime-cuda", "auto") and "CUDAExecutionProvider" in providers_available:
        return Choice("onnxruntime-cuda", CUDA, choose_precision(bundle, precision, "gpu"), notes=tuple(notes))
    if backend == "onnxruntime-cuda":
        notes.append("onnxruntime-cuda requested but CUDAExecutionProvider is not available; using CPU")
    return Choice("onnxruntime-cpu", CPU, choose_precision(bundle, precision, "cpu"), notes=tuple(notes))


def choose_precision(bundle: Manifest, precision: str, device: str,
                     cpu_speedups: Mapping[str, float] | None = None) -> str:
    available = bundle.precisions()
    if precision != "auto":
        if precision not in available:
            raise BundleError(
                f"precision {precision!r} is not in bundle {bundle.root} (available: {available}); "
                f"fix: `edgederm quantize {bundle.root} --precision {precision}` or use precision='auto'"
            )
        return precision
    if device == "cpu":
        measured = fastest_measured_on_cpu(bundle, available, cpu_speedups)
        if measured is not None:
            return measured
    preferred = ("fp16", "int8", "fp32") if device != "cpu" else ("int8", "int8_dynamic", "fp32")
    return next((p for p in preferred if p in available), available[0])


def fastest_measured_on_cpu(bundle: Manifest, available: list[str],
                            speedups: Mapping[str, float] | None = None) -> str | None:
    """``precision="auto"`` on CPU: the graph with the best median speed-up over fp32,
    among those that met their agreement target and beat fp32 by more than
    :data:`SPEEDUP_MARGIN`; fp32 when none does.

    Why: on a CPU, INT8 is not always faster (small models spend their time in
    quantize/dequantize), and a few percent is within what load moves. ``speedups``:
    measured on this CPU (runtime/latency.py); without it, those ``edgederm quantize``
    recorded (calibration[p]["latency"]). None when a CPU graph has no measurement:
    the fixed order applies.
    """
    present = [p for p in CPU_REDUCED if p in available]
    if speedups is None:
        recorded = {p: ((bundle.calibration.get(p) or {}).get("latency") or {}).get("speedup") for p in present}
        speedups = {p: float(v) for p, v in recorded.items() if v is not None}
    if not present or any(p not in speedups for p in present):
        return None
    choice = "fp32"
    eligible = [p for p in present if met_target(bundle, p) and speedups[p] > SPEEDUP_MARGIN]
    if eligible:
        choice = max(eligible, key=lambda p: speedups[p])
    log.info("precision auto on CPU: %s (speed-up over fp32: %s)", choice, dict(speedups))
    return choice


def met_target(bundle: Manifest, precision: str) -> bool:
    """False only when quantize recorded that ``precision`` missed its agreement target."""
    return ((bundle.calibration.get(precision) or {}).get("target") or {}).get("reached") is not False


def auto_precision_note(bundle: Manifest, choice: str, speedups: Mapping[str, float], source: str) -> str:
    """What ``precision="auto"`` measured on this CPU and why it chose ``choice``."""
    parts = []
    for p, x in speedups.items():
        why = "" if p == choice else (" missed its agreement target" if not met_target(bundle, p) else
                                      f" not above the {SPEEDUP_MARGIN} margin" if x <= SPEEDUP_MARGIN else "")
        parts.append(f"{p} {x:.2f}x{why}")
    return f"precision auto: {choice} ({', '.join(parts)} vs fp32; {source})"

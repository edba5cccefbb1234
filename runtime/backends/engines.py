"""Which TensorRT engine of a bundle may run here (pure Python: nothing is deserialised).

- An engine is checked against the device BEFORE it is deserialised
  (:func:`check_engine_target`): a plan built for another GPU, compute capability,
  SM count or TensorRT release either fails to deserialise or runs with tactics
  tuned for another chip. A mismatch is never silent: :func:`select_engine` returns
  the reason, and the runtime falls back to ONNX Runtime and records it.
- Engine files are named and checked by :func:`engine_cache_key`: a hash of the
  ONNX graph, TensorRT version, GPU name, compute capability, SM count, precision
  and profile shapes. A file name alone is never trusted.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Mapping, Sequence

from ..errors import MissingDependencyError
from .cuda import DeviceInfo, TensorRTError

ENGINE_PRECISIONS = ("fp16", "int8")


def version_tuple(version: str | Sequence[int] | None) -> tuple[int, ...]:
    """``"10.3.0.30"`` -> ``(10, 3, 0, 30)``; empty for None or text without numbers."""
    if version is None:
        return ()
    if not isinstance(version, str):
        return tuple(int(v) for v in version)
    return tuple(int(p) for p in re.findall(r"\d+", version))


# -- engine cache key and target check (pure Python) --------------------------------------------
def engine_cache_key(model_sha256: str, tensorrt_version: str, gpu_name: str, sm_count: int, precision: str,
                     profile_shapes: Mapping[str, Mapping[str, Sequence[int]]],
                     compute_capability: str | None = None) -> str:
    """sha256 over everything that changes an engine; used in engine file names and checked at load."""
    canonical = {
        "model_sha256": model_sha256,
        "tensorrt_version": ".".join(str(v) for v in version_tuple(tensorrt_version)),
        "gpu_name": gpu_name.strip(),
        "compute_capability": compute_capability,
        "sm_count": int(sm_count),
        "precision": precision,
        "profiles": {name: {k: [int(d) for d in dims] for k, dims in sorted(p.items())}
                     for name, p in sorted(profile_shapes.items())},
    }
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def check_engine_target(entry: Mapping[str, Any], device: DeviceInfo) -> list[str]:
    """Why the engine in manifest ``entry`` cannot run on ``device``; empty when it can.

    Compared: GPU name, compute capability, SM count and TensorRT major.minor.patch
    (plans are not portable across TensorRT releases; the build number may differ).
    """
    target = entry.get("target") or {}
    reasons: list[str] = []
    if not target:
        return [f"engine {entry.get('file')!r} records no target (GPU, compute capability, TensorRT version)"]
    name = str(target.get("gpu_name", "")).strip()
    if name.lower() != device.gpu_name.strip().lower():
        reasons.append(f"built for GPU {name!r}, this device is {device.gpu_name!r}")
    if str(target.get("compute_capability")) != device.compute_capability:
        reasons.append(f"built for compute capability {target.get('compute_capability')}, "
                       f"this device has {device.compute_capability}")
    if target.get("sm_count") is not None and int(target["sm_count"]) != device.sm_count:
        reasons.append(f"built for {target['sm_count']} SMs, this device has {device.sm_count}")
    built, have = version_tuple(target.get("tensorrt_version")), version_tuple(device.tensorrt_version)
    if built[:3] != have[:3]:
        reasons.append(f"built with TensorRT {target.get('tensorrt_version')}, this device has {device.tensorrt_version}")
    return reasons


def select_engine(engines: Sequence[Mapping[str, Any]], device: DeviceInfo, stage: str, precision: str | None = None
                  ) -> tuple[dict[str, Any] | None, str]:
    """The engine entry (of a manifest's ``engines``) for ``stage`` that runs on ``device``,
    and why (or why none does).

    ``precision`` None prefers int8 over fp16. Returns ``(entry, "")`` on a match,
    ``(None, reason)`` otherwise; the reason names each engine and what did not match.
    """
    engines = [e for e in engines if e.get("stage") == stage]
    if not engines:
        return None, f"bundle has no TensorRT engine for stage {stage!r} (build one with `edgederm build`)"
    order = [precision] if precision else ["int8", "fp16"]
    candidates = [e for p in order for e in engines if e.get("precision") == p]
    if not candidates:
        have = sorted({str(e.get("precision")) for e in engines})
        return None, f"bundle has no {precision} TensorRT engine for stage {stage!r} (has {', '.join(have)})"
    rejected = []
    for entry in candidates:
        reasons = check_engine_target(entry, device)
        if not reasons:
            return dict(entry), ""
        rejected.append(f"{entry.get('file')}: " + "; ".join(reasons))
    return None, "no TensorRT engine matches this device (" + " | ".join(rejected) + ")"


def select_engines(stages: Sequence[str], engines: Sequence[Mapping[str, Any]], device: DeviceInfo | None = None,
                   precision: str | None = None) -> tuple[dict[str, dict[str, Any]] | None, str]:
    """One matching engine per stage, all of one precision, or ``(None, reason)`` to fall back to ONNX Runtime.

    Nothing is deserialised here: it checks that TensorRT and cuda-python import,
    queries the device (unless ``device`` is given) and compares the engines'
    targets (a manifest's ``engines``) with it; ``stages``: the bundle's stage names.
    """
    if not engines:
        return None, "bundle has no TensorRT engines (build them with `edgederm build BUNDLE --precision fp16|int8`)"
    if device is None:
        try:
            from .cuda import query_device
            from ..optional import import_tensorrt

            import_tensorrt()
            device = query_device()
        except (MissingDependencyError, TensorRTError) as exc:
            return None, f"TensorRT engines not used: {exc}"
    reasons = []
    for p in [precision] if precision else ["int8", "fp16"]:
        chosen: dict[str, dict[str, Any]] = {}
        for stage in stages:
            entry, reason = select_engine(engines, device, stage, p)
            if entry is None:
                reasons.append(reason)
                break
            chosen[stage] = entry
        else:
            return chosen, ""
    return None, "TensorRT engines not used: " + "; ".join(dict.fromkeys(reasons))

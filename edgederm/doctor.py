"""``edgederm doctor``: what this machine can run (no torch needed)."""
from __future__ import annotations

import os
import platform
from typing import Any

from edgederm.runtime.optional import is_available


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "asimd", "asimddp"]
    return " ".join(f for f in wanted if f in flags) or "none of " + ",".join(wanted)


def _memory() -> str:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f}
        return f"{info['MemTotal'] / 2**20:.1f} GiB total, {info.get('MemAvailable', 0) / 2**20:.1f} GiB available"
    except (OSError, KeyError, ValueError):
        return "unknown"


def diagnose() -> dict[str, Any]:
    import cv2
    import numpy as np

    import edgederm

    report: dict[str, Any] = {
        "edgederm": edgederm.__version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu_cores": os.cpu_count(),
        "cpu_features": _cpu_flags(),
        "memory": _memory(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
    }
    try:
        import onnxruntime as ort

        report["onnxruntime"] = ort.__version__
        report["ort_providers"] = ", ".join(ort.get_available_providers())
    except ImportError:
        report["onnxruntime"] = "not installed (pip install onnxruntime)"
    for name in ("torch", "onnx", "tensorrt", "torch_tensorrt", "modelopt"):
        report[name] = "available" if is_available(name) else "not installed"
    jetson = os.path.exists("/etc/nv_tegra_release")
    report["jetson"] = "yes" if jetson else "no"
    runnable = ["onnxruntime-cpu"] if "onnxruntime" in report and "not" not in str(report["onnxruntime"]) else []
    if "CUDAExecutionProvider" in str(report.get("ort_providers", "")):
        runnable.append("onnxruntime-cuda")
    if report["tensorrt"] == "available":
        runnable.append("tensorrt")
    report["backends_runnable"] = ", ".join(runnable) or "none"
    return report

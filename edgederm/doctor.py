"""``edgederm doctor``: what this machine can run, and why a bundle would not run here (no torch needed).

On a Jetson the software stack is fixed by the Jetson Linux (L4T) release flashed on
it: ``/etc/nv_tegra_release`` names it, and a target profile (runtime/target_profiles)
says which TensorRT, CUDA and Python that release line ships. The TensorRT and CUDA
actually installed are read from their own files (``NvInferVersion.h``,
``cuda/version.json``) or the Python module, so a device that was partly upgraded is
caught too. :func:`mismatches` names every difference between these facts and a
bundle's target and engines, before any engine is deserialized (TensorRT returns None
on a version mismatch and says little more).

Every path is read under ``root`` so the tests can run on recorded files of each release.
"""
from __future__ import annotations

import json
import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from edgederm.runtime.cpu import DESCRIPTIONS, read_cpu_features
from edgederm.runtime.optional import is_available
from edgederm.runtime.targets import (TEGRA_RELEASE, L4tRelease, TargetProfile, UnknownTargetError, all_targets, load_target,
                                      parse_tegra_release)

TENSORRT_HEADERS = ("usr/include/aarch64-linux-gnu/NvInferVersion.h", "usr/include/x86_64-linux-gnu/NvInferVersion.h",
                    "usr/include/NvInferVersion.h")
CUDA_VERSION_FILES = ("usr/local/cuda/version.json", "usr/local/cuda/version.txt")


def parse_tensorrt_header(text: str) -> Optional[str]:
    """``major.minor.patch.build`` from NvInferVersion.h (``NV_TENSORRT_*`` or the later ``TRT_*_ENTERPRISE``)."""
    parts = {}
    for key in ("MAJOR", "MINOR", "PATCH", "BUILD"):
        match = re.search(rf"#define\s+(?:NV_TENSORRT|TRT)_{key}(?:_ENTERPRISE)?\s+(\d+)", text)
        if match:
            parts[key] = match.group(1)
    if "MAJOR" not in parts or "MINOR" not in parts:
        return None
    return ".".join(parts[k] for k in ("MAJOR", "MINOR", "PATCH", "BUILD") if k in parts)


def parse_cuda_version(text: str) -> Optional[str]:
    """CUDA's version.json (11.1+) or the older version.txt ("CUDA Version 10.2.300")."""
    try:
        return str(json.loads(text)["cuda"]["version"])
    except (ValueError, KeyError, TypeError):
        match = re.search(r"CUDA Version\s+([\d.]+)", text)
        return match.group(1) if match else None


def _read(root: Path, rel: str) -> Optional[str]:
    try:
        return (root / rel).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _meminfo(root: Path) -> Dict[str, int]:
    text = _read(root, "proc/meminfo") or ""
    values = {}
    for line in text.splitlines():
        match = re.match(r"(\w+):\s+(\d+)\s*kB", line)
        if match:
            values[match.group(1)] = int(match.group(2)) * 1024
    return values


@dataclass
class DeviceFacts:
    """What this machine runs; None where it could not be read."""

    python: str
    l4t: Optional[L4tRelease] = None
    tensorrt: Optional[str] = None
    tensorrt_source: str = ""
    cuda: Optional[str] = None
    memory_total_bytes: Optional[int] = None
    memory_available_bytes: Optional[int] = None
    targets: List[str] = field(default_factory=list)  # profiles whose Jetson Linux line this release belongs to

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        data["l4t"] = self.l4t.version if self.l4t else None
        return data


def _tensorrt_module_version() -> Optional[str]:
    if not is_available("tensorrt"):
        return None
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception:  # a broken install reports as absent; the header may still say which is there
        return None


def device_facts(root: str | os.PathLike[str] = "/", python: Optional[str] = None, probe_modules: bool = True) -> DeviceFacts:
    """Read the facts under ``root`` ("/" on the device). ``probe_modules`` also asks the tensorrt module."""
    base = Path(root)
    facts = DeviceFacts(python=python or platform.python_version())
    text = _read(base, TEGRA_RELEASE)
    facts.l4t = parse_tegra_release(text) if text else None
    version = _tensorrt_module_version() if probe_modules else None
    if version:
        facts.tensorrt, facts.tensorrt_source = version, "python module tensorrt"
    else:
        for rel in TENSORRT_HEADERS:
            header = _read(base, rel)
            version = parse_tensorrt_header(header) if header else None
            if version:
                facts.tensorrt, facts.tensorrt_source = version, "/" + rel
                break
    for rel in CUDA_VERSION_FILES:
        cuda_text = _read(base, rel)
        facts.cuda = parse_cuda_version(cuda_text) if cuda_text else None
        if facts.cuda:
            break
    memory = _meminfo(base)
    facts.memory_total_bytes = memory.get("MemTotal")
    facts.memory_available_bytes = memory.get("MemAvailable")
    if facts.l4t is not None:
        facts.targets = [t.name for t in all_targets() if t.jetson and t.l4t_matches(facts.l4t.version)]
    return facts


def _same_release(have: str, want: str, parts: int) -> bool:
    numbers = lambda v: [int(p) for p in re.findall(r"\d+", v)][:parts]  # noqa: E731
    return numbers(have) == numbers(want)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def target_mismatches(facts: DeviceFacts, target: TargetProfile) -> List[str]:
    """Every way this device differs from what ``target`` was made for."""
    problems = []
    if target.jetson:
        if facts.l4t is None:
            problems.append(f"made for {target.name} ({target.module}, Jetson Linux R{'/R'.join(target.l4t)}); "
                            "this machine is not a Jetson (no /etc/nv_tegra_release)")
        elif not target.l4t_matches(facts.l4t.version):
            other = ", ".join(facts.targets) or "none of the known profiles"
            problems.append(f"made for {target.name} (Jetson Linux R{'/R'.join(target.l4t)}, JetPack {target.jetpack}); "
                            f"this device runs R{facts.l4t.version} ({other}). Fix: export for "
                            f"{facts.targets[0] if facts.targets else 'a profile of this release'} or flash JetPack {target.jetpack}")
    if facts.tensorrt and not _same_release(facts.tensorrt, target.tensorrt, 2):
        problems.append(f"{target.name} has TensorRT {target.tensorrt}; this machine has TensorRT {facts.tensorrt} "
                        f"({facts.tensorrt_source}): graphs were linted for the other parser")
    if target.jetson and facts.cuda and not _same_release(facts.cuda, target.cuda, 2):
        problems.append(f"{target.name} has CUDA {target.cuda}; this device has CUDA {facts.cuda}")
    if target.jetson and facts.l4t is not None and not _same_release(facts.python, target.python, 2):
        problems.append(f"{target.name} ships Python {target.python} (JetPack's TensorRT bindings are built for it); "
                        f"this is Python {facts.python}")
    if target.memory_bytes and facts.memory_total_bytes and facts.memory_total_bytes < 0.75 * target.memory_bytes:
        problems.append(f"{target.name} has {_gib(target.memory_bytes)} of memory; this device has "
                        f"{_gib(facts.memory_total_bytes)} in total: tile batches planned for the target may not fit")
    return problems


def engine_mismatches(facts: DeviceFacts, engines: List[Mapping[str, Any]]) -> List[str]:
    """Engines that would not deserialize here: TensorRT release (major.minor.patch) and the Jetson's compute capability."""
    problems = []
    expected_cc = {str(load_target(t).compute_capability) for t in facts.targets}
    for entry in engines:
        built = entry.get("target") or {}
        name = f"engine {entry.get('file')!r} ({entry.get('stage')}, {entry.get('precision')})"
        version = built.get("tensorrt_version")
        if version is None:
            problems.append(f"{name} records no TensorRT version; rebuild it with `edgederm build`")
        elif facts.tensorrt is None:
            problems.append(f"{name} needs TensorRT {version}; no TensorRT found on this machine")
        elif not _same_release(facts.tensorrt, str(version), 3):
            problems.append(f"{name} was built with TensorRT {version}; this machine has {facts.tensorrt}: "
                            "rebuild it here with `edgederm build` (plans do not move across TensorRT releases)")
        cc = built.get("compute_capability")
        if cc and expected_cc and str(cc) not in expected_cc:
            problems.append(f"{name} was built for compute capability {cc}; this Jetson has {', '.join(sorted(expected_cc))}")
    return problems


def mismatches(facts: DeviceFacts, manifest_data: Mapping[str, Any]) -> List[str]:
    """Everything in a bundle (its target, its engines) that does not fit this device."""
    problems = []
    target = (manifest_data.get("target") or {}).get("name")
    if target:
        try:
            problems += target_mismatches(facts, load_target(target))
        except UnknownTargetError as exc:
            problems.append(f"bundle target {target!r} is not a profile this SDK knows ({exc})")
    problems += engine_mismatches(facts, list(manifest_data.get("engines") or []))
    return problems


# -- the report ----------------------------------------------------------------------------------
def diagnose(bundle: str | os.PathLike[str] | None = None, target: Optional[str] = None,
             root: str | os.PathLike[str] = "/") -> Dict[str, Any]:
    """The report ``edgederm doctor`` prints; with ``bundle`` / ``target``, their mismatches with this device."""
    import cv2
    import numpy as np

    import edgederm

    facts = device_facts(root)
    cpu = read_cpu_features(Path(root) / "proc" / "cpuinfo")
    report: Dict[str, Any] = {
        "edgederm": edgederm.__version__,
        "python": facts.python,
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu_cores": os.cpu_count(),
        "cpu_features": " ".join(cpu.int8_features) or
                        ("unknown (no /proc/cpuinfo)" if cpu.source == "platform" else "none of the int8-relevant ones"),
        "int8_kernel_class": f"{cpu.kernel_class}: {DESCRIPTIONS[cpu.kernel_class]}",
        "memory": "unknown" if facts.memory_total_bytes is None else
                  f"{_gib(facts.memory_total_bytes)} total, {_gib(facts.memory_available_bytes or 0)} available",
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
    report["jetson"] = f"Jetson Linux R{facts.l4t.version} ({facts.l4t.board})" if facts.l4t else "no"
    if facts.l4t:
        report["jetson_targets"] = ", ".join(facts.targets) or "no known profile covers this release"
    report["tensorrt_version"] = f"{facts.tensorrt} ({facts.tensorrt_source})" if facts.tensorrt else "not found"
    report["cuda"] = facts.cuda or "not found"
    runnable = ["onnxruntime-cpu"] if "onnxruntime" in report and "not" not in str(report["onnxruntime"]) else []
    if "CUDAExecutionProvider" in str(report.get("ort_providers", "")):
        runnable.append("onnxruntime-cuda")
    if report["tensorrt"] == "available":
        runnable.append("tensorrt")
    report["backends_runnable"] = ", ".join(runnable) or "none"
    problems: List[str] = []
    if target:
        problems += target_mismatches(facts, load_target(target))
    if bundle is not None:
        from edgederm.runtime.bundle import read_manifest

        problems += mismatches(facts, read_manifest(bundle, verify=False).data)
    if bundle is not None or target:
        report["mismatches"] = list(dict.fromkeys(problems))
    return report

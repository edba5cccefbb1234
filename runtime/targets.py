"""Target profiles: the devices a bundle is made for, as data (``target_profiles/*.json``).

A profile names one device and one software release line (JetPack / Jetson Linux,
TensorRT, CUDA, Python, ONNX Runtime), the highest ONNX opset its TensorRT parser
takes and the onnx-tensorrt operator table that parser follows. Export, the parser
lint, ``doctor`` and the memory plan read the same files. Every fact in a file names
its source in ``sources`` (fact -> reference id) and ``references`` (id -> title, URL);
docs/target-profiles.md lists them.

This module runs on the device (Python 3.8 on JetPack 5), so it uses no newer syntax at
run time and reads the files next to it on disk rather than through
``importlib.resources.files`` (3.9+).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .errors import EdgeDermError

PROFILE_DIR = Path(__file__).resolve().parent / "target_profiles"
TEGRA_RELEASE = "etc/nv_tegra_release"


class UnknownTargetError(EdgeDermError, ValueError):
    """A target name that no profile describes."""


@dataclass(frozen=True)
class Reference:
    title: str
    url: str


@dataclass(frozen=True)
class TargetProfile:
    """One device and its software release line; ``sources`` maps each fact to a :class:`Reference`."""

    name: str
    summary: str
    module: str
    jetson: bool
    gpu: str
    compute_capability: Optional[str]  # "8.7"; None where the GPU is the user's choice (x86)
    min_compute_capability: Optional[str]
    dla_cores: int
    memory_bytes: Optional[int]  # physical memory; None: the host's, not fixed by the target
    unified_memory: bool  # CPU and GPU share one DRAM (every Jetson)
    jetpack: Optional[str]
    l4t: Tuple[str, ...]  # Jetson Linux releases "major.revision" ("35.4" = R35 REVISION 4.x)
    tensorrt: str
    cuda: str
    python: str
    onnxruntime: str  # pip specifier of the ONNX Runtime releases that run there
    max_opset: int  # highest default-domain opset the TensorRT parser takes
    parser_table: str  # onnx-tensorrt operator table (TensorRT major.minor) the parser follows
    # The device memory plan's terms that no bundle measures (runtime/memory.py): memory the OS
    # keeps (headless), the CUDA context with TensorRT's libraries, and TensorRT's scratch bound.
    # Figures from the sources named, not measured here.
    os_reserved_bytes: Optional[int] = None
    cuda_context_bytes: Optional[int] = None
    tensorrt_workspace_bytes: Optional[int] = None
    sources: Dict[str, Reference] = field(default_factory=dict)

    @property
    def tensorrt_major_minor(self) -> Tuple[int, int]:
        major, minor = (self.tensorrt.split(".") + ["0"])[:2]
        return int(major), int(minor)

    def l4t_matches(self, release: str) -> bool:
        """Whether Jetson Linux ``release`` ("35.4.1") belongs to this target's line."""
        return any(release == known or release.startswith(known + ".") for known in self.l4t)

    def source_of(self, fact: str) -> Reference:
        return self.sources[fact]

    def to_dict(self) -> Dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "sources"}
        data["l4t"] = list(self.l4t)
        data["sources"] = {fact: {"title": ref.title, "url": ref.url} for fact, ref in self.sources.items()}
        return data


def target_names() -> List[str]:
    """Every target a profile describes, sorted."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def _profile_path(name: str) -> Path:
    known = target_names()
    if name not in known:
        raise UnknownTargetError(f"unknown target {name!r}; known targets: {', '.join(known)}. "
                                 "Fix: pass one of these to --target (or add a profile file)")
    return PROFILE_DIR / f"{name}.json"


def _parse(data: Dict[str, Any], path: Path) -> TargetProfile:
    try:
        device, software, onnx = data["device"], data["software"], data["onnx"]
        memory_plan = data.get("memory_plan") or {}
        references = {key: Reference(str(ref["title"]), str(ref["url"])) for key, ref in data["references"].items()}
        sources = {fact: references[ref_id] for fact, ref_id in data["sources"].items()}
        return TargetProfile(
            name=str(data["name"]), summary=str(data["summary"]),
            module=str(device["module"]), jetson=bool(device["jetson"]), gpu=str(device["gpu"]),
            compute_capability=device.get("compute_capability"), min_compute_capability=device.get("min_compute_capability"),
            dla_cores=int(device["dla_cores"]), memory_bytes=device.get("memory_bytes"),
            unified_memory=bool(device["unified_memory"]),
            jetpack=software.get("jetpack"), l4t=tuple(str(v) for v in software.get("l4t") or ()),
            tensorrt=str(software["tensorrt"]), cuda=str(software["cuda"]), python=str(software["python"]),
            onnxruntime=str(software["onnxruntime"]),
            max_opset=int(onnx["max_opset"]), parser_table=str(onnx["parser_table"]),
            os_reserved_bytes=memory_plan.get("os_reserved_bytes"), cuda_context_bytes=memory_plan.get("cuda_context_bytes"),
            tensorrt_workspace_bytes=memory_plan.get("tensorrt_workspace_bytes"),
            sources=sources,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise EdgeDermError(f"target profile {path} is malformed ({type(exc).__name__}: {exc}); "
                            "expected the fields of the other files in that folder") from exc


def load_target(name: str) -> TargetProfile:
    """The profile called ``name``; :class:`UnknownTargetError` lists the known ones."""
    path = _profile_path(name)
    profile = _parse(json.loads(path.read_text(encoding="utf-8")), path)
    if profile.name != name:
        raise EdgeDermError(f"target profile {path} is named {profile.name!r}; the file name and its 'name' must agree")
    return profile


def all_targets() -> List[TargetProfile]:
    return [load_target(name) for name in target_names()]


@dataclass(frozen=True)
class L4tRelease:
    """A Jetson Linux release as ``/etc/nv_tegra_release`` states it: ``# R35 (release), REVISION: 4.1, ...``."""

    major: int
    revision: str
    board: str = ""

    @property
    def version(self) -> str:
        return f"{self.major}.{self.revision}"


def parse_tegra_release(text: str) -> Optional[L4tRelease]:
    match = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    if match is None:
        return None
    board = re.search(r"BOARD:\s*([^,\s]+)", text)
    return L4tRelease(int(match.group(1)), match.group(2).rstrip("."), board.group(1) if board else "")


def read_l4t_release(root: "str | os.PathLike[str]" = "/") -> Optional[L4tRelease]:
    """This machine's Jetson Linux release (None: not a Jetson)."""
    try:
        text = (Path(root) / TEGRA_RELEASE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return parse_tegra_release(text)


def detect_target(root: "str | os.PathLike[str]" = "/", memory_total_bytes: Optional[int] = None) -> Optional[TargetProfile]:
    """The profile of the Jetson this runs on: its Jetson Linux line, and among those the
    smallest module whose memory holds what the kernel reports (a module reports less than
    its DRAM: the carve-outs). None off a Jetson, or when two modules of that size share
    the release line and nothing here tells them apart."""
    release = read_l4t_release(root)
    if release is None:
        return None
    if memory_total_bytes is None:
        try:
            meminfo = (Path(root) / "proc/meminfo").read_text(encoding="utf-8", errors="replace")
            found = re.search(r"^MemTotal:\s+(\d+)\s*kB", meminfo, re.M)
            memory_total_bytes = int(found.group(1)) * 1024 if found else None
        except OSError:
            pass
    candidates = [t for t in all_targets() if t.jetson and t.l4t_matches(release.version)]
    if memory_total_bytes is not None:
        candidates = [t for t in candidates if t.memory_bytes is None or t.memory_bytes >= memory_total_bytes]
    if not candidates:
        return None
    smallest = min(t.memory_bytes or 0 for t in candidates)
    fits = [t for t in candidates if (t.memory_bytes or 0) == smallest]
    return fits[0] if len(fits) == 1 else None

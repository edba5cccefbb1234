"""What this CPU offers int8 arithmetic: the architecture, its int8-relevant instruction
sets, and the *int8 kernel class* that decides how an INT8 graph is quantized for it.

One reader for the whole SDK: the optimised-graph cache key, the per-CPU latency
cache, ``edgederm doctor``, ``edgederm quantize`` (what the graph was made on and for)
and ``load`` (whether an int8 graph made elsewhere must be re-checked here) all ask it.

Where the facts come from: ``/proc/cpuinfo`` on Linux (``flags`` on x86, ``Features``
on ARM). Elsewhere (macOS, Windows, a container without /proc) only the architecture
is known (``platform.machine()``), the feature set is empty and the class is
``"other"``: the reader never fails, it says it does not know.

The classes, and why they matter (ONNX Runtime's CPU kernels, MLAS):

* ``amx``: AMX-INT8 tiles (Sapphire Rapids and later). int32 accumulation.
* ``vnni``: AVX-512 VNNI or AVX-VNNI (``vpdpbusd``): u8 x s8 products summed in int32.
* ``avx2``: x86 with AVX2 (or AVX-512 without VNNI). The u8 x s8 kernels use
  ``vpmaddubsw``, which adds *pairs* of u8 x s8 products into a signed 16-bit lane and
  saturates there: 255 x 127 x 2 = 64770 does not fit in 32767. s8 activations are
  shifted to u8 first, so S8S8 graphs take the same path.
* ``sse``: x86 without AVX2; SSE4.1's ``pmaddubsw`` has the same 16-bit pairs.
* ``arm-dot``: ARMv8.2 dot product (``asimddp``: ``sdot``/``udot``, e.g. the Cortex-A78AE
  of Jetson Orin); ``i8mm`` is recorded beside it. int32 accumulation.
* ``arm-no-dot``: ARMv8.0 NEON (e.g. Jetson Nano's Cortex-A57): widening multiplies
  into 16-bit products that are accumulated pairwise into 32 bits; no saturation.
* ``other``: anything else, or a CPU whose features could not be read.

:func:`saturates` is the one fact the rest of the SDK acts on: on a saturating class a
u8 x s8 graph needs weights within +-64 (ONNX Runtime's ``reduce_range``), since
255 x 64 x 2 = 32640 fits in 16 bits; see docs/int8-and-cpus.md for the sources.
"""
from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, FrozenSet, Iterable, Mapping, Optional, Tuple

CPUINFO = Path("/proc/cpuinfo")

X86_INT8_FEATURES = ("sse4_1", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
                     "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
ARM_INT8_FEATURES = ("asimd", "asimddp", "i8mm", "bf16", "sve", "sve2")
INT8_FEATURES = X86_INT8_FEATURES + ARM_INT8_FEATURES

KERNEL_CLASSES = ("amx", "vnni", "avx2", "sse", "arm-dot", "arm-no-dot", "other")
#: Classes whose u8 x s8 kernels add pairs of products in a saturating 16-bit lane.
SATURATING = ("avx2", "sse")
#: Classes whose arithmetic is not known here: treated as possibly saturating.
UNKNOWN = ("other",)
#: The largest |int8 weight| for which a u8 x s8 pair cannot saturate: 2 x 255 x 64 = 32640 <= 32767.
SATURATION_FREE_WEIGHT = 64

DESCRIPTIONS = {
    "amx": "AMX-INT8 tiles, int32 accumulation",
    "vnni": "AVX-512 VNNI / AVX-VNNI dot products, int32 accumulation",
    "avx2": "AVX2 (or AVX-512 without VNNI): u8 x s8 pairs summed in saturating 16-bit lanes (vpmaddubsw)",
    "sse": "SSE4.1 without AVX2: u8 x s8 pairs summed in saturating 16-bit lanes (pmaddubsw)",
    "arm-dot": "ARM dot product (sdot/udot), int32 accumulation",
    "arm-no-dot": "ARM NEON without dot product: widening multiplies, no saturation",
    "other": "features unknown here",
}

_ARCH_ALIASES = {"amd64": "x86_64", "x86-64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8l": "aarch64"}


def normalise_arch(machine: str) -> str:
    """``platform.machine()`` spelled one way per architecture (Windows' AMD64, macOS' arm64)."""
    lowered = (machine or "").strip().lower()
    return _ARCH_ALIASES.get(lowered, lowered or "unknown")


def kernel_class(arch: str, features: Iterable[str]) -> str:
    """The int8 kernel class (:data:`KERNEL_CLASSES`) of a CPU with these features."""
    flags = set(features)
    arch = normalise_arch(arch)
    if arch in ("x86_64", "i386", "i686"):
        if {"amx_int8", "amx_tile"} <= flags:
            return "amx"
        if flags & {"avx512_vnni", "avx_vnni"}:
            return "vnni"
        if "avx2" in flags:
            return "avx2"
        if "sse4_1" in flags:
            return "sse"
        return "other"
    if arch == "aarch64" or arch.startswith("arm"):
        if "asimddp" in flags:
            return "arm-dot"
        if "asimd" in flags or "neon" in flags:
            return "arm-no-dot"
    return "other"


def saturates(kernel: str) -> bool:
    """Whether plain u8 x s8 products may saturate on this class (unknown classes: assume so)."""
    return kernel in SATURATING or kernel in UNKNOWN


@dataclass(frozen=True)
class CpuFeatures:
    """One CPU as the int8 code sees it."""

    arch: str  # "x86_64", "aarch64", ...
    features: FrozenSet[str]  # every flag the OS lists
    model: str = ""  # "AMD EPYC", "ARMv8 Processor rev 1 (v8l)"; informative only
    source: str = "platform"  # "/proc/cpuinfo" or "platform" (features unknown)

    @property
    def kernel_class(self) -> str:
        return kernel_class(self.arch, self.features)

    @property
    def int8_features(self) -> Tuple[str, ...]:
        """The int8-relevant features present, in :data:`INT8_FEATURES` order."""
        return tuple(f for f in INT8_FEATURES if f in self.features)

    @property
    def identity(self) -> str:
        """Architecture and a digest of every feature flag: what keys per-CPU caches (an
        ONNX Runtime-optimised graph may bake in the SIMD layout)."""
        flags = " ".join(sorted(self.features)) if self.features else self.model
        return f"{self.arch}|{hashlib.sha256(flags.encode()).hexdigest()[:16]}"

    def describe(self) -> str:
        """``"vnni (x86_64: avx2 fma avx512f ...)"``: what doctor and quantize print."""
        shown = " ".join(self.int8_features) or ("features unknown" if self.source == "platform" else "none of them")
        return f"{self.kernel_class} ({self.arch}: {shown})"

    def to_record(self) -> Dict[str, Any]:
        """What a bundle stores of the CPU an int8 graph was quantized on."""
        return {"class": self.kernel_class, "arch": self.arch, "features": list(self.int8_features)}


def parse_cpuinfo(text: str, machine: Optional[str] = None) -> CpuFeatures:
    """The CPU described by a ``/proc/cpuinfo`` text (its first processor).

    ``machine``: the architecture when known (``platform.machine()``); without it, it is
    inferred from the text (x86 lists ``flags``, ARM ``Features``).
    """
    fields: Dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields.get("flags") or fields.get("features"):
                break  # the first processor's block is enough: the OS lists the features it enables on all
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    flags = fields.get("flags") or fields.get("features") or ""
    features = frozenset(flags.split())
    if machine is not None:
        arch = normalise_arch(machine)
    elif "flags" in fields or "vendor_id" in fields:
        arch = "x86_64" if "lm" in features else "i686"
    elif "features" in fields or "cpu architecture" in fields:
        arch = "aarch64" if fields.get("cpu architecture", "8").startswith("8") else "arm"
    else:
        arch = "unknown"
    model = fields.get("model name") or fields.get("hardware") or fields.get("processor", "")
    return CpuFeatures(arch, features, model, str(CPUINFO) if features else "platform")


def read_cpu_features(path: Path | str = CPUINFO) -> CpuFeatures:
    """This machine's CPU from ``path`` (Linux), else the platform's architecture alone.

    Another ``path`` (a device's recorded system files) is read for what it says: its
    architecture comes from the text, not from this machine.
    """
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return CpuFeatures(normalise_arch(platform.machine()), frozenset(), platform.processor())
    return parse_cpuinfo(text, platform.machine() if Path(path) == CPUINFO else None)


@lru_cache(maxsize=1)
def this_cpu() -> CpuFeatures:
    """This machine's CPU, read once per process (the CPU does not change while it runs)."""
    return read_cpu_features()


def cpu_identity() -> str:
    """Machine + CPU feature flags (see :attr:`CpuFeatures.identity`)."""
    return this_cpu().identity


@dataclass(frozen=True)
class Int8Form:
    """How a CPU-bound INT8 graph is made for a kernel class, and why."""

    target_class: str
    reduce_range: bool  # weights within +-64 (ONNX Runtime's reduce_range), so no u8 x s8 pair saturates
    reason: str


def int8_form(target_class: str) -> Int8Form:
    """The INT8 form for CPUs of ``target_class`` (docs/int8-and-cpus.md states the sources).

    Saturating classes (and unknown ones) get weights within +-64: the form ONNX
    Runtime's ``quantize_static`` guidance gives for x86 CPUs without VNNI; it keeps the
    fast u8 x s8 kernel and makes saturation impossible. S8S8 is no cure there: ONNX
    Runtime shifts s8 activations to u8 and runs the same kernel.
    """
    if target_class not in KERNEL_CLASSES:
        raise ValueError(f"unknown int8 kernel class {target_class!r}; one of {', '.join(KERNEL_CLASSES)}")
    if target_class in SATURATING:
        return Int8Form(target_class, True, f"{target_class} CPUs sum u8 x s8 pairs in saturating 16-bit lanes "
                                            f"(2 x 255 x 127 > 32767); weights within +-{SATURATION_FREE_WEIGHT} "
                                            f"cannot saturate (2 x 255 x {SATURATION_FREE_WEIGHT} = 32640); ONNX Runtime's advice for "
                                            "x86 without VNNI (docs/int8-and-cpus.md)")
    if target_class in UNKNOWN:
        return Int8Form(target_class, True, "the CPU's int8 kernels are unknown here, so the form that cannot "
                                            "saturate on any of them (weights within +-64)")
    return Int8Form(target_class, False, f"{target_class} CPUs accumulate int8 products in 32 bits "
                                         f"({DESCRIPTIONS[target_class]}): full 8-bit weights")


def arithmetic_differs(made_on: str, saturation_free: bool, running: str) -> bool:
    """Whether an int8 graph quantized (and measured) on a ``made_on`` CPU computes other
    numbers on a ``running`` one: only a graph that can saturate, between a class where it
    does and one where it does not (or cannot be known)."""
    if saturation_free:
        return False
    return saturates(made_on) != saturates(running) or (made_on != running and (made_on in UNKNOWN or running in UNKNOWN))


def record_summary(record: Mapping[str, Any]) -> str:
    """``"vnni (x86_64: avx2 ... )"`` for a stored record (:meth:`CpuFeatures.to_record`)."""
    return f"{record.get('class')} ({record.get('arch')}: {' '.join(record.get('features') or []) or 'no int8 features'})"

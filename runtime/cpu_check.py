"""At load: an int8 graph quantized on a CPU whose int8 arithmetic differs from this
one's is re-checked by the bundle's golden self-test before it is trusted.

Why: the fidelity ``edgederm quantize`` measured (and the agreement target it met) is
the quantizing CPU's arithmetic. A u8 x s8 graph with full 8-bit weights computes other
numbers on an x86 CPU without VNNI, where pairs of products saturate in 16 bits, than
on a VNNI, AMX or ARM CPU, where they do not (runtime/cpu.py). Each int8 graph records
the CPU class it was quantized on and whether it is saturation-free
(``GraphFile.quantized_on`` in runtime/bundle.py); a graph that is saturation-free, or
runs on a CPU of the same arithmetic, needs nothing.

Decisions:

* The check is the bundle's golden self-test for that precision (runtime/selftest.py)
  on the graphs opened here, on ONNX Runtime's CPU provider (other backends do not run
  the CPU's int8 kernels).
* ``precision="int8"`` (explicit) that fails: :class:`CpuMismatchError` with both CPU
  classes and the fix. ``precision="auto"``: the precision is left out of the choice
  and the load says so in ``Result.notes``.
* A bundle without goldens for that precision is loaded, with a note that its int8
  graphs are unchecked on this CPU class: refusing it would refuse every bundle made
  before goldens existed, and the graphs are what their signer released.
* Graphs written before the record existed have none: nothing is known, nothing is
  re-checked (as before).
* The verdict is cached beside the optimised graphs, keyed by the verified bytes of the
  graphs and goldens, their tolerances, ONNX Runtime's version and this CPU's identity,
  so it runs once per bundle and CPU.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .backends.base import Backend
from .bundle import Manifest, verified_graph
from .cache_entry import read_entry, write_entry
from .cpu import CpuFeatures, arithmetic_differs, this_cpu
from .errors import CpuMismatchError
from .selftest import check_goldens, has_goldens

log = logging.getLogger(__name__)

CPU_INT8 = ("int8", "int8_dynamic")
BACKEND = "onnxruntime-cpu"


@dataclass(frozen=True)
class Verdict:
    precision: str
    trusted: bool
    note: str | None = None  # what the load says about it (None: same arithmetic, nothing to say)


def mismatch(manifest: Manifest, precision: str, cpu: CpuFeatures) -> str | None:
    """Why ``precision``'s graphs compute differently on ``cpu`` than where they were
    quantized; None when they compute alike (or nothing was recorded)."""
    if precision not in CPU_INT8:
        return None
    for stage in manifest.stages:
        graph = stage.graphs.get(precision)
        made = graph.quantized_on if graph is not None else None
        if made is not None and arithmetic_differs(made.kernel_class, made.saturation_free, cpu.kernel_class):
            return (f"{precision} graphs ({made.form or 'u8s8'}) were quantized on a {made.kernel_class} CPU "
                    f"for {made.made_for}; this CPU is {cpu.kernel_class}, whose int8 arithmetic differs")
    return None


def check(manifest: Manifest, precision: str, open_stages: Callable[[], Mapping[str, Backend]],
          folder: Path | None, cpu: CpuFeatures | None = None) -> Verdict:
    """Whether ``precision``'s graphs can be trusted on this CPU: re-checked by the golden
    self-test when their arithmetic differs here (``open_stages`` opens them; the verdict
    is cached in ``folder``)."""
    cpu = cpu or this_cpu()
    reason = mismatch(manifest, precision, cpu)
    if reason is None:
        return Verdict(precision, True)
    if not has_goldens(manifest, precision):
        note = (f"{reason}; the bundle has no {precision} golden self-test, so they run UNCHECKED on this CPU "
                f"class. Fix: `edgederm selftest add {manifest.root}` where it was quantized, or re-quantize with "
                f"--for-cpu {cpu.kernel_class}")
        log.warning(note)
        return Verdict(precision, True, note)
    key = _cache_key(manifest, precision, cpu)
    cached = _read_cached(folder, key) if folder is not None and key is not None else None
    if cached is not None:
        passed, detail = cached
        source = "checked on this CPU earlier"
    else:
        rows = check_goldens(manifest, open_stages(), precision, BACKEND, refuse=False)
        passed = all(r["passed"] for r in rows)
        detail = ", ".join(f"stage {r['stage']!r} differs from its golden by {r['max_abs_diff']:.3g} "
                           f"({'within' if r['passed'] else 'OUTSIDE'} the tolerance {r['tolerance']:.3g})" for r in rows)
        if folder is not None and key is not None:
            _write_cached(folder, key, passed, detail)
        source = "checked now"
    if passed:
        note = f"{reason}; golden self-test passed here ({detail}; {source})"
        log.info(note)
    else:
        note = f"{reason}; golden self-test FAILED here ({detail}; {source})"
        log.warning(note)
    return Verdict(precision, passed, note)


def require_trusted(manifest: Manifest, precision: str, stages: Mapping[str, Backend],
                    folder: Path | None, cpu: CpuFeatures | None = None) -> str | None:
    """An explicit request: the note to show, or CpuMismatchError when the re-check fails."""
    verdict = check(manifest, precision, lambda: stages, folder, cpu)
    if not verdict.trusted:
        kernel = (cpu or this_cpu()).kernel_class
        raise CpuMismatchError(
            f"{verdict.note}. Fix: re-quantize for this CPU (`edgederm quantize {manifest.root} --precision "
            f"{precision} --for-cpu {kernel}`, then `edgederm selftest add`), or load precision='fp32' or 'auto'")
    return verdict.note


def trusted_candidates(manifest: Manifest, candidates: Sequence[str],
                       open_stages: Callable[[str], Mapping[str, Backend]], folder: Path | None,
                       cpu: CpuFeatures | None = None) -> tuple[list[str], list[str]]:
    """``precision="auto"``: the candidate precisions trusted on this CPU, and the notes to show."""
    kept: list[str] = []
    notes: list[str] = []
    for precision in candidates:
        verdict = check(manifest, precision, partial(open_stages, precision), folder, cpu)
        if verdict.trusted:
            kept.append(precision)
        if verdict.note:
            notes.append(verdict.note if verdict.trusted else f"precision auto: {precision} not used: {verdict.note}")
    return kept, notes


# --------------------------------------------------------------------------- per-CPU verdict cache
def _cache_key(manifest: Manifest, precision: str, cpu: CpuFeatures) -> str | None:
    """The verified bytes checked (graphs and goldens), the tolerances, ONNX Runtime and the CPU;
    None when a file was not verified at load (nothing to key a verdict by)."""
    import onnxruntime as ort

    assert manifest.selftest is not None  # has_goldens checked it
    files = [s.graphs[precision].file for s in manifest.stages] + \
        [manifest.selftest.stages[s.name].file for s in manifest.stages]
    digests = [verified_graph(manifest, f) for f in files]  # graphs checked now if their check was deferred
    if not all(digests):
        return None
    tolerances = [manifest.selftest.stages[s.name].tolerance[precision] for s in manifest.stages]
    text = "|".join([*(d for d in digests if d), *map(repr, tolerances), precision, ort.__version__, cpu.identity])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _read_cached(folder: Path, key: str) -> tuple[bool, str] | None:
    fields = read_entry(Path(folder) / f"cpucheck-{key}.json", key, "CPU re-check cache", "checking again")
    if fields is None or not isinstance(fields.get("passed"), bool):
        return None
    return fields["passed"], str(fields.get("detail", ""))


def _write_cached(folder: Path, key: str, passed: bool, detail: str) -> None:
    write_entry(Path(folder) / f"cpucheck-{key}.json", {"key": key, "passed": passed, "detail": detail},
                "CPU re-check cache")

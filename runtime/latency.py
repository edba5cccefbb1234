"""CPU latency of a bundle's precisions, measured so that load on the machine cannot
decide ``precision="auto"``.

fp32 and each reduced precision run alternately, one run each per round (the order
rotating every round), and each variant's time is the median of its rounds: a load
spike lands in the same few rounds of every variant and the median drops it, where
timing one variant after the other would charge the whole spike to one of them.

Cost at load (only ``precision="auto"`` on a CPU, with no valid measurement for this
CPU): opening the other precisions' graphs, one warm-up run of each, then at most
:data:`ROUNDS` rounds, stopping after :data:`MIN_ROUNDS` once :data:`BUDGET_S`
seconds are spent; for a 224x224 classifier that is well under a second. The result
is cached per CPU beside the optimised graphs (``backends.onnxruntime.cache_dir``).
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .backends.base import Backend
from .bundle import Manifest, verified_graph
from .cache_entry import read_entry, write_entry
from .pipeline import Pipeline, Planner, Request

log = logging.getLogger(__name__)

ROUNDS = 7
MIN_ROUNDS = 3
BUDGET_S = 1.0
REFERENCE = "fp32"


@dataclass(frozen=True)
class Measurement:
    """Median milliseconds per variant over ``rounds`` interleaved rounds."""

    ms: Mapping[str, float]
    rounds: int

    def speedups(self, reference: str = REFERENCE) -> dict[str, float]:
        """Each variant's speed-up over ``reference`` (median time over median time)."""
        return {name: round(self.ms[reference] / ms, 3) for name, ms in self.ms.items()
                if name != reference and ms > 0}


def interleaved_medians(runners: Mapping[str, Callable[[], object]], rounds: int = ROUNDS,
                        min_rounds: int = MIN_ROUNDS, budget_s: float = BUDGET_S,
                        clock: Callable[[], float] = time.perf_counter) -> Measurement:
    """Run every runner once per round (after one untimed warm-up each), rotating the
    order each round so none always runs first; the median per runner."""
    names = list(runners)
    for name in names:  # first runs allocate arenas and pick kernels: not the steady state
        runners[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    start = clock()
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = clock()
            runners[name]()
            times[name].append((clock() - t0) * 1000)
        if r + 1 >= min_rounds and clock() - start > budget_s:
            break
    return Measurement({name: round(float(np.median(t)), 3) for name, t in times.items()}, len(times[names[0]]))


def pipeline_runner(manifest: Manifest, stages: Mapping[str, Backend], planner: Planner) -> Callable[[], object]:
    """One prediction of the bundle's pipeline on a synthetic lesion of its input size."""
    from .selftest import synthetic_lesion

    pipeline = Pipeline(manifest, stages, planner)
    height, width = manifest.preprocess.input_size
    image = synthetic_lesion(height, width)
    request = Request(image, image if "clinical" in manifest.model.modalities else None, None)
    return lambda: pipeline.run(request)


# --------------------------------------------------------------------------- per-CPU cache
def cache_key(graph_sha256s: Sequence[str], ort_version: str, cpu: str, session_options: str) -> str:
    """The graphs compared (their verified bytes), ONNX Runtime, the CPU and the threads."""
    text = "|".join([*sorted(graph_sha256s), ort_version, cpu, session_options])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cache_path(folder: Path, key: str) -> Path:
    return Path(folder) / f"latency-{key}.json"


def read_cached(folder: Path, key: str) -> Measurement | None:
    """The cached measurement for ``key``; None when absent or it fails its checksum."""
    fields = read_entry(cache_path(folder, key), key, "latency cache", "measuring again")
    if fields is None:
        return None
    try:
        return Measurement({str(k): float(v) for k, v in fields["ms"].items()}, int(fields["rounds"]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        log.warning("latency cache %s unusable (%s); measuring again", cache_path(folder, key), exc)
        return None


def write_cached(folder: Path, key: str, measurement: Measurement) -> None:
    write_entry(cache_path(folder, key), {"key": key, "ms": dict(measurement.ms), "rounds": measurement.rounds},
                "latency cache")


# --------------------------------------------------------------------------- at load
def recorded_speedups(manifest: Manifest, candidates: Sequence[str], cpu: str) -> dict[str, float] | None:
    """The speed-ups ``edgederm quantize`` measured, when it measured every candidate on this CPU."""
    found = {}
    for p in candidates:
        latency = (manifest.calibration.get(p) or {}).get("latency") or {}
        if latency.get("cpu") != cpu or latency.get("speedup") is None:
            return None
        found[p] = float(latency["speedup"])
    return found


def cpu_speedups(manifest: Manifest, candidates: Sequence[str], threads: int | None, folder: Path | None,
                 open_stages: Callable[[str], Mapping[str, Backend]], planner: Planner) -> tuple[dict[str, float], str]:
    """Speed-up over fp32 of each candidate precision on this CPU and where it comes
    from: the bundle's quantize-time measurement when it was taken on this CPU, else the
    per-CPU cache, else measured now (:func:`interleaved_medians`) and cached."""
    import onnxruntime as ort

    from .backends.onnxruntime import cpu_identity, session_options_id

    cpu = cpu_identity()
    recorded = recorded_speedups(manifest, candidates, cpu)
    if recorded is not None:
        return recorded, "measured on this CPU at quantize time"
    # (every compared graph is checked here: the cache is keyed by checked bytes only)
    shas = [verified_graph(manifest, s.graphs[p].file) for p in (REFERENCE, *candidates) for s in manifest.stages]
    key = cache_key([s for s in shas if s], ort.__version__, cpu, session_options_id(threads)) \
        if folder is not None and all(shas) else None
    if key is not None and folder is not None:
        cached = read_cached(folder, key)
        if cached is not None and all(p in cached.ms for p in (REFERENCE, *candidates)):
            return cached.speedups(), f"measured on this CPU earlier, median of {cached.rounds} interleaved rounds"
    runners = {p: pipeline_runner(manifest, open_stages(p), planner) for p in (REFERENCE, *candidates)}
    measurement = interleaved_medians(runners)
    if key is not None and folder is not None:
        write_cached(folder, key, measurement)
    return measurement.speedups(), f"measured here, median of {measurement.rounds} interleaved rounds"
